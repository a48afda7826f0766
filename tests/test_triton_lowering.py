"""The Triton backend lowers for CUDA (compute capability 9.0) from a machine without a GPU, so a
kernel that only fails to compile on the GPU cannot land. Triton compiles the kernel here."""

import jax
import jax.numpy as jnp
import pytest

from relu_sparsity.kernels import api, backends, bits
from relu_sparsity.kernels.testing import BENCH_SHAPES
from relu_sparsity.kernels.triton import kernel, ops


@pytest.fixture(autouse=True)
def hopper_target(monkeypatch):
    monkeypatch.setattr(ops, "COMPUTE_CAPABILITY", 90)
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))  # for CUDA here only
    backends.load_backend("triton", platform="gpu")


def lower(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def forward(with_stats, with_token_mask, seq_len=512):
    def fn(x, w1, b1):
        return api._fused(x, w1, b1, seq_len, with_stats, with_token_mask, "triton")
    return fn


@pytest.mark.parametrize("shape", BENCH_SHAPES)
def test_forward_lowers_at_bench_shapes(shape):
    t, d, f = shape
    bf16 = jnp.bfloat16
    for with_stats in (False, True):
        text = lower(forward(with_stats, False), ((t, d), bf16), ((d, f), bf16), ((f,), bf16))
        assert "triton_kernel_call" in text
    cfg = ops.tile_config("NVIDIA H200", (t, d, f), "bfloat16")
    assert cfg.block_n % 32 == 0


@pytest.mark.parametrize("seq_len, f", [(512, 1000), (100, 96), (7, 33)])
def test_ragged_and_token_mask_lower(seq_len, f):
    t, d = seq_len * 2, 64
    for dtype in (jnp.bfloat16, jnp.float32):
        text = lower(forward(True, True, seq_len), ((t, d), dtype), ((d, f), dtype), ((f,), dtype))
        assert text.count("triton_kernel_call") >= 1


def test_seq_programs_lower():
    # One program per (sequence, column tile), at the paper's shape with both tile widths the
    # device sweep times (bench/device_triton.py).
    t, d, f = BENCH_SHAPES[0]
    bf16 = jnp.bfloat16
    for config in (kernel.TileConfig(128, 256, 64, 8, 8, 3, seq_programs=True),
                   kernel.TileConfig(128, 128, 64, 8, 8, 3, seq_programs=True)):
        assert kernel.launch_plan(t, d, f, 512, config, True, True).constexprs["SEQ_PROGRAMS"]

        def fn(x, w1, b1, config=config):
            return ops.forward(x, w1, b1, seq_len=512, with_stats=True,
                               with_token_mask=True, config=config)

        assert "triton_kernel_call" in lower(fn, ((t, d), bf16), ((d, f), bf16), ((f,), bf16))


def test_bits_per_word_agrees_with_bits():
    # kernel.py imports only triton, so it states the word size again.
    assert kernel.BITS_PER_WORD == bits.BITS_PER_WORD


def test_gradient_lowers():
    def loss(x, w1, b1):
        h, stats = api._fused(x, w1, b1, 512, True, False, "triton")
        return jnp.sum(h.astype(jnp.float32)) + 0 * stats.token_count.sum()

    bf16 = jnp.bfloat16
    text = lower(jax.grad(loss, argnums=(0, 1, 2)), ((1024, 256), bf16), ((256, 2048), bf16),
                 ((2048,), bf16))
    assert "triton_kernel_call" in text


def test_launch_plan_rejects_bad_configs():
    with pytest.raises(ValueError, match="multiple of 32"):
        kernel.launch_plan(64, 16, 64, 32, kernel.TileConfig(64, 16, 16, 8, 4, 2))
    with pytest.raises(ValueError, match="seq_len"):
        kernel.launch_plan(100, 16, 64, 0)
    # seq_programs needs whole row tiles per sequence; otherwise the tile grid is used.
    unaligned = kernel.launch_plan(96, 16, 64, 48, kernel.TileConfig(32, 32, 16, 8, 4, 2, True))
    assert not unaligned.constexprs["SEQ_PROGRAMS"] and unaligned.grid == (3 * 2,)
    aligned = kernel.launch_plan(96, 16, 64, 32, kernel.TileConfig(32, 32, 16, 8, 4, 2, True))
    assert aligned.constexprs["SEQ_PROGRAMS"] and aligned.grid == (3 * 2,)


def test_fingerprint_names_the_kernel_not_its_source_lines():
    from relu_sparsity.bench import triton_fingerprint

    case = (256, 64, 300, 128, jnp.bfloat16, kernel.TileConfig(64, 64, 32, 4, 4, 2))
    with_stats = triton_fingerprint.fingerprint(*case, True, False)
    assert triton_fingerprint.fingerprint(*case, True, False) == with_stats
    assert triton_fingerprint.fingerprint(*case, False, False) != with_stats
