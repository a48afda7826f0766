"""The kernel benchmark runs every variant and reports ratios against XLA's plain expression."""

import contextlib

import pytest

from relu_sparsity.bench import kernels as bench


def test_bench_rows_and_table():
    rows = bench.run(["256x32x100"], seq_len=64, dtype="float32", repeats=1)
    variants = [r["variant"] for r in rows]
    assert variants[0] == "xla dot+bias+relu" and rows[0]["ratio"] == 1.0
    assert "xla relu+stats (reference)" in variants and "reference no stats" in variants
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "256x32x100" in table


def test_bench_times_a_variant_only_once_it_is_exact(monkeypatch, tmp_path, capsys):
    from relu_sparsity import cli

    real = bench.variants

    def variants(seq_len, backends=None):  # the reference's h, one unit off
        out = real(seq_len, backends)
        out["reference no stats"] = lambda x, w1, b1: real(seq_len)["reference no stats"](
            x, w1, b1)[0].at[:, 0].add(1.0)
        return out

    monkeypatch.setattr(bench, "variants", variants)
    out = tmp_path / "rows.json"
    assert cli.main(["bench", "--shapes", "256x32x100", "--backends", "reference",
                     "--repeats", "1", "--out", str(out)]) == 1
    rows = {r["variant"]: r for r in __import__("json").loads(out.read_text())["rows"]}
    assert "ms" not in rows["reference no stats"]
    assert "is not relu(x @ w1 + b1)" in rows["reference no stats"]["error"]
    assert "ms" in rows["xla relu+stats (reference)"]
    text = capsys.readouterr()
    assert "failed: reference no stats" in text.out and "1 variant(s) failed" in text.err


def test_bench_times_only_the_backends_asked_for(monkeypatch):
    monkeypatch.setattr(bench, "compiled_backends", lambda: ["triton"])
    assert list(bench.variants(64, ["triton"])) == ["xla dot+bias+relu", "triton no stats",
                                                    "triton +stats"]
    assert len(bench.variants(64)) == 5  # XLA's, then the reference and triton, each twice
    # A backend not compiled here is refused before any timing.
    with pytest.raises(ValueError, match="--backends mosaic_gpu: not compiled here"):
        bench.run(["256x32x100"], seq_len=64, dtype="float32", repeats=1,
                  backends=["mosaic_gpu"])


def test_bench_presets_time_the_shapes_their_runs_give_the_kernel(tmp_path):
    import json

    from relu_sparsity import cli

    out = tmp_path / "rows.json"
    assert cli.main(["bench", "--presets", "tiny", "--shapes", "256x32x100", "--backends",
                     "reference", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    assert shapes == ["256x32x100", *bench.preset_shapes(["tiny"])]
    assert {r["variant"] for r in rows} == {"xla dot+bias+relu", "reference no stats",
                                            "xla relu+stats (reference)"}


@pytest.mark.parametrize("shape", ["256x32", "axbxc", "1x2x3x4"])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="TxDxF"):
        bench.parse_shape(shape)


def test_seq_len_must_divide_tokens():
    with pytest.raises(ValueError, match="--seq-len 64"):
        bench.run(["100x8x8"], seq_len=64, dtype="float32", repeats=1)


@pytest.mark.parametrize("tokens, want", [(8192, 512), (256, 256), (1000, 500), (97, 97)])
def test_default_seq_len_divides_tokens(tokens, want):
    assert bench.seq_len_for(tokens, None) == want


TINY = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
        "model.seq_len=16", "train.batch_size=2", "data.vocab_size=300"]


def test_train_step_bench_in_process():
    from relu_sparsity.bench import train_step

    row = train_step.time_train_step("tiny", "xla", TINY, rounds=1, steps_per_round=2)
    assert row["ms"] > 0 and row["instrument"] == "xla" and row["kernel"] == "reference"


def test_train_step_bench_isolated_reports_ratios_and_failures():
    from relu_sparsity.bench import train_step

    rows = train_step.run_isolated("tiny", ["off", "fused"], TINY, rounds=1, steps_per_round=1)
    assert rows[0]["instrument"] == "off" and rows[0]["ratio"] == 1.0
    # No fused kernel on a CPU: the row says it failed, it does not time something else.
    assert "ms" not in rows[1] and rows[1]["error"].startswith("ValueError: instrument 'fused'")
    assert "failed" in train_step.format_table(rows)


@pytest.mark.parametrize("prune", ["mask", "compact"])
def test_train_step_bench_after_pruning(prune):
    from relu_sparsity.bench import train_step

    row = train_step.time_train_step("tiny", "xla", TINY, rounds=1, steps_per_round=1,
                                     prune=prune, keep_fraction=0.7)
    assert row["prune"] == prune and row["d_ff"] == [45, 45] and row["ms"] > 0
    with pytest.raises(ValueError, match="keep_fraction"):
        train_step.random_pruning(prune, (64,), 0.0)


def test_timing_spread_and_environment(tmp_path):
    import json

    from relu_sparsity.bench.timing import Timing, environment, measure

    t = Timing.from_rounds([4.0, 1.0, 3.0, 2.0, 10.0])
    assert (t.min_ms, t.median_ms, t.iqr_ms, t.rounds) == (1.0, 3.0, 2.0, 5)  # q1 2, q3 4
    calls = []
    timing = measure(lambda: calls.append(1), rounds=3, calls_per_round=2)
    assert len(calls) == 4 and timing.rounds == 3  # a warm-up round, then the timed ones
    rows = bench.main(["64x16x32"], seq_len=16, dtype="float32", repeats=2,
                      out=str(tmp_path / "b.json"))
    assert all(r["min_ms"] <= r["ms"] and r["iqr_ms"] >= 0 for r in rows)
    saved = json.loads((tmp_path / "b.json").read_text())
    env = environment()
    from relu_sparsity.runs.metadata import git_commit

    assert saved["jax"] == env["jax"] and saved["device"] == env["device"]
    assert saved["commit"] == git_commit() != "unknown"


