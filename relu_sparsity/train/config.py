"""Run configurations: the `tiny`, `small` and `paper` presets and `section.key=value` overrides."""

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class ModelSettings:
    num_layers: int = 6
    d_model: int = 512
    num_heads: int = 8
    d_ff: int | list[int] = 2048  # one width, or one per layer
    seq_len: int = 512
    tie_embeddings: bool = True
    dtype: str = "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU


@dataclasses.dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 16  # sequences per device
    peak_lr: float = 1e-3
    warmup_steps: int = 100
    end_lr_ratio: float = 0.0  # cosine decays to peak_lr * end_lr_ratio at `steps`
    weight_decay: float = 1e-4
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off
    b1: float = 0.9
    b2: float = 0.98
    seed: int = 0
    log_every: int = 50
    mean_last: int = 5  # tables average the last this-many logged steps
    eval_every: int = 500
    eval_batches: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    prune: str = "none"  # none | mask | compact | random (section 4.1 of the paper)
    prune_at: int = 0  # the step whose batch mask decides; pruned from the next step on
    # compact: widths round up to a multiple of this (capped at the original width), the padding
    # units zero and held dead; GEMMs at ragged widths run far below peak on GPUs.
    prune_multiple: int = 256


@dataclasses.dataclass
class DataSettings:
    source: str | list[str] = "default"  # "default" (Python's stdlib sources) or text file paths
    vocab_size: int = 4096
    cache: str | None = None  # token cache folder; None: a per-user cache for the source


@dataclasses.dataclass
class Config:
    name: str = "custom"
    instrument: str = "xla"  # off | xla | fused
    kernel: str = "auto"  # kernel backend for --instrument fused
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU default: prepare, train and report in a few minutes on two cores.
    "tiny": {
        "model": dict(num_layers=6, d_model=128, num_heads=4, d_ff=1024, seq_len=128),
        "train": dict(steps=600, batch_size=16, peak_lr=3e-3, warmup_steps=60, log_every=10,
                      eval_every=100, eval_batches=4, checkpoint_every=100),
        "data": dict(vocab_size=2048),
    },
    # One GPU, a few minutes. Peak LR 1e-3 with clipping trains stably at this size.
    "small": {
        "model": dict(num_layers=6, d_model=512, num_heads=8, d_ff=8192, seq_len=512),
        "train": dict(steps=3000, batch_size=16, peak_lr=1e-3, warmup_steps=300, log_every=50,
                      eval_every=500, eval_batches=8, checkpoint_every=1000),
        "data": dict(vocab_size=4096),
    },
    # The paper's model (section 2.2): 1M steps, 5000 warm-up steps to 3e-3, cosine decay.
    "paper": {
        "model": dict(num_layers=6, d_model=1024, num_heads=16, d_ff=32768, seq_len=512),
        "train": dict(steps=1_000_000, batch_size=16, peak_lr=3e-3, warmup_steps=5000,
                      log_every=1000, eval_every=10_000, eval_batches=16,
                      checkpoint_every=10_000),
        "data": dict(vocab_size=32768),
    },
}


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(values: dict[str, Any]) -> Config:
    def build(cls, section: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(section) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**section)

    top = dict(values)
    return Config(
        model=build(ModelSettings, top.pop("model", {})),
        train=build(TrainSettings, top.pop("train", {})),
        data=build(DataSettings, top.pop("data", {})),
        **{k: v for k, v in top.items()},
    )


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as a path


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """`section.key=value` (or a top-level `key=value`); values are JSON, else plain strings."""
    values = to_dict(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        *sections, field = key.split(".")
        target = values
        for section in sections:
            if not isinstance(target.get(section), dict):
                raise ValueError(f"override {item!r}: no config section {section!r}")
            target = target[section]
        if field not in target:
            raise ValueError(f"override {item!r}: no config field {key!r}; fields there: "
                             f"{sorted(target)}")
        target[field] = _parse_value(text)
    config = from_dict(values)
    validate(config)
    return config


def preset(name: str, overrides: list[str] | None = None) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {sorted(PRESETS)}")
    values = to_dict(Config(name=name))
    for section, fields in PRESETS[name].items():
        values[section].update(fields)
    return apply_overrides(from_dict(values), overrides or [])


def validate(config: Config) -> None:
    m, t = config.model, config.train
    if config.instrument not in ("off", "xla", "fused"):
        raise ValueError(f"instrument must be off, xla or fused, got {config.instrument!r}")
    if m.d_model % m.num_heads:
        raise ValueError(f"model.d_model {m.d_model} is not divisible by model.num_heads "
                         f"{m.num_heads}")
    widths = [m.d_ff] if isinstance(m.d_ff, int) else list(m.d_ff)
    if not isinstance(m.d_ff, int) and len(widths) != m.num_layers:
        raise ValueError(f"model.d_ff lists {len(widths)} widths for {m.num_layers} layers")
    if any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"model.d_ff must be positive ints, got {m.d_ff}")
    for name in ("steps", "batch_size", "log_every", "eval_every", "eval_batches",
                 "checkpoint_every", "keep_checkpoints", "mean_last"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.warmup_steps < 0 or t.peak_lr <= 0:
        raise ValueError("train.warmup_steps must be >= 0 and train.peak_lr > 0")
    if t.prune not in ("none", "mask", "compact", "random"):
        raise ValueError(f"train.prune must be none, mask, compact or random, got {t.prune!r}")
    if t.prune_multiple < 1:
        raise ValueError(f"train.prune_multiple must be >= 1, got {t.prune_multiple}")
    if t.prune != "none":
        if not 0 <= t.prune_at < t.steps - 1:
            raise ValueError(f"train.prune_at must lie in [0, {t.steps - 1}), got {t.prune_at}")
        if config.instrument == "off":
            raise ValueError("train.prune needs the batch mask: use --instrument xla or fused")
    if m.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"model.dtype must be auto, float32 or bfloat16, got {m.dtype!r}")
