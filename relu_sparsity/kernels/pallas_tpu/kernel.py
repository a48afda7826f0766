"""Pallas TPU kernel: h = relu(x @ w1 + b1) with the sparsity statistics reduced in the epilogue.

Grid (j, i, k) over (column tiles, row tiles, D tiles), in that order, so that:
  * with one D step (block_k = D, the committed configs) the w1 column block [D, bn] is fetched
    once per j and stays in VMEM while the row tiles stream past it (weight-stationary);
  * the row tiles of one sequence are consecutive grid steps, so a sequence's counts can
    accumulate in VMEM across them.
Semantics: j "parallel" (megacore splits the columns); i "parallel" when every row tile holds
whole sequences, "arbitrary" when a sequence spans several row tiles (its counts accumulate over
i, initialised on the sequence's first tile); k "arbitrary" (the f32 accumulator).

Rows. `row_plan` picks the row tile bm and a padded sequence length Lp >= seq_len so that either
bm = m * Lp (m whole sequences per tile) or Lp = tps * bm (tps tiles per sequence). Usually
Lp = seq_len (seq_len 512 with bm 512: one sequence per tile); an odd seq_len that cannot be
tiled in multiples of 8 rows is padded per sequence to a multiple of 8 (or of bm), and the
padding rows are masked out of the statistics and sliced off h by the caller.

Statistics, from `used = h > 0` on h as stored (x.dtype), all reduced in the epilogue:
  token_count: int32 lane sum of `used` per row -> [nj, Tp, 1] partials, one per column tile;
    the caller adds the nj partials (an [nj, T] sum).
  seq_count: S @ used on the MXU, S [mpad, bm] the 0/1 "row r belongs to local sequence s (and is
    not padding)" matrix built from iotas; bf16 0/1 operands with f32 accumulation are exact.
    -> [n_groups, m, Fp] (block (m, bn): m is the full dim, so any m is legal).
  seq_mask / token_mask: bits packed by one MXU matmul against P [bn, 128] (bf16), where
    P[c, w] = 2^(c % 32) for the low 16 bits of word w (lanes 0..nw-1) and 2^(c % 32 - 16) for the
    high 16 (lanes nw..2nw-1): each lane sum is an integer < 2^16, exact in f32. The high half is
    rolled down by nw lanes and OR-ed in above bit 16, in int32 (TPUs have no unsigned
    reductions); the caller bit-casts to uint32. Cost: one [bm, bn] x [bn, 128] matmul per tile,
    i.e. 128 / D of the GEMM, and only with the token mask (the sequence mask packs mpad rows).
    Mask words of a column tile land in [nj, ..., nw] arrays (nw = bn / 32 is the full last dim,
    so the block is legal for any nw); the caller transposes those small arrays to [.., W].
Padded columns (F -> Fp) have zero weights and bias, so h = 0 there and their bits stay zero.

Tile configurations and why (committed in kernels/configs/pallas_tpu.json):
  VMEM budget: 16 MiB for double-buffered blocks plus scratch (`vmem_footprint_bytes`), the
  smallest default scoped-VMEM limit of current TPUs (v5e; v6e and v7x default to 32 MiB);
  physical VMEM per core is 128 MiB on v5e/v6e and 64 MiB on v5p/v7x (jax/_src/tpu_info.py).
  `VMEM_LIMIT_BYTES` = 32 MiB is passed to Mosaic, leaving ~16 MiB for the epilogue's [bm, bn]
  f32 temporaries, and is below every current chip's physical VMEM.
  block_k = D (one D step): no accumulator scratch and w1 fetched once per column tile. Per grid
  step the HBM traffic is x's [bm, D] block plus h's [bm, bn] block for 2 * bm * bn * D flops:
  bn * D / (D + bn) flops per byte, which must beat the chip's ridge point (v5e ~240, v7x ~310,
  v6e ~560 flops/byte), so bn is as wide as the budget allows:
    8192x1024x32768: bm 512, bn 1024: 512 flops/byte, 9.2 MiB.
    8192x2048x16384: bm 512, bn  512: 410 flops/byte, 10.1 MiB (bn 1024 would need 15 MiB).
    8192x512x8192:   bm 512, bn 1024: 341 flops/byte, 6.1 MiB.
  bm = 512 = seq_len: one sequence per row tile, so i is parallel and no counts accumulate.
  They are reasoned, not yet measured on a TPU.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from relu_sparsity.kernels.bits import BITS_PER_WORD
LANES = 128
VMEM_BUDGET_BYTES = 16 * 1024 * 1024  # smallest default scoped VMEM limit (v5e)
VMEM_LIMIT_BYTES = 32 * 1024 * 1024  # passed to Mosaic; <= 64 MiB physical on v5p / v7x


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int = 512  # row tile target (multiple of 8)
    block_n: int = 512  # column tile (multiple of 128, at most 2048: 2 * bn / 32 <= 128 lanes)
    block_k: int = 1024  # D tile when D > block_k (multiple of 128); D <= block_k: one step


DEFAULT_CONFIG = TileConfig()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shapes of one call: rows (bm, Lp, m, tps), columns (bn, nw) and D (bk)."""
    T: int
    D: int
    F: int
    seq_len: int
    bm: int
    Lp: int  # padded sequence length: bm == m * Lp or Lp == tps * bm
    m: int  # sequences per row tile
    tps: int  # row tiles per sequence
    n_seq: int
    n_seq_p: int  # padded to a multiple of m
    bn: int
    bk: int

    @property
    def Tp(self) -> int:
        return self.n_seq_p * self.Lp

    @property
    def Fp(self) -> int:
        return _round_up(self.F, self.bn)

    @property
    def Dp(self) -> int:
        return _round_up(self.D, self.bk)

    @property
    def nw(self) -> int:
        return self.bn // BITS_PER_WORD

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.Fp // self.bn, self.Tp // self.bm, self.Dp // self.bk)

    @property
    def n_groups(self) -> int:
        return self.n_seq_p // self.m


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def row_plan(T: int, seq_len: int, block_m: int) -> tuple[int, int, int, int, int]:
    """(bm, Lp, m, tps, n_seq_p): row tile and sequence padding. bm is a multiple of 8 or the
    whole (padded) token count, as Mosaic requires of a second-to-last block dimension."""
    L, n_seq = seq_len, T // seq_len
    if L >= block_m:
        # Several tiles per sequence: the multiple-of-8 tile <= block_m that pads L least.
        bm = min(range(8, block_m + 1, 8), key=lambda b: (_round_up(L, b), -b))
        Lp = _round_up(L, bm)
        return bm, Lp, 1, Lp // bm, n_seq
    if T <= block_m:
        return T, L, n_seq, 1, n_seq  # one tile holding everything (full-dim block)
    step = 8 // math.gcd(L, 8)  # sequences per tile must make m * L a multiple of 8
    if step * L <= block_m:
        m = block_m // L // step * step
        Lp = L
    else:  # pad each sequence to a multiple of 8 rows
        Lp = _round_up(L, 8)
        m = block_m // Lp
    return m * Lp, Lp, m, 1, _round_up(n_seq, m)


