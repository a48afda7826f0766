"""The logged scalars as TensorBoard events in the run folder: train/*, eval/* and, per layer,
layer_I/<metric>."""

import math
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
        """The record's finite scalars (a non-finite loss is marked in metrics.jsonl)."""
        step = record["step"]
        scalars = {f"train/{k}": record.get(k) for k in TRAIN_KEYS}
        scalars.update({f"eval/{k[len('eval_'):]}": record.get(k) for k in EVAL_KEYS})
        for i, layer in enumerate(record.get("layers", [])):
            scalars.update({f"layer_{i}/{k}": v for k, v in layer.items()})
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
