"""`relu-sparsity tune`: every candidate checked exact before it is timed, the configured one
always among them, the fastest written to the configuration file; refused where the backend would
only be interpreted. On the CPU through the interpreted pallas_tpu kernel (times meaningless,
the plumbing checked)."""

import functools
import json

import pytest

from relu_sparsity import cli
from relu_sparsity.bench import tune
from relu_sparsity.kernels.pallas_tpu import kernel as tpu_kernel


def test_candidates_start_with_the_configured_one_and_are_distinct():
    got = tune.candidates("pallas_tpu", tpu_kernel.DEFAULT_CONFIG, limit=5)
    assert got[0] == tpu_kernel.DEFAULT_CONFIG and len(set(got)) == len(got) == 5
    mosaic = tune.candidates("mosaic_gpu", __import__(
        "relu_sparsity.kernels.mosaic_gpu.kernel", fromlist=["x"]).DEFAULT_CONFIG, limit=200)
    assert all(c.wg_dim == "pingpong" or not c.ordered for c in mosaic)


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
