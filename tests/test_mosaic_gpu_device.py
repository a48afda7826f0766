"""The mosaic_gpu backend compiled on a real Hopper GPU (marked `gpu`; run on the device): both
schedules (the CTA tile split between the compute warpgroups, and ping-pong, with and without
ordered mainloops) against the reference on ragged shapes with the own-h exactness rule,
non-finite h, and gradients. The model's live units on this backend: tests/test_model.py."""

import jax
import jax.numpy as jnp
import pytest

from relu_sparsity.kernels.mosaic_gpu import kernel, ops
from relu_sparsity.kernels.reference import stats_from_h
from relu_sparsity.kernels.testing import (
    assert_grads_match_plain_expression,
    assert_matches_reference,
    random_inputs,
    tolerance,
)

pytestmark = pytest.mark.gpu

CONFIGS = {
    "split-m": kernel.TileConfig(64, 256, 64, 4, "m", 32, "m", 8),
    "split-n": kernel.TileConfig(128, 128, 64, 4, "n", 32, "m", 8),
    "pingpong": kernel.TileConfig(128, 128, 64, 6, "pingpong", 32, "m", 16),
    "pingpong-ordered": kernel.TileConfig(128, 128, 64, 6, "pingpong", 32, "m", 16,
                                          ordered=True),
}
# (n_seq, seq_len, D, F): tiles spanning sequences, sequences spanning tiles, ragged F and D;
# T and F past a tile's edge but left unpadded, their edges to TMA (kernel.tma_edges): h at
# F = 1000 through untiled SMEM pieces (bf16; 32-byte tiles in f32), at F = 1040 through
# 32-byte tiles (bf16), at F = 1020 padded (bf16) or through untiled pieces (f32), w1 padded at
# all three; at T = 500 (not a multiple of 8) x padded, h through untiled pieces.
SHAPES = [(4, 512, 256, 1000), (3, 100, 72, 96), (16, 7, 40, 33), (2, 256, 1024, 4096),
          (6, 100, 192, 640), (4, 256, 128, 1040), (4, 128, 64, 1020), (5, 100, 64, 256)]


def compiled(config, *, seq_len, with_token_mask=True):
    return jax.jit(lambda x, w1, b1: ops.forward(
        x, w1, b1, seq_len=seq_len, with_stats=True,
        with_token_mask=with_token_mask, config=config, interpret=False))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_kernel_matches_reference(config, shape, dtype):
    n_seq, seq_len, d, f = shape
    x, w1, b1 = random_inputs(n_seq * seq_len, d, f, dtype, seed=sum(shape))
    # f32 writes an f32 h: fewer stages where the doubled epilogue buffers need the room.
    config = kernel.fit_stages(config, jnp.bfloat16, dtype)
    h, stats = compiled(config, seq_len=seq_len)(x, w1, b1)
    assert_matches_reference(h, stats, x, w1, b1, seq_len=seq_len, with_token_mask=True,
                             tol=tolerance(dtype))


def test_compiled_gradients_match_plain_expression():
    x, w1, b1 = random_inputs(1024, 256, 1000, jnp.float32, seed=3)
    assert_grads_match_plain_expression("mosaic_gpu", x, w1, b1, seq_len=256, tol=2e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_nonfinite_h_follows_the_exactness_rule(dtype):
    # inf and NaN in h: `used` is h > 0 on h as returned, so inf is used and NaN is not (bf16
    # packs by a PTX compare of both halves of a register, f32 by a JAX compare).
    seq_len, d, f = 128, 64, 256
    x, w1, b1 = random_inputs(2 * seq_len, d, f, dtype, seed=11)
    x = x.at[0:40, 0].set(jnp.inf)  # pre = +-inf where w1[0] is nonzero
    x = x.at[20:60, 1].set(-jnp.inf)  # rows 20..39: inf - inf = NaN where w1[0], w1[1] > 0
    h, stats = compiled(kernel.DEFAULT_CONFIG, seq_len=seq_len)(x, w1, b1)
    hf = h.astype(jnp.float32)
    assert bool(jnp.any(jnp.isnan(hf)))
    if dtype == jnp.bfloat16:  # (f32 inputs are split into bf16 pieces: inf - inf makes NaN)
        assert bool(jnp.any(jnp.isposinf(hf)))
    own = stats_from_h(h, seq_len=seq_len, with_token_mask=True)
    for name in ("token_count", "seq_count", "seq_mask", "token_mask"):
        assert bool(jnp.array_equal(getattr(stats, name), getattr(own, name))), name
