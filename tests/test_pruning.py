"""Dead-unit pruning: a compacted model equals the masked model it came from (loss and the next
update), the loop's mask / compact / random modes, and resume after compaction."""

import json
import shutil
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relu_sparsity.kernels.bits import np_pack_bits, np_unpack_bits
from relu_sparsity.model import Transformer
from relu_sparsity import data
from relu_sparsity.train.config import preset
from relu_sparsity.train.steps import init_state, make_optimizer, make_train_step, model_config
from relu_sparsity.train.trainer import train
from relu_sparsity.train.pruning import choose_units, compact_tree, to_original_ids
from relu_sparsity.runs.checkpoints import read_on_host
from relu_sparsity.runs.folder import RunFolder

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "string.py", "shlex.py"):
        shutil.copy(STDLIB / name, corpus / name)
    out = tmp_path_factory.mktemp("cache") / "cache"
    data.prepare(out, [str(corpus)], vocab_size=512, eval_fraction=0.3)
    return out


def config(cache_dir, *overrides):
    return preset("tiny", [
        f"data.cache={json.dumps(str(cache_dir))}", "data.vocab_size=512", "model.num_layers=2",
        "model.d_model=32", "model.num_heads=2", "model.d_ff=[96,70]", "model.seq_len=16",
        "train.batch_size=4", "train.steps=14", "train.warmup_steps=2", "train.log_every=2",
        "train.eval_every=7", "train.eval_batches=1", "train.checkpoint_every=5",
        "train.peak_lr=1e-2", *overrides])


def test_choose_units_modes():
    used = [np.zeros(70, bool), np.zeros(40, bool)]
    used[0][[1, 5, 69]] = True
    used[1][:] = True
    masks = [np_pack_bits(u) for u in used]
    kept = choose_units("mask", masks, (70, 40), step=3, seed=0)
    assert [k.tolist() for k in kept.keep] == [[1, 5, 69], list(range(40))]
    rand = choose_units("random", masks, (70, 40), step=3, seed=0)
    assert rand.widths == (3, 40) and np.all(np.diff(rand.keep[0]) > 0)
    assert rand.keep[0].tolist() != [1, 5, 69]  # 1 in C(70, 3) chance to coincide: seeded
    with pytest.raises(ValueError, match="prune mode"):
        choose_units("drop", masks, (70, 40), step=3, seed=0)
    # Compact ids back to original ids.
    compact = np_pack_bits(np.array([True, False, True]))
    np.testing.assert_array_equal(np_unpack_bits(to_original_ids(compact, kept.keep[0], 70), 70),
                                  np.isin(np.arange(70), [1, 69]))


