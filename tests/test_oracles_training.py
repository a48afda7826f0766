"""The training loop's safeguards and orderings against independent computations: the finiteness
check before a checkpoint reads the Adam moments, AdamW decays exactly the listed parameters,
a prune across devices keeps the union of their batch masks, and the evaluation at step s sees
the parameters before step s's update."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.data import TokenCache
from relu_sparsity.kernels import SparsityStats
from relu_sparsity.kernels.bits import np_pack_bits
from relu_sparsity.model import Transformer
from relu_sparsity.runs.checkpoints import read_on_host
from relu_sparsity.runs.folder import RunFolder
from relu_sparsity.train import steps
from relu_sparsity.train.config import preset
from relu_sparsity.train.metrics import UnitStates, layer_records
from relu_sparsity.train.pruning import Pruning
from relu_sparsity.train.trainer import Diverged, Trainer

VOCAB = 64
TINY = ["model.num_layers=1", "model.d_model=8", "model.num_heads=2", "model.d_ff=32",
        "model.seq_len=4", f"data.vocab_size={VOCAB}", "model.tie_embeddings=false"]


def tiny_state(*overrides: str):
    """(config, optimizer, the state at step 0 as host arrays) of a one-layer model."""
    config = preset("tiny", [*TINY, *overrides])
    model = Transformer(steps.model_config(config, VOCAB))
    optimizer = steps.make_optimizer(config)
    state = jax.jit(lambda: steps.init_state(model, optimizer, config,
                                             model.config.layer_widths()))()
    return config, optimizer, jax.device_get(state)


@pytest.fixture(scope="module")
def tiny():
    return tiny_state()


def path_name(path) -> str:
    """'block_0/mlp/wi' for a parameter's key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def poison(tree, where: str, value: float):
    """`tree` (host arrays) with the one floating leaf whose path ends in `where` set to
    `value`."""
    hits = []

    def put(path, leaf):
        if path_name(path).endswith(where) and np.issubdtype(leaf.dtype, np.floating):
            hits.append(path_name(path))
            return np.full_like(leaf, value)
        return leaf

    out = jax.tree_util.tree_map_with_path(put, tree)
    assert len(hits) == 1, hits
    return out


# --- finiteness before a checkpoint ----------------------------------------------------------

MOMENTS = [("mu/block_0/mlp/wi", math.nan), ("nu/block_0/attn/qkv/kernel", math.inf),
           ("mu/embed/embedding", -math.inf), ("nu/ln_final/scale", math.nan)]


@pytest.mark.parametrize("where, value", MOMENTS, ids=[w for w, _ in MOMENTS])
def test_all_finite_reads_each_adam_moment(tiny, where, value):
    """all_finite on a state whose parameters are all finite and one Adam moment is not,
    against numpy's isfinite over every leaf."""
    _, _, state = tiny
    bad = state.replace(opt_state=poison(state.opt_state, where, value))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(bad.params))
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(bad.opt_state))
    assert bool(steps.all_finite(state))
    assert not bool(steps.all_finite(bad))


def saving_trainer(state):
    """A Trainer stand-in for Trainer.save: one process, a checkpoint writer that records."""
    saved = []
    return SimpleNamespace(
        state=state, parallel=SimpleNamespace(fetch=jax.device_get),
        checkpoints=SimpleNamespace(save=lambda step, state, meta: saved.append(step)),
        unit_states=[UnitStates(32)], pruning=None,
        diverged=lambda first, step, what="": Diverged(f"step {first}: {what}")), saved


def test_a_state_with_a_non_finite_moment_is_never_checkpointed(tiny):
    """Trainer.save writes a finite state and refuses one whose parameters are finite and whose
    second moment of one MLP weight is NaN (Diverged, nothing written)."""
    _, _, state = tiny
    good, saved = saving_trainer(state)
    Trainer.save(good, 3)
    assert saved == [3]
    bad, saved = saving_trainer(state.replace(
        opt_state=poison(state.opt_state, "nu/block_0/mlp/wo", math.nan)))
    with pytest.raises(Diverged, match="optimizer state"):
        Trainer.save(bad, 3)
    assert saved == []


# --- weight decay ----------------------------------------------------------------------------

DECAYED = ["block_0/attn/qkv/kernel", "block_0/attn/out/kernel", "block_0/mlp/wi",
           "block_0/mlp/wo", "embed/embedding", "unembed/kernel"]
KEPT = ["block_0/attn/out/bias", "block_0/ln_attn/scale", "block_0/ln_attn/bias",
        "block_0/ln_mlp/scale", "block_0/ln_mlp/bias", "block_0/mlp/bi", "block_0/mlp/bo",
        "ln_final/scale", "ln_final/bias", "unembed/bias", "block_0/attn/qkv/bias",
        "pos_embed"]


