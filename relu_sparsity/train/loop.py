"""The training loop: one jitted step, statistics fetched to the host only at logged steps.

Step numbering: the record of step `s` comes from the forward pass on the parameters after `s`
updates; step 0 is the forward pass at initialization (the paper's "batch 0"). A checkpoint named
`s` holds the state after `s` updates, so a resume from it redoes steps >= s.
"""

import contextlib
import hashlib
import logging
import os
import platform
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm.auto import tqdm

import relu_sparsity
from relu_sparsity.kernels import SparsityStats, resolve_fused_backend
from relu_sparsity.kernels.bits import np_or_rows, np_popcount
from relu_sparsity.model import Transformer, TransformerConfig, layer_stats
from relu_sparsity.train import data
from relu_sparsity.train.config import Config, to_dict, validate
from relu_sparsity.train.metrics import UnitStates, batch_mask, sparsity_metrics
from relu_sparsity.train.pruning import Pruning, choose_units, compact_tree, to_original_ids
from relu_sparsity.train.run_folder import RunFolder

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# Setup -----------------------------------------------------------------------------------------
def compute_dtype(config: Config) -> str:
    if config.model.dtype != "auto":
        return config.model.dtype
    return "bfloat16" if jax.default_backend() in ("gpu", "cuda", "tpu") else "float32"


def model_config(config: Config, vocab_size: int, *, instrument: str | None = None,
                 pruning: Pruning | None = None) -> TransformerConfig:
    m = config.model
    d_ff, live = (m.d_ff if isinstance(m.d_ff, int) else tuple(m.d_ff)), None
    if pruning is not None and pruning.mode == "compact":
        d_ff = pruning.padded_widths
    elif pruning is not None:  # mask, random: same shapes, only the kept units computed
        live = tuple(tuple(int(i) for i in k) for k in pruning.keep)
    return TransformerConfig(
        vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
        num_heads=m.num_heads, d_ff=d_ff, max_len=m.seq_len, tie_embeddings=m.tie_embeddings,
        instrument=instrument or config.instrument, backend=config.kernel, live=live,
        live_multiple=config.train.prune_multiple,
        dtype=compute_dtype(config))


def make_schedule(config: Config) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to peak * end_lr_ratio at the end."""
    t = config.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.peak_lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.peak_lr * t.end_lr_ratio)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    t = config.train
    schedule = make_schedule(config)
    # Decay only matrices: biases, LayerNorm scales and positions keep their values.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(t.clip_norm)] if t.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def learning_rate(config: Config, step: int) -> float:
    return float(make_schedule(config)(step))


def init_state(model: Transformer, optimizer, config: Config) -> TrainState:
    tokens = jnp.zeros((1, config.model.seq_len), jnp.int32)
    params = model.init(jax.random.key(config.train.seed), tokens)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def restore_state(template: TrainState, saved: dict) -> TrainState:
    """`saved` (a checkpoint's state dict) into `template`'s structure; every array must have
    the template's shape (a checkpoint of another width is an error, not a silent reshape)."""
    state = serialization.from_state_dict(template, saved)
    mismatched = [(jax.tree_util.keystr(path), a.shape, b.shape) for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(template), jax.tree.leaves(state), strict=True)
        if np.shape(a) != np.shape(b)]
    if mismatched:
        raise ValueError(f"the checkpoint does not fit this model: {mismatched[:3]} "
                         "(name, model shape, checkpoint shape)")
    return jax.tree.map(jnp.asarray, state)


def make_train_step(model: Transformer, optimizer):
    def loss_fn(params, tokens):
        logits, state = model.apply({"params": params}, tokens[:, :-1],
                                    mutable=["intermediates"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, layer_stats(state.get("intermediates", {}))

    def train_step(state: TrainState, tokens: jax.Array):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, tokens)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(state.step + 1, params, opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}, stats

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model: Transformer):
    @jax.jit
    def eval_step(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        targets = tokens[:, 1:]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == targets)
        return loss, correct

    return eval_step


def evaluate(eval_step, params, cache: data.TokenCache, config: Config,
             place=jnp.asarray) -> dict[str, float]:
    t, m = config.train, config.model
    sums, count = [], 0
    for tokens in cache.eval_batches(t.eval_batches, t.batch_size * jax.device_count(),
                                     m.seq_len):
        sums.append(eval_step(params, place(tokens)))  # queued; fetched once below
        count += tokens.shape[0] * (tokens.shape[1] - 1)
    sums = jax.device_get(sums)
    loss_sum = sum(float(loss) for loss, _ in sums)
    correct = sum(int(hits) for _, hits in sums)
    return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}


