"""The jitted programs of a run: the optimizer, the train step and the evaluation step, built for
one set of layer widths. `build_program` builds them at the start and again after pruning.

Step numbering (docs/design.md §6): the train step at step `s` runs the forward pass on the
parameters after `s` updates, so step 0 is the model at initialization (the paper's "batch 0").

Divergence: each step notes in the state the first step whose loss or gradient norm was not
finite (`first_nonfinite`, -1 while there is none), so the host learns of it at the next logged
step or checkpoint without a transfer per step.
"""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from relu_sparsity.model import Transformer, TransformerConfig, layer_stats
from relu_sparsity.model.transformer import attention_implementation
from relu_sparsity.train import history
from relu_sparsity.train.config import ARCHITECTURE_FIELDS, Config
from relu_sparsity.train.pruning import Pruning


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    first_nonfinite: jax.Array  # int32: the first diverged step, -1 while there is none
    units: tuple  # per layer a history.UnitHistory (original ids); () without statistics


def compute_dtype(config: Config) -> str:
    """model.dtype, with `auto` meaning bfloat16 on accelerators and float32 on CPUs."""
    if config.model.dtype != "auto":
        return config.model.dtype
    return "bfloat16" if jax.default_backend() in ("gpu", "cuda", "tpu") else "float32"


def model_config(config: Config, vocab_size: int, *, instrument: str | None = None,
                 pruning: Pruning | None = None) -> TransformerConfig:
    """The Transformer of `config`; after `pruning`, at the compacted widths (compact) or with
    only the kept units live (mask, random)."""
    m = config.model
    d_ff, live = (m.d_ff if isinstance(m.d_ff, int) else tuple(m.d_ff)), None
    if pruning is not None and pruning.mode == "compact":
        d_ff = pruning.padded_widths
    elif pruning is not None:
        live = tuple(tuple(int(i) for i in k) for k in pruning.keep)
    return TransformerConfig(
        vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
        num_heads=m.num_heads, d_ff=d_ff, max_len=m.max_len or m.seq_len,
        tie_embeddings=m.tie_embeddings, instrument=instrument or config.instrument,
        backend=config.kernel, live=live, live_multiple=config.train.prune_multiple,
        dtype=compute_dtype(config), attention=m.attention,
        **{name: getattr(m, name) for name in ARCHITECTURE_FIELDS})