@pytest.fixture(scope="module")
def decay_steps(tiny):
    """Per parameter name, whether AdamW's update with zero gradients moved it by
    -lr * weight_decay * p (True), left it (False) or neither (None)."""
    # Every value non-zero (biases start at 0, where a decay would not show).
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: rng.uniform(0.5, 1.5, p.shape).astype(p.dtype),
                          tiny[2].params)
    config = preset("tiny", [*TINY, "train.weight_decay=0.5", "train.warmup_steps=0",
                             "train.peak_lr=0.1", "train.clip_norm=0"])
    optimizer = steps.make_optimizer(config)
    lr = steps.learning_rate(config, 0)
    assert lr > 0
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    decided = {}
    for (path, p), u in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(updates), strict=True):
        p, u = np.asarray(p, np.float64), np.asarray(u, np.float64)
        if np.abs(u).max() > 0 and np.allclose(u, -lr * 0.5 * p, rtol=1e-5, atol=0):
            decided[path_name(path)] = True
        elif not np.any(u):
            decided[path_name(path)] = False
        else:
            decided[path_name(path)] = None
    return decided


def test_weight_decay_lists_name_every_parameter(decay_steps):
    """The lists below name each parameter of the model once."""
    named = DECAYED + KEPT
    assert sorted(named) == sorted(decay_steps) and len(set(named)) == len(named)


@pytest.mark.parametrize("name", DECAYED)
def test_weight_decay_decays_the_weight_matrices(decay_steps, name):
    """Kernels, MLP weights and embeddings move by -lr * wd * p under a zero gradient."""
    assert decay_steps[name] is True


@pytest.mark.parametrize("name", KEPT)
def test_weight_decay_keeps_biases_and_layer_norms(decay_steps, name):
    """Biases and LayerNorm parameters do not move under a zero gradient."""
    assert decay_steps[name] is False


def test_weight_decay_of_a_llama_layout_model_by_name():
    """The gated MLP's three matrices and the q / kv projections decay; RMSNorm scales and the
    attention biases do not (a zero gradient's update, as above, on every parameter)."""
    config = preset("tiny", [*TINY, "model.mlp=gated", "model.norm=rmsnorm",
                             "model.positions=rope", "model.num_kv_heads=1",
                             "train.weight_decay=0.5", "train.warmup_steps=0",
                             "train.peak_lr=0.1", "train.clip_norm=0"])
    model = Transformer(steps.model_config(config, VOCAB))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda p: jnp.full_like(p, 1.0), params)
    optimizer = steps.make_optimizer(config)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params),
                                  params)
    moved = {path_name(path) for path, u in jax.tree_util.tree_leaves_with_path(updates)
             if np.any(np.asarray(u))}
    assert moved == {"block_0/attn/q/kernel", "block_0/attn/kv/kernel",
                     "block_0/attn/out/kernel", "block_0/mlp/wg", "block_0/mlp/wu",
                     "block_0/mlp/wd", "embed/embedding", "unembed/kernel"}


# --- prune across devices --------------------------------------------------------------------


def device_stats(units_per_device: list[set[int]], width: int, seq_len: int = 3
                 ) -> SparsityStats:
    """The global batch's statistics, one sequence per device: each device's sequence uses its
    units on its first token only."""
    n = len(units_per_device)
    used = np.zeros((n * seq_len, width), bool)
    for d, units in enumerate(units_per_device):
        used[d * seq_len, sorted(units)] = True
    seq_count = used.reshape(n, seq_len, width).sum(axis=1).astype(np.int32)
    return SparsityStats(used.sum(axis=1).astype(np.int32), seq_count,
                         np_pack_bits(seq_count > 0), None)


@pytest.mark.parametrize("mode", ["mask", "compact"])
def test_prune_from_two_devices_statistics_keeps_the_union_of_their_units(mode):
    """The loop's prune after two devices each used a different set of units: the kept units
    are the union of the two sets (Python set union), layer by layer."""
    layer_units = [
        [set(range(0, 10)) | {40}, set(range(5, 21)) | {69}],  # overlapping
        [{0, 1, 2}, {31, 32, 33}],  # disjoint, across a word boundary
    ]
    widths = (70, 48)
    stats = [device_stats(units, w) for units, w in zip(layer_units, widths)]
    _, masks = layer_records(stats, [UnitStates(w) for w in widths], None, num_devices=2)
    assert all(m.shape[0] == 2 and not np.array_equal(m[0], m[1]) for m in masks)
    config = preset("tiny", [*TINY, "model.d_ff=[70,48]", "model.num_layers=2",
                             f"train.prune={mode}", "train.prune_at=1",
                             "train.prune_multiple=32"])
    rng = np.random.default_rng(1)
    state = {"params": {f"block_{i}": {"mlp": {"wi": rng.normal(size=(8, w)),
                                               "bi": rng.normal(size=w),
                                               "wo": rng.normal(size=(w, 8))}}
                        for i, w in enumerate(widths)}}
    trainer = SimpleNamespace(config=config, widths=widths, pruning=None, state=state,
                              traced=None, compile=lambda tokens: None,
                              parallel=SimpleNamespace(num_processes=1, state=lambda s: s))
    entry = Trainer.prune(trainer, 1, masks, tokens=None)
    for layer, units in enumerate(layer_units):
        union = sorted(units[0] | units[1])
        assert trainer.pruning.keep[layer].tolist() == union, layer
        assert entry["kept"][layer] == len(union)
    if mode == "compact":  # the compacted wi holds the kept units' columns, then zeros
        wi = state["params"]["block_0"]["mlp"]["wi"]
        got = np.asarray(trainer.state["params"]["block_0"]["mlp"]["wi"])
        union = sorted(layer_units[0][0] | layer_units[0][1])
        np.testing.assert_array_equal(got[:, :len(union)], wi[:, union])
        assert not got[:, len(union):].any()