def default_cache_dir(config: Config) -> Path:
    root = Path(os.environ.get("RELU_SPARSITY_CACHE", Path.home() / ".cache" / "relu-sparsity"))
    source = config.data.source
    if source == data.DEFAULT_CORPUS:
        tag = f"stdlib-py{platform.python_version()}"
    else:
        paths = [source] if isinstance(source, str) else list(source)
        tag = "files-" + hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:12]
    return root / f"{tag}-v{config.data.vocab_size}"


def open_cache(config: Config) -> data.TokenCache:
    cache_dir = Path(config.data.cache) if config.data.cache else default_cache_dir(config)
    if not (cache_dir / "meta.json").exists():
        if config.data.cache:
            raise FileNotFoundError(f"no token cache at {cache_dir}; build it with "
                                    "`relu-sparsity prepare`")
        log.info("preparing the token cache at %s", cache_dir)
        source = config.data.source
        data.prepare(cache_dir, source if source == data.DEFAULT_CORPUS else
                     ([source] if isinstance(source, str) else source),
                     vocab_size=config.data.vocab_size)
    cache = data.TokenCache(cache_dir)
    if cache.vocab_size != config.data.vocab_size:
        log.warning("token cache %s has vocabulary %d, the config asks %d: using the cache's",
                    cache_dir, cache.vocab_size, config.data.vocab_size)
    return cache


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(relu_sparsity.__file__).parent, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_metadata(config: Config, cache: data.TokenCache, backend: str) -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        **to_dict(config),
        "version": relu_sparsity.__version__,
        "git_commit": git_commit(),
        "corpus": {k: cache.meta.get(k) for k in ("source", "corpus_hash", "python_version",
                                                   "files", "train_tokens", "eval_tokens",
                                                   "vocab_size", "unigram_entropy_nats")},
        "cache": str(cache.path),
        "runtime": {"jax": jax.__version__, "python": platform.python_version(),
                    "device": device.device_kind, "platform": device.platform,
                    "num_devices": jax.device_count(), "dtype": compute_dtype(config),
                    "kernel_backend": backend},
    }


# Several devices ------------------------------------------------------------------------------
class DataParallel:
    """Data parallelism over every local device: the state is replicated, each device takes
    `train.batch_size` consecutive sequences of the global batch, and XLA (GSPMD) partitions the
    jitted step and all-reduces the gradients. With one device it places arrays as they are."""

    def __init__(self):
        self.num_devices = jax.device_count()
        # Auto axes: XLA propagates the batch sharding through the model (no sharding types).
        self.mesh = jax.make_mesh((self.num_devices,), ("data",),
                                  axis_types=(jax.sharding.AxisType.Auto,))
        self.replicated = jax.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.sharded = jax.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

    def batch(self, tokens: np.ndarray) -> jax.Array:
        if self.num_devices == 1:
            return jnp.asarray(tokens)
        return jax.device_put(tokens, self.sharded)

    def state(self, state: TrainState) -> TrainState:
        return state if self.num_devices == 1 else jax.device_put(state, self.replicated)

    def tracing(self):
        """The context to trace the step in: the mesh, so that fused kernels run per device
        inside shard_map (model/mlp.py)."""
        return jax.set_mesh(self.mesh) if self.num_devices > 1 else contextlib.nullcontext()


def split_devices(stats: SparsityStats, num_devices: int) -> list[SparsityStats]:
    """One layer's host statistics of the global batch -> one per device (each device holds
    consecutive sequences)."""
    if num_devices == 1:
        return [stats]
    fields = [None if a is None else np.split(np.asarray(a), num_devices) for a in stats]
    return [SparsityStats(*(None if f is None else f[d] for f in fields))
            for d in range(num_devices)]


