"""`relu-sparsity tune`: every candidate checked exact before it is timed, the configured one
always among them, the fastest written to the configuration file; refused where the backend would
only be interpreted. On the CPU through the interpreted pallas_tpu kernel (times meaningless,
the plumbing checked)."""

import functools
import json

import pytest

from relu_sparsity import cli
from relu_sparsity.bench import kernels, tune
from relu_sparsity.kernels.pallas_tpu import kernel as tpu_kernel


def test_candidates_start_with_the_configured_one_and_are_distinct():
    got = tune.candidates("pallas_tpu", tpu_kernel.DEFAULT_CONFIG, limit=5)
    assert got[0] == tpu_kernel.DEFAULT_CONFIG and len(set(got)) == len(got) == 5
    mosaic = tune.candidates("mosaic_gpu", __import__(
        "relu_sparsity.kernels.mosaic_gpu.kernel", fromlist=["x"]).DEFAULT_CONFIG, limit=200)
    assert all(c.wg_dim == "pingpong" or not c.ordered for c in mosaic)


def test_mosaic_candidates_all_run_and_start_from_the_tuned_ones():
    from relu_sparsity.kernels.mosaic_gpu import kernel as mgpu_kernel

    base = mgpu_kernel.DEFAULT_CONFIG
    seeds = tune.tuned_elsewhere("mosaic_gpu", base, "bfloat16")
    assert len(seeds) == 3  # the committed H200 entries (lowering from a CPU looks up the H200)
    got = tune.candidates("mosaic_gpu", base, limit=1000, seeds=seeds)
    assert got[0] == base and len(set(got)) == len(got) > 40
    assert got[1:1 + len(set(seeds) - {base})] == [c for c in dict.fromkeys(seeds) if c != base]
    # None that the kernel would refuse: every one valid and within shared memory, in bf16; in
    # f32 (doubled h staging) fewer rings fit.
    for config in got:
        config.validate()
        mgpu_kernel.check_smem(config, "bfloat16", "bfloat16")
    assert any(c.tile_m == 64 and c.tile_n == 256 for c in got)  # the wider tile is searched
    f32 = tune.candidates("mosaic_gpu", base, limit=1000, dtype="float32")
    assert all(mgpu_kernel.smem_bytes(c, 2, 4) <= mgpu_kernel.SMEM_LIMIT_BYTES for c in f32[1:])


