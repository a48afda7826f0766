"""Run configurations: the `tiny`, `small` and `paper` presets and `section.key=value` overrides.

Every override is parsed against its field's type and every field checked against its range
here, before a run creates anything: a bad value is one ValueError naming the field, the value
and what is allowed.
"""

import dataclasses
import json
import math
import types
import typing
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
    attention: str = "auto"  # auto: cuDNN's flash attention on GPUs (16-bit), else XLA's
    # A Hugging Face checkpoint folder a fresh run starts from (`relu-sparsity import`); the
    # fields below describe its architecture (model.TransformerConfig's, same defaults).
    init_from: str | None = None
    max_len: int | None = None  # rows of the position table; None: seq_len
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    post_norm: bool = False
    final_norm: bool = True
    position_offset: int = 0
    embed_dim: int | None = None
    positions: str = "learned"
    rope_theta: float = 10000.0
    num_kv_heads: int | None = None
    attention_bias: bool = True
    mlp: str = "relu"
    output_bias: bool = True


# The ModelSettings fields that TransformerConfig takes as they are.
ARCHITECTURE_FIELDS = ("norm", "norm_eps", "post_norm", "final_norm", "position_offset",
                       "embed_dim", "positions", "rope_theta", "num_kv_heads", "attention_bias",
                       "mlp", "output_bias")