def make_plan(T: int, D: int, F: int, seq_len: int, config: TileConfig) -> Plan:
    assert config.block_n % LANES == 0 and config.block_n <= 16 * LANES, config
    assert config.block_m % 8 == 0 and config.block_k % LANES == 0, config
    bm, Lp, m, tps, n_seq_p = row_plan(T, seq_len, config.block_m)
    bn = min(config.block_n, _round_up(F, LANES))
    bk = D if D <= config.block_k else config.block_k
    return Plan(T=T, D=D, F=F, seq_len=seq_len, bm=bm, Lp=Lp, m=m, tps=tps, n_seq=T // seq_len,
                n_seq_p=n_seq_p, bn=bn, bk=bk)


def _padded_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """VMEM bytes of a block: the last two dims padded to the (8 * 4 / itemsize, 128) tile."""
    *lead, rows, cols = (1,) * max(0, 2 - len(shape)) + tuple(shape)
    sublanes = 8 * 4 // itemsize
    return math.prod(lead) * _round_up(rows, sublanes) * _round_up(cols, LANES) * itemsize


def vmem_footprint_bytes(plan: Plan, itemsize: int, with_stats: bool, with_token_mask: bool
                         ) -> int:
    """Double-buffered input and output blocks plus scratch, as Mosaic allocates them."""
    bm, bn, bk = plan.bm, plan.bn, plan.bk
    blocks = [((bm, bk), itemsize), ((bk, bn), itemsize), ((1, bn), itemsize),
              ((bm, bn), itemsize)]
    if with_stats:
        blocks += [((bm, 1), 4), ((plan.m, bn), 4), ((plan.m, plan.nw), 4)]
        if with_token_mask:
            blocks.append(((bm, plan.nw), 4))
    total = 2 * sum(_padded_bytes(s, b) for s, b in blocks)
    if plan.grid[2] > 1:
        total += _padded_bytes((bm, bn), 4)  # f32 accumulator
    if with_stats and plan.tps > 1:
        total += _padded_bytes((_round_up(plan.m, 8), bn), 4)  # per-sequence counts
    return total