@pytest.mark.parametrize("multiple", [1, 16])
def test_compacted_equals_masked_loss_and_next_update(cache_dir, multiple):
    # multiple 16: the compacted widths round up, with zero padding units that must stay dead
    # (the masked model computes its live units at the same padded width).
    cfg = config(cache_dir, f"train.prune_multiple={multiple}")
    optimizer = make_optimizer(cfg)
    full = Transformer(model_config(cfg, 512))
    state = init_state(full, optimizer, cfg)
    tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 512)
    step = make_train_step(full, optimizer)
    for _ in range(3):  # Adam moments that are not zero
        state, _, _ = step(state, tokens)
    rng = np.random.default_rng(0)
    masks = [np_pack_bits(rng.random(w) < 0.6) for w in (96, 70)]
    pruning = choose_units("mask", masks, (96, 70), step=3, seed=0)
    compact_pruning = choose_units("compact", masks, (96, 70), step=3, seed=0,
                                   multiple=multiple)
    widths = compact_pruning.padded_widths
    kept = compact_pruning.widths
    assert all(w % multiple == 0 and 0 <= w - k < multiple for w, k in zip(widths, kept))
    assert multiple == 1 or widths != kept  # the padded case really pads

    masked = Transformer(model_config(cfg, 512, pruning=pruning))
    compacted = Transformer(model_config(cfg, 512, pruning=compact_pruning))
    compact_state = compact_tree(state, pruning.keep, widths)
    assert compact_state.params["block_0"]["mlp"]["wi"].shape == (32, widths[0])
    assert compact_state.params["block_1"]["mlp"]["wo"].shape == (widths[1], 32)
    mu = compact_state.opt_state[1][0].mu  # clip, then adamw's scale_by_adam state
    assert mu["block_0"]["mlp"]["bi"].shape == (widths[0],)

    # (The step donates its input, and the compacted state shares leaves with `state`.)
    new_masked, s_masked, _ = make_train_step(masked, optimizer)(
        jax.tree.map(jnp.copy, state), tokens)
    new_compact, s_compact, _ = make_train_step(compacted, optimizer)(compact_state, tokens)
    np.testing.assert_allclose(s_masked["loss"], s_compact["loss"], rtol=1e-6)
    np.testing.assert_allclose(s_masked["grad_norm"], s_compact["grad_norm"], rtol=1e-5)
    # The next update of the kept units is the same; everything else is untouched by pruning.
    got = compact_tree(new_masked, pruning.keep, widths)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(new_compact.params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The padding units stayed exactly zero (dead) through the update.
    for layer, k in enumerate(kept):
        mlp = new_compact.params[f"block_{layer}"]["mlp"]
        assert not np.any(mlp["wi"][:, k:]) and not np.any(mlp["bi"][k:])
        assert not np.any(mlp["wo"][k:])


def losses(run):
    return [(r["step"], r["loss"]) for r in RunFolder(run).read_metrics()]


def test_loop_mask_compact_random(cache_dir, tmp_path):
    runs = {}
    for mode in ("none", "mask", "compact", "random"):
        runs[mode] = tmp_path / mode
        extra = [] if mode == "none" else [f"train.prune={mode}", "train.prune_at=6",
                                           "train.prune_multiple=16"]
        train(config(cache_dir, *extra), runs[mode], progress=False)
    base, masked, compact = (RunFolder(runs[m]).read_metrics() for m in ("none", "mask",
                                                                        "compact"))
    # Identical up to the prune step; mask and compact agree after it too.
    assert [r["loss"] for r in base if r["step"] <= 6] == \
        [r["loss"] for r in masked if r["step"] <= 6]
    assert len(masked) == len(compact)
    for a, b in zip(masked, compact, strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert [layer["d_ff"] for layer in a["layers"]] == [layer["d_ff"] for layer in b["layers"]]
    pruned = next(r for r in compact if "pruned" in r)
    assert pruned["step"] == 6 and pruned["pruned"]["mode"] == "compact"
    kept = pruned["pruned"]["kept"]
    assert pruned["pruned"]["padded"] == [min(w, -(-k // 16) * 16)
                                          for k, w in zip(kept, (96, 70))]
    after = [r for r in compact if r["step"] > 6]
    assert all([layer["d_ff"] for layer in r["layers"]] == kept for r in after)
    assert [layer["d_ff"] for layer in compact[0]["layers"]] == [96, 70]
    # The prune step's batch mask decided: kept = its batch use.
    assert kept == [round(layer["batch_use"] * w) for layer, w in zip(pruned["layers"], (96, 70))]
    # Masks stay in original ids: the original width's words, and no pruned unit ever on again,
    # in every mode.
    for mode in ("mask", "compact", "random"):
        folder = RunFolder(runs[mode])
        kept_ids = [np.isin(np.arange(w), ids) for ids, w in zip(
            pruned_units(folder, mode), (96, 70), strict=True)]
        for step in folder.mask_steps():
            for layer, (words, w) in enumerate(zip(folder.read_masks(step), (96, 70),
                                                   strict=True)):
                assert words.shape == (1, (w + 31) // 32)
                if step > 6:
                    assert not (np_unpack_bits(words[0], w) & ~kept_ids[layer]).any(), mode
    # The random control keeps as many units per layer, but others.
    rand = next(r for r in RunFolder(runs["random"]).read_metrics() if "pruned" in r)
    assert rand["pruned"]["kept"] == kept
    # The compacted run's report on one base, by hand from its metrics.jsonl: Table 1's window is
    # after the prune step, Per-Batch of the kept width and of the original width.
    from relu_sparsity.report import used_units, write_report

    window = [r for r in compact if r["step"] > 6 and r.get("layers")][-5:]
    use = [np.mean([r["layers"][i]["batch_use"] for r in window]) for i in range(2)]
    table1 = write_report([runs["compact"]]).read_text().split("### Table 2")[0]
    for i, (u, k, w) in enumerate(zip(use, kept, (96, 70))):
        row = next(line for line in table1.splitlines() if line.startswith(f"| {i} | "))
        assert f" | {100 * u:.1f} | " in row and row.endswith(f" | {100 * u * k / w:.1f} |")
    assert f"{window[0]['step']}-{window[-1]['step']}, after the prune step 6" in table1
    assert used_units(compact, 5) == pytest.approx([u * k for u, k in zip(use, kept)])


def pruned_units(folder: RunFolder, mode: str) -> list[np.ndarray]:
    """The kept unit ids per layer, as the last checkpoint recorded them."""
    from relu_sparsity.train.pruning import Pruning

    _, meta = read_on_host(folder.checkpoints, folder.checkpoint_steps()[-1])
    pruning = Pruning.from_state_dict(meta["pruning"])
    assert pruning.mode == mode
    return [np.asarray(k) for k in pruning.keep]


@pytest.mark.parametrize("mode,stop_at", [("compact", 8), ("mask", 8), ("compact", 3)])
def test_resume_after_pruning(cache_dir, tmp_path, mode, stop_at):
    # Stopped after the prune step (the checkpoint holds pruned state) or before it.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = [f"train.prune={mode}", "train.prune_at=4"]
    train(config(cache_dir, *overrides), straight, progress=False)
    train(config(cache_dir, *overrides), resumed, progress=False, max_steps=stop_at)
    assert RunFolder(resumed).checkpoint_steps()[-1] == stop_at
    train(config(cache_dir, *overrides), resumed, progress=False)

    def strip(records):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    assert strip(RunFolder(resumed).read_metrics()) == strip(RunFolder(straight).read_metrics())


def test_bad_prune_config(cache_dir):
    with pytest.raises(ValueError, match="prune_at"):
        config(cache_dir, "train.prune=mask", "train.prune_at=20")
    with pytest.raises(ValueError, match="batch mask"):
        config(cache_dir, "train.prune=mask", "train.prune_at=2", "instrument=off")
    with pytest.raises(ValueError, match="train.prune"):
        config(cache_dir, "train.prune=half")


SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=[96,70]",
         "model.seq_len=16", "train.batch_size=4", "train.steps=12", "train.warmup_steps=2",
         "train.log_every=2", "train.eval_every=6", "train.eval_batches=1",
         "train.checkpoint_every=6", "data.vocab_size=512"]


def test_masking_experiment_cli(cache_dir, tmp_path, capsys):
    from relu_sparsity import cli

    out = tmp_path / "masking"
    assert cli.main(["experiment", "masking", "--out", str(out), "--cache", str(cache_dir),
                     "--prune-at", "4", "--no-progress", *SMALL]) == 0
    table = (out / "masking.md").read_text()
    for name in ("baseline", "mask", "compact", "random"):
        assert f"| {name} |" in table
        assert (out / name / "metrics.jsonl").exists()
    assert "Batch Use (%)" in (out / "tables.md").read_text()  # the comparison of the 4 runs
    assert (out / "plots" / "loss.png").stat().st_size > 5000
    # The masked runs keep the same count; the baseline keeps all.
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "| all |" in rows["baseline"]
    assert rows["mask"].split("|")[2] == rows["compact"].split("|")[2] == rows["random"].split("|")[2]


def test_capacity_experiment_and_widths_from(cache_dir, tmp_path):
    from relu_sparsity import cli
    from relu_sparsity.report import used_units
    from relu_sparsity.runs.reader import read_metrics as load_metrics

    out = tmp_path / "capacity"
    assert cli.main(["experiment", "capacity", "--out", str(out), "--cache", str(cache_dir),
                     "--no-progress", *SMALL]) == 0
    used1 = [max(1, round(u)) for u in used_units(load_metrics(out / "round1"), 5)]
    round2 = load_metrics(out / "round2")
    assert [layer["d_ff"] for layer in round2[0]["layers"]] == used1
    assert "Table 4" in (out / "capacity.md").read_text()
    # The same widths by hand: train --widths-from.
    run = tmp_path / "r2"
    assert cli.main(["train", "--run-dir", str(run), "--cache", str(cache_dir), "--no-progress",
                     "--no-report", "--widths-from", str(out / "round1"), *SMALL]) == 0
    assert [layer["d_ff"] for layer in load_metrics(run)[0]["layers"]] == used1