# Interruption ----------------------------------------------------------------------------------
@contextlib.contextmanager
def stop_requests():
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and returns."""
    requested = {"stop": False}

    def handler(signum, frame):
        if requested["stop"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        requested["stop"] = True
        log.warning("stop requested: checkpointing after this step (press again to abort)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# The loop --------------------------------------------------------------------------------------
def layer_records(stats, unit_states: list[UnitStates], pruning: Pruning | None,
                  num_devices: int = 1) -> tuple[list[dict], list[np.ndarray]]:
    """Per layer: the metrics at the current width (each device's batch, averaged over devices;
    with several, `batch_use_all_devices` beside), unit states of the union of the devices' batch
    masks, and the batch masks [n_devices, W], in original unit ids."""
    records, masks = [], []
    for layer, (layer_stat, states) in enumerate(zip(stats, unit_states, strict=True)):
        units, to_original = None, None
        if pruning is None:
            width = states.num_units
        elif pruning.mode == "compact":  # the kept units first, then dead padding
            width = len(pruning.keep[layer])
            units = None if width == pruning.padded_widths[layer] else np.arange(width)
            to_original = pruning.keep[layer]
        else:  # the stats index the original units, the dead ones zero
            width = len(pruning.keep[layer])
            units = pruning.keep[layer]
        per_device = split_devices(layer_stat, num_devices)
        figures = [sparsity_metrics(s, num_units=width, units=units) for s in per_device]
        metrics = {k: float(np.mean([f[k] for f in figures])) for k in figures[0]}
        device_masks = np.stack([batch_mask(s) for s in per_device])  # [n_devices, W]
        if to_original is not None:
            device_masks = np.stack([to_original_ids(m, to_original, states.num_units)
                                     for m in device_masks])
        union = np_or_rows(device_masks)
        if num_devices > 1:
            metrics["batch_use_all_devices"] = float(np_popcount(union)) / width
        masks.append(device_masks)
        records.append({"d_ff": width, **metrics, **states.update(union)})
    return records, masks


def train(config: Config, run_dir: str | Path, *, allow_config_change: bool = False,
          progress: bool = True, max_steps: int | None = None) -> Path:
    """Train `config` in `run_dir`, resuming it if it holds a checkpoint. Returns the folder.

    max_steps stops (with a checkpoint) after that many steps of this call: for tests and for
    splitting long runs; the run resumes where it stopped.
    """
    validate(config)
    folder = RunFolder(run_dir)
    saved = folder.read_config()
    wanted = to_dict(config)
    if saved is not None:
        saved_config = {k: saved.get(k) for k in wanted}
        if saved_config != wanted and not allow_config_change:
            diff = [k for k in wanted if saved_config.get(k) != wanted[k]]
            raise ValueError(f"{folder.path} holds a run with a different configuration "
                             f"(sections {diff} differ); pass --allow-config-change to resume it "
                             "with this one, or choose another --run-dir")
    folder.create()

    parallel = DataParallel()
    if parallel.num_devices > 1:
        log.info("data parallel over %d devices: %d sequences per device, %d per step",
                 parallel.num_devices, config.train.batch_size,
                 config.train.batch_size * parallel.num_devices)
    cache = open_cache(config)
    backend = resolve_fused_backend(config.kernel) if config.instrument == "fused" \
        else "reference"
    folder.write_config(run_metadata(config, cache, backend))
    log.info("run folder %s; instrumentation %s (kernel backend %s); compute dtype %s",
             folder.path, config.instrument, backend, compute_dtype(config))

    widths = model_config(config, cache.vocab_size).layer_widths()  # the original widths
    optimizer = make_optimizer(config)
    unit_states = [UnitStates(w) for w in widths]
    pruning = None

    latest = folder.load_latest_checkpoint()
    if latest is not None:
        ckpt_step, raw = latest
        if raw.get("pruning"):  # the shapes to restore into are the pruned ones
            pruning = Pruning.from_state_dict(raw["pruning"])
        model = Transformer(model_config(config, cache.vocab_size, pruning=pruning))
        template = init_state(model, optimizer, config)  # already at the compacted widths
        state = restore_state(template, raw["train_state"])
        unit_states = [UnitStates.from_state_dict(w, raw["unit_states"][str(i)])
                       for i, w in enumerate(widths)]
        dropped = folder.drop_after(ckpt_step)
        log.info("resumed from step %d (dropped %d log lines written after it)", ckpt_step,
                 dropped)
    else:
        folder.drop_after(0)  # a folder without checkpoints starts from scratch
        model = Transformer(model_config(config, cache.vocab_size))
        state = init_state(model, optimizer, config)
    state = parallel.state(state)
    start = int(state.step)

    from tensorboardX import SummaryWriter  # imported late: it is slow to import

    writer = SummaryWriter(str(folder.path), purge_step=start if start else None)
    t, m = config.train, config.model
    batch_size = t.batch_size * parallel.num_devices  # the global batch
    tokens_per_step = batch_size * m.seq_len
    eval_step = make_eval_step(Transformer(model_config(config, cache.vocab_size,
                                                        instrument="off", pruning=pruning)))

    end = t.steps if max_steps is None else min(t.steps, start + max_steps)
    if start >= end:
        log.info("the run is complete (%d steps)", start)
        writer.close()
        return folder.path
    t0 = time.perf_counter()
    first = parallel.batch(cache.batch("train", start, batch_size, m.seq_len, seed=t.seed))
    with parallel.tracing():
        step_fn = make_train_step(model, optimizer).lower(state, first).compile()
    log.info("compiled the train step in %.1f s", time.perf_counter() - t0)

    def save(step: int) -> None:
        folder.save_checkpoint(step, {
            "train_state": state, "unit_states": {str(i): u.state_dict()
                                                  for i, u in enumerate(unit_states)},
            "pruning": pruning.state_dict() if pruning else {}}, keep=t.keep_checkpoints)

    bar = tqdm(total=t.steps, initial=start, disable=not progress, unit="step",
               dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), start
    with stop_requests() as stop:
        for step in range(start, end):
            tokens = parallel.batch(cache.batch("train", step, batch_size, m.seq_len,
                                                seed=t.seed))
            prune_now = t.prune != "none" and step == t.prune_at and pruning is None
            evaluated = step % t.eval_every == 0 or step == t.steps - 1
            # An evaluated step is also logged, so that no evaluation is lost.
            logged = step % t.log_every == 0 or step == t.steps - 1 or prune_now or evaluated
            record: dict[str, Any] = {"step": step}
            if evaluated:
                # The parameters this step's forward pass sees (before its update). The steps
                # still queued finish first, so that the pause leaves out only evaluation.
                jax.block_until_ready(state)
                eval_start = time.perf_counter()
                record.update(evaluate(eval_step, state.params, cache, config,
                                       place=parallel.batch))
                last_time += time.perf_counter() - eval_start  # not training throughput
            state, scalars, stats = step_fn(state, tokens)
            if logged:
                scalars, stats = jax.device_get((scalars, stats))
                now = time.perf_counter()
                record.update(loss=float(scalars["loss"]), grad_norm=float(scalars["grad_norm"]),
                              lr=learning_rate(config, step),
                              tokens_per_s=(step + 1 - last_step) * tokens_per_step
                              / (now - last_time))
                if stats:
                    record["layers"], masks = layer_records(stats, unit_states, pruning,
                                                            parallel.num_devices)
                    folder.write_masks(step, masks)
                if prune_now:  # from step N + 1 on, only the units of step N's batch remain
                    # A unit used on any device is kept.
                    pruning = choose_units(t.prune, [np_or_rows(m_) for m_ in masks], widths,
                                           step, t.seed, multiple=t.prune_multiple)
                    record["pruned"] = {"mode": pruning.mode, "kept": list(pruning.widths)}
                    if pruning.mode == "compact":
                        record["pruned"]["padded"] = list(pruning.padded_widths)
                        state = parallel.state(compact_tree(state, pruning.keep,
                                                            pruning.padded_widths))
                    model = Transformer(model_config(config, cache.vocab_size, pruning=pruning))
                    eval_step = make_eval_step(Transformer(model_config(
                        config, cache.vocab_size, instrument="off", pruning=pruning)))
                    with parallel.tracing():
                        step_fn = make_train_step(model, optimizer).lower(state,
                                                                          tokens).compile()
                    log.info("pruned (%s) after step %d: units per layer %s of %s%s",
                             pruning.mode, step, list(pruning.widths), list(widths),
                             f" (parameters padded to {list(pruning.padded_widths)})"
                             if pruning.mode == "compact" else "")
                folder.append_metrics(record)
                write_scalars(writer, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                last_time, last_step = time.perf_counter(), step + 1
            bar.update(1)
            done = step + 1
            if done % t.checkpoint_every == 0 or done == end or stop["stop"]:
                jax.block_until_ready(state)
                save_start = time.perf_counter()
                save(done)
                last_time += time.perf_counter() - save_start  # not training throughput
            if stop["stop"]:
                log.warning("stopped at step %d; run again with the same --run-dir to resume",
                            done)
                break
    bar.close()
    writer.close()
    return folder.path


def write_scalars(writer, record: dict[str, Any]) -> None:
    step = record["step"]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "eval_loss", "eval_accuracy"):
        if key in record:
            writer.add_scalar(f"train/{key}" if not key.startswith("eval") else
                              f"eval/{key[5:]}", record[key], step)
    for i, layer in enumerate(record.get("layers", [])):
        for key, value in layer.items():
            writer.add_scalar(f"layer_{i}/{key}", value, step)
    writer.flush()


def run_finished(run_dir: str | Path, config: Config) -> bool:
    steps = RunFolder(run_dir).checkpoint_steps()
    return bool(steps) and steps[-1] >= config.train.steps