def attention_of(config: Config) -> str:
    """The attention implementation the run's model takes (a ValueError where the configured one
    cannot run)."""
    m = config.model
    return attention_implementation(m.attention, compute_dtype(config), m.d_model // m.num_heads)


def make_schedule(config: Config) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to peak * end_lr_ratio at step
    `train.decay_steps` (the run's last step when unset; a longer decay is the paper's 1M-step
    cosine, stopped early), constant after it."""
    t = config.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.peak_lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.decay_steps or t.steps, t.warmup_steps + 1),
        end_value=t.peak_lr * t.end_lr_ratio)


# The parameter names AdamW decays: kernels, embeddings and the MLPs' weights (gated ones too).
DECAYED_WEIGHTS = ("kernel", "embedding", "wi", "wo", "wg", "wu", "wd")


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """AdamW on the schedule, after global-norm clipping when train.clip_norm > 0; with
    train.on_nonfinite=skip, inside optax.apply_if_finite (a non-finite gradient's update is
    skipped, up to train.max_skips in a row)."""
    t = config.train
    # Decay only the weight matrices, by name: biases (the qkv bias is [3, heads, head_dim]),
    # LayerNorm scales and positions keep their values.
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, p: getattr(path[-1], "key", None) in DECAYED_WEIGHTS, params)
    parts = [optax.clip_by_global_norm(t.clip_norm)] if t.clip_norm > 0 else []
    parts.append(optax.adamw(make_schedule(config), b1=t.b1, b2=t.b2,
                             weight_decay=t.weight_decay, mask=decay_mask))
    optimizer = optax.chain(*parts)
    if t.on_nonfinite == "skip":
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=t.max_skips)
    return optimizer


def learning_rate(config: Config, step: int) -> float:
    return float(make_schedule(config)(step))


def init_state(model: Transformer, optimizer, config: Config,
               widths: tuple[int, ...] | None = None) -> TrainState:
    """The state at step 0; `widths` (the layers' original widths) gives it unit histories.
    The parameters come from the model without statistics (the same tree and values): the
    one-sequence forward of `init` would otherwise compile a fused kernel at a shape no step
    runs."""
    tokens = jnp.zeros((1, config.model.seq_len), jnp.int32)
    plain = model.clone(config=dataclasses.replace(model.config, instrument="off"))
    params = plain.init(jax.random.key(config.train.seed), tokens)["params"]
    units = history.empty_history(widths) if widths else ()
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      jnp.full((), -1, jnp.int32), units)


def make_train_step(model: Transformer, optimizer, *, max_skips: int | None = None,
                    unit_ids: tuple | None = None, window: int = 200,
                    state_sharding=None) -> Callable:
    """(state, tokens [B, L + 1]) -> (state after one update, scalars, per-layer SparsityStats
    of this step's forward pass). Jitted, donating the state.

    scalars: loss, grad_norm, `loss_finite`, `first_nonfinite` (the state's), and under
    optax.apply_if_finite (`max_skips` given) `update_skipped` and `skipped` (updates skipped so
    far). A step diverges when its loss or gradient norm is not finite; under apply_if_finite,
    when the optimizer stops skipping (more than max_skips non-finite updates in a row): its
    update is then applied. The state's unit histories, if it has them, take this step's batch
    masks (`unit_ids`: per layer the original ids of compacted columns, or None; `window`: the
    off period after which a unit's use counts as a return). `state_sharding` (the state's
    shardings) keeps the new state placed as the old one, so the step can take its own output
    (XLA would otherwise be free to split, e.g., the unit histories like the width)."""
    def loss_fn(params, tokens):
        logits, state = model.apply({"params": params}, tokens[:, :-1],
                                    mutable=["intermediates"])
        # Named scopes mark the step's parts in profiles (bench/step_profile.py, xprof).
        with jax.named_scope("loss"):
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, layer_stats(state.get("intermediates", {}))

    def train_step(state: TrainState, tokens: jax.Array):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, tokens)
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        loss_finite = jnp.isfinite(loss)
        scalars = {"loss": loss, "grad_norm": grad_norm, "loss_finite": loss_finite}
        diverged = ~(loss_finite & jnp.isfinite(grad_norm))
        if max_skips is not None:  # optax.apply_if_finite skipped the update or gave up
            scalars["update_skipped"] = ~opt_state.last_finite
            scalars["skipped"] = opt_state.total_notfinite
            diverged = ~opt_state.last_finite & (opt_state.notfinite_count > max_skips)
        first = jnp.where((state.first_nonfinite < 0) & diverged, state.step,
                          state.first_nonfinite)
        scalars["first_nonfinite"] = first
        units = state.units
        if units:
            ids = unit_ids or (None,) * len(units)
            with jax.named_scope("unit_histories"):
                units = history.update_all(units, stats, ids, state.step, loss_finite, window)
        return TrainState(state.step + 1, params, opt_state, first, units), scalars, stats

    return jax.jit(train_step, donate_argnums=0, out_shardings=(state_sharding, None, None))


@jax.jit
def all_finite(state: TrainState) -> jax.Array:
    """Whether every parameter and optimizer value is finite (before a checkpoint is written)."""
    leaves = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_eval_step(model: Transformer) -> Callable:
    """(params, tokens [B, L + 1]) -> (summed cross-entropy, correct next-token predictions)."""
    @jax.jit
    def eval_step(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        targets = tokens[:, 1:]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == targets)
        return loss, correct

    return eval_step


def evaluate(eval_step, params, batches: Iterable[np.ndarray], place=jnp.asarray,
             fetch=jax.device_get) -> dict[str, float]:
    """Mean next-token loss and accuracy over every target token of `batches` (global batches:
    `place` puts one on the devices, `fetch` brings results to every host)."""
    sums, count = [], 0
    for tokens in batches:
        sums.append(eval_step(params, place(tokens)))  # queued; fetched once below
        count += tokens.shape[0] * (tokens.shape[1] - 1)
    sums = fetch(sums)
    loss_sum = sum(float(loss) for loss, _ in sums)
    correct = sum(int(hits) for _, hits in sums)
    return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}


@dataclasses.dataclass(frozen=True)
class Program:
    """What one set of layer widths compiles to."""
    model: Transformer
    train_step: Callable  # compiled for the state and batch it was built with
    eval_step: Callable


# XLA wraps most of a GPU step in command buffers (CUDA graphs), which a trace shows as one opaque
# kernel; a step compiled without them shows every kernel to the profiler, at the same speed.
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}


def build_program(config: Config, vocab_size: int, optimizer, pruning: Pruning | None,
                  state: TrainState, tokens: jax.Array, tracing,
                  compiler_options: dict | None = None) -> Program:
    """The model at `pruning`'s widths (None: the configured ones), its train step compiled for
    `state` and `tokens` inside the `tracing` context (the device mesh) with XLA's
    `compiler_options`, and its evaluation step, which runs the un-instrumented model."""
    model = Transformer(model_config(config, vocab_size, pruning=pruning))
    t = config.train
    max_skips = t.max_skips if t.on_nonfinite == "skip" else None
    unit_ids = pruning.compacted_ids() if pruning is not None else None
    with tracing():
        train_step = make_train_step(
            model, optimizer, max_skips=max_skips, unit_ids=unit_ids, window=t.prune_window,
            state_sharding=jax.tree.map(lambda x: x.sharding, state),
        ).lower(state, tokens).compile(compiler_options)
    eval_model = Transformer(model_config(config, vocab_size, instrument="off", pruning=pruning))
    return Program(model, train_step, make_eval_step(eval_model))