def _pack_matrix(bn: int) -> jax.Array:
    """P [bn, 128] bf16: column c's bit in the low (lanes < nw) or high (lanes nw..) half-word."""
    nw = bn // BITS_PER_WORD
    c = jax.lax.broadcasted_iota(jnp.int32, (bn, LANES), 0)
    lane = jax.lax.broadcasted_iota(jnp.int32, (bn, LANES), 1)
    word, bit = c >> 5, c & 31
    hit = ((lane == word) & (bit < 16)) | ((lane == word + nw) & (bit >= 16))
    value = (jnp.ones_like(bit) << (bit & 15)).astype(jnp.float32)
    return jnp.where(hit, value, 0.0).astype(jnp.bfloat16)


def _pack(used: jax.Array, pack_matrix: jax.Array, nw: int) -> jax.Array:
    """bf16 0/1 [rows, bn] -> int32 [rows, nw] mask words (bit j % 32 of word j // 32)."""
    halves = jnp.dot(used, pack_matrix, preferred_element_type=jnp.float32).astype(jnp.int32)
    high = pltpu.roll(halves, LANES - nw, 1)  # lane w <- lane w + nw
    return (halves | (high << 16))[:, :nw]


def _make_kernel(plan: Plan, with_stats: bool, with_token_mask: bool, precision):
    bm, bn, nw, m, tps, nk = plan.bm, plan.bn, plan.nw, plan.m, plan.tps, plan.grid[2]
    mpad = _round_up(m, 8)

    def kernel(x_ref, w_ref, b_ref, h_ref, *refs):
        refs = list(refs)
        if with_stats:
            tc_ref, sc_ref, sm_ref = refs[:3]
            tm_ref = refs[3] if with_token_mask else None
            refs = refs[4 if with_token_mask else 3:]
        acc_ref = refs.pop(0) if nk > 1 else None
        seq_acc_ref = refs.pop(0) if with_stats and tps > 1 else None
        i, k = pl.program_id(1), pl.program_id(2)

        def epilogue(acc):
            h = jnp.maximum(acc + b_ref[...].astype(jnp.float32), 0.0).astype(h_ref.dtype)
            h_ref[...] = h
            if not with_stats:
                return
            used = h.astype(jnp.float32) > 0  # on the value as stored
            tc_ref[...] = jnp.sum(used.astype(jnp.int32), axis=1, keepdims=True)
            used_b = used.astype(jnp.bfloat16)
            pack_matrix = _pack_matrix(bn)
            if with_token_mask:
                tm_ref[...] = _pack(used_b, pack_matrix, nw)
            # S[s, r] = 1 where row r (offset within its sequence group) is a real row of
            # local sequence s: s * Lp <= r + off < s * Lp + seq_len.
            off = jax.lax.rem(i, tps) * bm  # lax.rem/div: i >= 0, no sign fix-ups
            s = jax.lax.broadcasted_iota(jnp.int32, (mpad, bm), 0) * plan.Lp
            r = jax.lax.broadcasted_iota(jnp.int32, (mpad, bm), 1) + off
            seg = ((r >= s) & (r < s + plan.seq_len)).astype(jnp.bfloat16)
            counts = jnp.dot(seg, used_b, preferred_element_type=jnp.float32).astype(jnp.int32)
            if tps > 1:
                first = jax.lax.rem(i, tps) == 0

                @pl.when(first)
                def _():
                    seq_acc_ref[...] = counts

                @pl.when(jnp.logical_not(first))
                def _():
                    seq_acc_ref[...] += counts

                counts = seq_acc_ref[...]
            sc_ref[...] = counts[:m]
            sm_ref[...] = _pack((counts > 0).astype(jnp.bfloat16), pack_matrix, nw)[:m]

        part = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32,
                       precision=precision)
        if nk == 1:
            epilogue(part)
            return

        @pl.when(k == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        acc_ref[...] += part

        @pl.when(k == nk - 1)
        def _():
            epilogue(acc_ref[...])

    return kernel


def fused_mlp_up_call(x: jax.Array, w1: jax.Array, b1: jax.Array, plan: Plan, *,
                      with_stats: bool, with_token_mask: bool, interpret):
    """The pallas_call on padded operands: x [Tp, Dp], w1 [Dp, Fp], b1 [1, Fp].

    Returns h [Tp, Fp] and, with stats, token_count partials [nj, Tp, 1] int32, seq_count
    [n_groups, m, Fp] int32, seq_mask [nj, n_groups, m, nw] int32 and token_mask [nj, Tp, nw]
    int32 (bit patterns; the caller bit-casts)."""
    nj, ni, nk = plan.grid
    bm, bn, bk, m, nw, tps = plan.bm, plan.bn, plan.bk, plan.m, plan.nw, plan.tps
    assert x.shape == (plan.Tp, plan.Dp) and w1.shape == (plan.Dp, plan.Fp)
    sq = pl.Squeezed()
    in_specs = [pl.BlockSpec((bm, bk), lambda j, i, k: (i, k)),
                pl.BlockSpec((bk, bn), lambda j, i, k: (k, j)),
                pl.BlockSpec((1, bn), lambda j, i, k: (0, j))]
    out_specs = [pl.BlockSpec((bm, bn), lambda j, i, k: (i, j))]
    out_shape = [jax.ShapeDtypeStruct((plan.Tp, plan.Fp), x.dtype)]
    scratch = []
    if nk > 1:
        scratch.append(pltpu.VMEM((bm, bn), jnp.float32))
    if with_stats:
        out_specs += [
            pl.BlockSpec((sq, bm, 1), lambda j, i, k: (j, i, 0)),
            pl.BlockSpec((sq, m, bn), lambda j, i, k: (jax.lax.div(i, tps), 0, j)),
            pl.BlockSpec((sq, sq, m, nw), lambda j, i, k: (j, jax.lax.div(i, tps), 0, 0)),
        ]
        out_shape += [jax.ShapeDtypeStruct((nj, plan.Tp, 1), jnp.int32),
                      jax.ShapeDtypeStruct((plan.n_groups, m, plan.Fp), jnp.int32),
                      jax.ShapeDtypeStruct((nj, plan.n_groups, m, nw), jnp.int32)]
        if with_token_mask:
            out_specs.append(pl.BlockSpec((sq, bm, nw), lambda j, i, k: (j, i, 0)))
            out_shape.append(jax.ShapeDtypeStruct((nj, plan.Tp, nw), jnp.int32))
        if tps > 1:
            scratch.append(pltpu.VMEM((_round_up(m, 8), bn), jnp.int32))
    precision = (jax.lax.Precision.HIGHEST if x.dtype == jnp.float32
                 else jax.lax.Precision.DEFAULT)
    row_semantics = "parallel" if tps == 1 else "arbitrary"
    return pl.pallas_call(
        _make_kernel(plan, with_stats, with_token_mask, precision),
        grid=(nj, ni, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", row_semantics, "arbitrary"),
            vmem_limit_bytes=VMEM_LIMIT_BYTES),
        interpret=interpret,
        name="fused_mlp_up",
    )(x, w1, b1)