@dataclasses.dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 16  # sequences per device
    peak_lr: float = 1e-3
    warmup_steps: int = 100
    end_lr_ratio: float = 0.0  # cosine decays to peak_lr * end_lr_ratio at decay_steps
    # The step the cosine reaches its end at; None: `steps`. Longer than `steps` follows a longer
    # schedule (the paper's 1M steps) and stops early.
    decay_steps: int | None = None
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
    # The step whose batch mask decides, pruned from the next step on; or "auto": the first logged
    # step at which units have been unused for prune_window steps and none came back after being
    # unused that long within the last prune_window steps (the units used in that window remain).
    prune_at: int | str = 0
    prune_window: int = 200
    # compact: widths round up to a multiple of this (capped at the original width), the padding
    # units zero and held dead; GEMMs at ragged widths run far below peak on GPUs.
    prune_multiple: int = 256
    # A non-finite loss or gradient norm: stop (the run ends, its checkpoints all finite) or skip
    # the update (optax.apply_if_finite); more than max_skips in a row is a divergence.
    on_nonfinite: str = "stop"
    max_skips: int = 10
    # Devices each MLP's width is split over (the mesh's `model` axis, train/sharding.py); the
    # other devices of all processes form the `data` axis.
    model_parallel: int = 1


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
        # prune_multiple 32: a CPU gains nothing from 256-unit widths, which would pad the
        # compacted 1024-unit layers most of the way back.
        "train": dict(steps=600, batch_size=16, peak_lr=3e-3, warmup_steps=60, log_every=10,
                      eval_every=100, eval_batches=4, checkpoint_every=100, prune_multiple=32),
        "data": dict(vocab_size=2048),
    },
    # One GPU, a few minutes. Peak LR 1e-3 with clipping trains stably at this size.
    "small": {
        "model": dict(num_layers=6, d_model=512, num_heads=8, d_ff=8192, seq_len=512),
        "train": dict(steps=3000, batch_size=16, peak_lr=1e-3, warmup_steps=300, log_every=50,
                      eval_every=500, eval_batches=8, checkpoint_every=1000),
        "data": dict(vocab_size=4096),
    },
    # The paper's model at d_ff 8192 (a quarter of its width): the science runs on one GPU.
    "paper8k": {
        "model": dict(num_layers=6, d_model=1024, num_heads=16, d_ff=8192, seq_len=512),
        "train": dict(steps=100_000, batch_size=16, peak_lr=3e-3, warmup_steps=5000,
                      log_every=200, eval_every=2000, eval_batches=16, checkpoint_every=2000),
        "data": dict(vocab_size=32768),
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


SECTIONS = {"model": ModelSettings, "train": TrainSettings, "data": DataSettings}


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(hint) -> str:
    """'int', 'float', 'int or list of int', ... for messages and --help."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else hint.__name__


def coerce(name: str, value: Any, hint) -> Any:
    """`value` as field `name`'s type `hint`, or a ValueError saying what the field takes."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for option in typing.get_args(hint):
            try:
                return coerce(name, value, option)
            except ValueError:
                continue
    elif typing.get_origin(hint) is list:
        if isinstance(value, list):
            item = typing.get_args(hint)[0]
            return [coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {json.dumps(value)}")
            return float(value)
    elif hint is int or hint is bool or hint is str:
        if type(value) is hint:
            return value
    raise ValueError(f"{name} must be {type_name(hint)}, got {json.dumps(value)}")


def from_dict(values: dict[str, Any]) -> Config:
    """A Config from nested dicts, every value checked against its field's type."""
    top = dict(values)
    sections = {}
    for section, cls in SECTIONS.items():
        given = top.pop(section, {})
        hints = field_types(cls)
        unknown = set(given) - set(hints)
        if unknown:
            raise ValueError(f"unknown {section} fields: {sorted(unknown)}; fields there: "
                             f"{sorted(hints)}")
        sections[section] = cls(**{k: coerce(f"{section}.{k}", v, hints[k])
                                   for k, v in given.items()})
    hints = field_types(Config)
    unknown = set(top) - set(hints)
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    return Config(**sections, **{k: coerce(k, v, hints[k]) for k, v in top.items()})


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
                raise ValueError(f"override {item!r}: no config section {section!r}; sections: "
                                 f"{sorted(SECTIONS)}")
            target = target[section]
        if field not in target:
            raise ValueError(f"override {item!r}: no config field {key!r}; fields there: "
                             f"{sorted(target)}")
        target[field] = _parse_value(text)
    config = from_dict(values)
    validate(config)
    return config


# What runs/metadata.py adds to a run's config.json beside the configuration's fields.
RUN_METADATA_KEYS = ("version", "git_commit", "corpus", "cache", "runtime")


def from_file(path: str, overrides: list[str] | None = None) -> Config:
    """The configuration a JSON file holds: a run's own config.json (what produced the run is
    left out), or a file of the same fields (any subset; the rest take their defaults)."""
    try:
        values = json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {path}: cannot read a JSON configuration ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of configuration fields")
    values = {k: v for k, v in values.items() if k not in RUN_METADATA_KEYS}
    return apply_overrides(from_dict(values), overrides or [])


def load(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A preset by name, or the configuration of a JSON file (`from_file`)."""
    if name_or_path in PRESETS or not name_or_path.endswith(".json"):
        return preset(name_or_path, overrides)
    return from_file(name_or_path, overrides)


def preset(name: str, overrides: list[str] | None = None) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {sorted(PRESETS)}")
    values = to_dict(Config(name=name))
    for section, fields in PRESETS[name].items():
        values[section].update(fields)
    return apply_overrides(from_dict(values), overrides or [])


INSTRUMENTS = ("off", "xla", "fused")
KERNELS = ("auto", "reference", "triton", "mosaic_gpu", "pallas_tpu")
PRUNE_MODES = ("none", "mask", "compact", "random")
ON_NONFINITE = ("stop", "skip")
DTYPES = ("auto", "float32", "bfloat16")
AT_LEAST_ONE = {
    "model": ("num_layers", "d_model", "num_heads", "seq_len"),
    "train": ("steps", "batch_size", "log_every", "eval_every", "eval_batches", "checkpoint_every",
              "keep_checkpoints", "mean_last", "prune_multiple", "max_skips", "prune_window",
              "model_parallel"),
    "data": ("vocab_size",),
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _one_of(name: str, value, allowed: tuple) -> None:
    _require(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def validate(config: Config) -> None:
    """Every field within its range; a ValueError naming the first that is not."""
    m, t = config.model, config.train
    _one_of("instrument", config.instrument, INSTRUMENTS)
    _one_of("kernel", config.kernel, KERNELS)
    _require(config.kernel == "auto" or config.instrument == "fused",
             f"kernel={config.kernel} chooses the kernel of --instrument fused; with "
             f"instrument={config.instrument} it would be ignored")
    for section, names in AT_LEAST_ONE.items():
        for name in names:
            value = getattr(getattr(config, section), name)
            _require(value >= 1, f"{section}.{name} must be >= 1, got {value}")
    _require(m.d_model % m.num_heads == 0, f"model.d_model {m.d_model} is not divisible by "
             f"model.num_heads {m.num_heads}")
    widths = [m.d_ff] if isinstance(m.d_ff, int) else list(m.d_ff)
    _require(isinstance(m.d_ff, int) or len(widths) == m.num_layers,
             f"model.d_ff lists {len(widths)} widths for {m.num_layers} layers")
    _require(all(w >= 1 for w in widths), f"model.d_ff must be positive, got {m.d_ff}")
    _one_of("model.dtype", m.dtype, DTYPES)
    _one_of("model.attention", m.attention, ("auto", "xla", "cudnn"))
    validate_architecture(m)
    _require(t.peak_lr > 0, f"train.peak_lr must be > 0, got {t.peak_lr}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(t.decay_steps is None or t.decay_steps > t.warmup_steps,
             f"train.decay_steps must exceed train.warmup_steps {t.warmup_steps}, got "
             f"{t.decay_steps}")
    for name in ("end_lr_ratio", "weight_decay", "clip_norm"):
        _require(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    for name in ("b1", "b2"):
        _require(0 <= getattr(t, name) < 1, f"train.{name} must be in [0, 1), got "
                 f"{getattr(t, name)}")
    _require(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    shard = 32 * t.model_parallel  # each shard's width a whole number of 32-unit mask words
    _require(t.model_parallel == 1 or all(w % shard == 0 for w in widths),
             f"model.d_ff {m.d_ff} must split into train.model_parallel={t.model_parallel} "
             "shards of a multiple of 32 units (the statistics' bit-packed words)")
    _require(t.model_parallel == 1 or t.prune_multiple % shard == 0,
             f"train.prune_multiple {t.prune_multiple} must be a multiple of 32 x "
             f"train.model_parallel = {shard}: compacted widths are split like d_ff")
    _require(t.model_parallel == 1 or t.prune in ("none", "compact"),
             f"train.prune={t.prune} computes the kept units by gathering them, which the "
             "width-sharded MLP (train.model_parallel > 1) does not do; use compact")
    _one_of("train.prune", t.prune, PRUNE_MODES)
    _one_of("train.on_nonfinite", t.on_nonfinite, ON_NONFINITE)
    if t.prune != "none":
        _require(t.prune_at == "auto" or (isinstance(t.prune_at, int)
                                          and 0 <= t.prune_at < t.steps - 1),
                 f"train.prune_at must be auto or lie in [0, {t.steps - 1}), got {t.prune_at!r}")
        _require(config.instrument != "off", "train.prune needs the batch mask: use "
                 "--instrument xla or fused")
    source = config.data.source
    _require(bool(source) and (isinstance(source, str) or all(source)),
             f"data.source must be 'default' or paths, got {source!r}")


def validate_architecture(m: ModelSettings) -> None:
    _one_of("model.norm", m.norm, ("layernorm", "rmsnorm"))
    _one_of("model.positions", m.positions, ("learned", "rope"))
    _one_of("model.mlp", m.mlp, ("relu", "gated"))
    _require(m.norm_eps > 0, f"model.norm_eps must be > 0, got {m.norm_eps}")
    _require(m.position_offset >= 0, f"model.position_offset must be >= 0, got "
             f"{m.position_offset}")
    _require(m.max_len is None or m.max_len >= m.seq_len, f"model.seq_len {m.seq_len} exceeds "
             f"model.max_len {m.max_len}")
    _require(m.num_kv_heads is None or (m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads
                                        == 0), f"model.num_kv_heads {m.num_kv_heads} must "
             f"divide model.num_heads {m.num_heads}")
    _require(m.embed_dim is None or m.embed_dim >= 1, f"model.embed_dim must be >= 1, got "
             f"{m.embed_dim}")


def field_help() -> str:
    """Every config field with its type and default, for `train --help`."""
    lines = []
    for section, cls in [("", Config), *SECTIONS.items()]:
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS or (not section and f.name == "name"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = f"{section}.{f.name}" if section else f.name
            lines.append(f"  {key:24s} {type_name(hints[f.name]):22s} {json.dumps(default)}")
    return "\n".join(lines)