def test_tune_writes_the_fastest_exact_candidate(tmp_path, monkeypatch):
    out = tmp_path / "pallas_tpu.json"
    out.write_text(json.dumps({"tpu": {"1x1x1:bfloat16": {"block_m": 8}}}))
    # One candidate computes wrong statistics: it must be reported and never chosen.
    real_forward = tune.backend_ops("pallas_tpu").forward

    def forward(x, w, b, *, config, **kwargs):
        h, stats = real_forward(x, w, b, config=config, **kwargs)
        if config.block_k == 512:
            stats = stats._replace(token_count=stats.token_count + 1)
        return h, stats

    monkeypatch.setattr(tune.backend_ops("pallas_tpu"), "forward", forward)
    result = tune.main("pallas_tpu", ["64x32x256"], dtype="float32", seq_len=32, limit=3,
                       repeats=1, out=str(out), allow_interpreted=True)
    rows = result["rows"]["64x32x256"]
    assert rows[0]["base"] and len(rows) == 3
    wrong = [r for r in rows if r["config"]["block_k"] == 512]
    assert wrong and all("full-size check failed" in r["error"] for r in wrong)
    saved = json.loads(out.read_text())["tpu"]
    assert saved["1x1x1:bfloat16"] == {"block_m": 8}  # other entries kept
    fastest = min((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    assert saved["64x32x256:float32"] == fastest["config"]
    assert fastest["config"]["block_k"] != 512
    assert result["jax"] and result["backend"] == "pallas_tpu"


def test_tune_refuses_an_interpreted_backend(capsys):
    assert cli.main(["tune", "--backend", "pallas_tpu", "--shapes", "64x32x256"]) == 2
    assert "tune on the device" in capsys.readouterr().err
    with pytest.raises(ValueError, match="TxDxF"):
        tune.main("pallas_tpu", ["64x32"], allow_interpreted=True)


def test_an_untuned_shape_gets_the_nearest_tuned_shapes_tiles():
    from relu_sparsity.kernels import tile_configs
    from relu_sparsity.kernels.mosaic_gpu import kernel as mgpu_kernel
    from relu_sparsity.kernels.mosaic_gpu import ops as mgpu_ops

    keys = ["8192x1024x32768:bfloat16", "8192x2048x16384:bfloat16", "8192x512x8192:bfloat16"]
    nearest = functools.partial(tile_configs.nearest_key, keys, dtype="bfloat16")
    assert nearest((8192, 2048, 16384)) == keys[1]  # a tuned shape: its own
    assert nearest((8192, 1024, 23040)) == keys[0]  # a compacted paper width: 0.51 from it
    assert nearest((6000, 512, 4100)) == keys[2]  # 1.45 from it, 4.45 from the others
    assert nearest((4096, 768, 3000)) == keys[2]
    assert tile_configs.nearest_key(keys, (8192, 512, 8192), "float32") is None
    # Through the backend, with the committed file: tiles tuned at 8192x512x8192, not the default.
    committed = mgpu_ops.tile_config("NVIDIA H200", (8192, 512, 8192), "bfloat16")
    assert mgpu_ops.tile_config("NVIDIA H200", (6000, 512, 4100), "bfloat16") == committed
    assert committed != mgpu_kernel.DEFAULT_CONFIG
    assert mgpu_ops.tile_config("NVIDIA H100", (6000, 512, 4100), "bfloat16") \
        == mgpu_kernel.DEFAULT_CONFIG  # no tuned tiles for that device


def test_preset_shapes_are_the_runs_train_batch_and_compacted_widths():
    # tiny: 16 x 128 tokens, d_model 128, d_ff 1024, prune_multiple 32; 25/50/70/90% of 1024
    # units are 256, 512, 716.8 -> 717 -> 736 and 921.6 -> 922 -> 928 rounded up to 32.
    assert kernels.preset_shapes(["tiny"]) == ["2048x128x1024", "2048x128x256", "2048x128x512",
                                            "2048x128x736", "2048x128x928"]
    # paper8k's full width is paper's 25%: listed once.
    both = kernels.preset_shapes(["paper8k", "paper"])
    assert len(both) == len(set(both)) == 9 and both.count("8192x1024x8192") == 1
    assert "8192x1024x23040" in both  # paper at 70% kept, rounded up to 256


def fake_tuning(monkeypatch, clock_step: float) -> list[str]:
    """tune_shape replaced by one that returns two timed candidates and advances a fake clock
    by clock_step seconds; returns the list of shapes it was called with."""
    calls, now = [], [0.0]

    def tune_shape(backend, shape, dtype, **kwargs):
        calls.append("x".join(map(str, shape)))
        now[0] += clock_step
        return [{"config": {"block_m": 8}, "base": True, "ms": 2.0},
                {"config": {"block_m": 16}, "base": False, "ms": 1.0}]

    monkeypatch.setattr(tune, "tune_shape", tune_shape)
    monkeypatch.setattr(tune.time, "monotonic", lambda: now[0])
    return calls


def test_an_interrupted_tune_keeps_each_finished_shape_and_resumes(tmp_path, monkeypatch):
    out, report = tmp_path / "tiles.json", tmp_path / "report.json"
    calls = fake_tuning(monkeypatch, clock_step=10.0)
    shapes = ["64x32x256", "64x32x512", "64x32x768"]
    kwargs = dict(dtype="float32", seq_len=32, out=str(out), report=str(report),
                  allow_interpreted=True)
    first = tune.main("pallas_tpu", shapes, time_limit=15, **kwargs)
    # Two shapes started before 15 s had passed; the third was not.
    assert calls == shapes[:2] and first["not_tuned"] == shapes[2:]
    saved = json.loads(out.read_text())["tpu"]
    assert saved == {"64x32x256:float32": {"block_m": 16}, "64x32x512:float32": {"block_m": 16}}
    assert list(json.loads(report.read_text())["rows"]) == shapes[:2]
    second = tune.main("pallas_tpu", shapes, resume=True, **kwargs)
    assert calls == shapes and "not_tuned" not in second
    assert list(json.loads(report.read_text())["rows"]) == shapes
    assert "64x32x768:float32" in json.loads(out.read_text())["tpu"]


def test_tune_refuses_a_resume_it_cannot_do(tmp_path, monkeypatch, capsys):
    fake_tuning(monkeypatch, clock_step=1.0)
    with pytest.raises(ValueError, match="--resume needs --report"):
        tune.main("pallas_tpu", ["64x32x256"], resume=True, allow_interpreted=True)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"backend": "triton", "dtype": "float32", "rows": {}}))
    with pytest.raises(ValueError, match="tuned triton in float32"):
        tune.main("pallas_tpu", ["64x32x256"], dtype="float32", report=str(report),
                  resume=True, out=str(tmp_path / "t.json"), allow_interpreted=True)
    assert cli.main(["tune", "--backend", "pallas_tpu"]) == 2
    assert "give --shapes, --presets or both" in capsys.readouterr().err
    assert cli.main(["tune", "--presets", "nosuch"]) == 2