# --- a run on two simulated devices: the prune and the evaluation order ----------------------

TWO_DEVICES = ["model.num_layers=1", "model.d_model=16", "model.num_heads=2", "model.d_ff=256",
               "model.seq_len=4", "train.batch_size=1", "train.steps=2", "train.warmup_steps=0",
               "train.peak_lr=3e-2", "train.log_every=1", "train.eval_every=1",
               "train.eval_batches=1", "train.checkpoint_every=1", "train.prune=mask",
               "train.prune_at=0", "train.prune_multiple=32", "data.vocab_size=512"]


@pytest.fixture(scope="module")
def two_device_run(cache_dir, tmp_path_factory):
    """(config, run folder) of a run on two CPU devices, one sequence of 4 tokens each at 256
    units (so each device leaves different units unused), pruned (mask) at step 0, evaluated
    at steps 0 and 1, checkpointed after every step, at a learning rate that moves the loss."""
    overrides = [f"data.cache={json.dumps(str(cache_dir))}", *TWO_DEVICES]
    script = ("import json, sys\n"
              "import jax\n"
              "from relu_sparsity.train.config import preset\n"
              "from relu_sparsity.train.trainer import train\n"
              "assert jax.device_count() == 2, jax.devices()\n"
              "train(preset('tiny', json.loads(sys.argv[2])), sys.argv[1], progress=False)\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    run = tmp_path_factory.mktemp("two_devices") / "run"
    done = subprocess.run([sys.executable, "-c", script, str(run), json.dumps(overrides)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return preset("tiny", overrides), RunFolder(run)


def mask_rows(words: np.ndarray, width: int) -> np.ndarray:
    """bool [n, width] from a mask file's uint32 rows, by numpy's little-endian bit order."""
    return np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :width].astype(bool)


def test_a_run_on_two_devices_prunes_to_the_union_of_their_masks(two_device_run):
    """The units kept at step 0 are the numpy OR of the two rows of step 0's mask file, which
    differ: more than either row holds."""
    _, folder = two_device_run
    rows = mask_rows(folder.read_masks(0)[0], 256)
    assert rows.shape == (2, 256) and (rows[0] != rows[1]).any()
    union = rows[0] | rows[1]
    assert union.sum() > max(rows[0].sum(), rows[1].sum())
    records = folder.read_metrics()
    assert records[0]["pruned"]["kept"] == [int(union.sum())]
    assert records[1]["layers"][0]["d_ff"] == int(union.sum())
    later = mask_rows(folder.read_masks(1)[0], 256)
    assert not (later & ~union).any()  # after the prune only kept units are used


def hand_eval(model: Transformer, params, batches) -> float:
    """Mean next-token cross-entropy by numpy's log-softmax over every target token."""
    total, count = 0.0, 0
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    for tokens in batches:
        logits = np.asarray(forward(params, jnp.asarray(tokens[:, :-1])), np.float64)
        targets = tokens[:, 1:]
        top = logits.max(axis=-1, keepdims=True)
        log_z = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
        picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        total += float((log_z - picked).sum())
        count += targets.size
    return total / count


def test_the_evaluation_at_step_s_sees_the_parameters_before_its_update(two_device_run,
                                                                        cache_dir):
    """Step 0's eval loss equals a numpy evaluation of the initial model on the global eval
    batch, and step 1's one of the (pruned) model checkpointed after 1 update."""
    config, folder = two_device_run
    records = folder.read_metrics()
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 1]
    cache = TokenCache(cache_dir)
    batches = list(cache.eval_batches(1, 2, 4))  # 2 devices x 1 sequence
    model = Transformer(steps.model_config(config, cache.vocab_size, instrument="off"))
    initial = jax.jit(model.init)(jax.random.key(config.train.seed),
                                  jnp.zeros((1, 4), jnp.int32))["params"]
    state, meta = read_on_host(folder.checkpoints, 1)
    pruned = Transformer(steps.model_config(config, cache.vocab_size, instrument="off",
                                            pruning=Pruning.from_state_dict(meta["pruning"])))
    want = [hand_eval(model, initial, batches), hand_eval(pruned, state["params"], batches)]
    assert abs(want[1] - want[0]) > 1e-3  # the update moves the eval loss
    got = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert got == pytest.approx(want, rel=1e-5)