def test_rows_say_which_tiles_a_fused_backend_ran_with(monkeypatch):
    # Looked up for the H200 when no GPU is here (backends.device_kind).
    assert bench.variant_tiles("mosaic_gpu +stats", (8192, 512, 8192), "bfloat16") == "tuned"
    # ... and mosaic_gpu's with what its edges copy (none at a TMA-addressable shape).
    assert bench.variant_tiles("mosaic_gpu no stats", (6000, 512, 4100), "bfloat16") \
        == "nearest 8192x512x8192; pads w1, slices h"
    assert bench.variant_tiles("mosaic_gpu no stats", (4096, 768, 3000), "bfloat16") \
        == "nearest 8192x512x8192; pads w1, h untiled"
    assert bench.variant_tiles("mosaic_gpu no stats", (4096, 768, 3040), "bfloat16") \
        == "nearest 8192x512x8192; pads w1"  # h through 64-byte swizzled tiles
    assert bench.variant_tiles("mosaic_gpu no stats", (6000, 512, 8192), "bfloat16") \
        == "nearest 8192x512x8192"
    assert bench.variant_tiles("triton +stats", (8192, 512, 8192), "float32") == "default"
    assert bench.variant_tiles("xla dot+bias+relu", (8192, 512, 8192), "bfloat16") is None
    # pallas_tpu's tiles are filed under "tpu" whatever the TPU's own kind.
    from relu_sparsity.kernels import backends
    monkeypatch.setattr(backends, "device_kind", lambda platform: "TPU v5 lite")
    assert bench.variant_tiles("pallas_tpu +stats", (8192, 512, 8192), "bfloat16") == "tuned"
    rows = bench.run(["256x32x100"], seq_len=64, dtype="float32", repeats=1)
    assert all("tiles" in r for r in rows)


def test_build_program_hands_its_compiler_options_to_xla():
    """A misspelt XLA option is refused by XLA itself: the options reach the compiler."""
    import jax.numpy as jnp

    from relu_sparsity.model import Transformer
    from relu_sparsity.train import steps
    from relu_sparsity.train.config import preset

    config = preset("tiny", TINY)
    model = Transformer(steps.model_config(config, 300))
    optimizer = steps.make_optimizer(config)
    state = steps.init_state(model, optimizer, config)
    tokens = jnp.zeros((2, 17), jnp.int32)
    build = lambda options: steps.build_program(  # noqa: E731
        config, 300, optimizer, None, state, tokens, contextlib.nullcontext, options)
    build(steps.NO_COMMAND_BUFFERS)
    with pytest.raises(Exception, match="xla_gpu_enable_command_bufferZ"):
        build({"xla_gpu_enable_command_bufferZ": ""})


def test_plain_baseline_has_the_transformers_shape():
    """The plain Flax model of a configuration holds as many parameters, of the same shapes
    per kind, as the Transformer of that configuration."""
    import jax
    import numpy as np

    from relu_sparsity.bench.baseline import plain_model
    from relu_sparsity.model import Transformer
    from relu_sparsity.train.config import preset
    from relu_sparsity.train.steps import model_config

    config = preset("tiny", TINY)
    tokens = jax.ShapeDtypeStruct((1, 16), np.int32)
    init = lambda m: jax.eval_shape(m.init, jax.random.key(0), tokens)["params"]  # noqa: E731
    plain, ours = init(plain_model(config, 300)), init(Transformer(model_config(config, 300)))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(plain) == count(ours) > 0
    assert plain["block_1"]["mlp"]["up"]["kernel"].shape == ours["block_1"]["mlp"]["wi"].shape
    assert plain["embed"]["embedding"].shape == ours["embed"]["embedding"].shape


def test_train_step_bench_against_the_baseline_with_profiles(tmp_path):
    from relu_sparsity.bench import step_profile, train_step

    base = train_step.time_baseline_step("tiny", TINY, rounds=1, steps_per_round=1,
                                         profile_dir=str(tmp_path / "plain"))
    assert base["instrument"] == train_step.BASELINE and base["ms"] > 0
    # The baseline's profile reads as a profiled run's does, its parts named as ours.
    summary = step_profile.profile_run(tmp_path / "plain")
    assert summary["command_buffers"] == "off" and summary["steps"] == 3
    assert summary["parts"]["MLP"]["backward"] > 0 and summary["attributed"] > 0.75
    off = {"config": "tiny", "instrument": "off", "prune": "none", "history": False,
           "ms": 2 * base["ms"], "d_ff": [64, 64], "param_widths": [64, 64]}
    failed = {"config": "tiny", "instrument": "fused", "prune": "none", "history": True,
              "error": "ValueError: no fused backend"}
    rows = [base, off, failed]
    train_step.add_ratios(rows, "off", "ratio", "memory_ratio")
    train_step.add_ratios(rows, train_step.BASELINE, "baseline_ratio", "baseline_memory_ratio")
    assert base["baseline_ratio"] == 1.0 and off["baseline_ratio"] == 2.0
    assert base["ratio"] == 0.5 and "baseline_ratio" not in failed
    table = train_step.format_table(rows)
    assert "/ baseline" in table and "| 2.000 |" in table
    assert len({line.count("|") for line in table.splitlines()}) == 1  # every row's cells
