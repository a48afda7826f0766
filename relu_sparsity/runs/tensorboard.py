"""The logged scalars as TensorBoard events in the run folder: train/*, eval/* and, per layer,
layer_I/<metric>."""

from pathlib import Path
from typing import Any

TRAIN_KEYS = ("loss", "grad_norm", "lr", "tokens_per_s")
EVAL_KEYS = ("eval_loss", "eval_accuracy")


class EventLog:
    """A tensorboardX writer that drops events of steps >= `start` left by an interrupted run
    (a resume redoes them)."""

    def __init__(self, path: Path, start: int):
        from tensorboardX import SummaryWriter  # imported late: it is slow to import

        self.writer = SummaryWriter(str(path), purge_step=start if start else None)

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key in TRAIN_KEYS:
            if key in record:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        for key in EVAL_KEYS:
            if key in record:
                self.writer.add_scalar(f"eval/{key[len('eval_'):]}", record[key], step)
        for i, layer in enumerate(record.get("layers", [])):
            for key, value in layer.items():
                self.writer.add_scalar(f"layer_{i}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
