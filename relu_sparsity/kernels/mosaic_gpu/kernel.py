"""Pallas Mosaic-GPU (Hopper) kernel: h = relu(x @ w1 + b1) with the sparsity statistics reduced
in the GEMM epilogue.

Structure (one CTA per SM, persistent; `plgpu.kernel` with three warpgroups), two schedules:
  * split (`wg_dim="m"` or `"n"`): warpgroup 2 is the memory thread of
    `plgpu.emit_pipeline_warp_specialized`, streaming x [cta_m, tile_k] and w1 [tile_k, cta_n]
    blocks by TMA into one `stages`-deep SMEM ring; warpgroups 0 and 1 each own a
    [tile_m, tile_n] f32 wgmma accumulator (the CTA tile split between them along M or N) and
    both read every stage, so they reach their epilogues together and the tensor cores idle
    through them (measured: the epilogue is 25-50% of a tile's mainloop at D = 1024).
  * ping-pong (`wg_dim="pingpong"`): warpgroups 0 and 1 take this CTA's output tiles in turn,
    whole; warpgroup 2 streams the tiles' steps in order through one SMEM ring serving both
    (hand-written pipeline: "loaded" and "consumed" barriers per warpgroup and stage), so one
    warpgroup's mainloop starts as the other's ends and each epilogue runs under the other
    warpgroup's wgmmas. With `ordered`, a warpgroup also waits for the other's mainloop to
    finish before starting its own, so the two never share the tensor cores: without it, a
    short epilogue (no statistics) let the mainloops overlap and both slowed (8192x1024x32768
    without statistics: 1.09-1.13 of XLA's GEMM unordered, 1.02-1.04 ordered).
Output tiles are visited by `plgpu.nd_loop` over a planar snake (L2 reuse), as in JAX's example
Hopper matmul (jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py), which this follows.

Epilogue of one compute warpgroup (registers in the WGMMA layout):
  h = max(acc + b1, 0) rounded to the output dtype; written in [64, epi_tile_n] pieces through
  `epi_slots` SMEM slots and TMA (`copy_smem_to_gmem`), or with h_store="direct" from registers
  straight to global memory. With statistics, `used = h > 0` on the *rounded* value (the
  exactness rule), compared in h's dtype, taken over h in [tile_m, 32]-column pieces (16 at
  tile_n = 64) so that only h and one piece are live: `used` for a whole 128 x 128 tile as
  int32 is 128 registers a thread, and spilled (ptxas). Per piece:
  pack         used is summed four columns to an int32 in 8-bit lanes: packed [tile_m,
               tile_n / 4], lane i of word c holding column i * tile_n / 4 + c (`_pack_used`:
               for bf16 h ten PTX instructions per eight elements, comparing both halves of a
               register at once; else plain JAX). The counts below
               are sums of packed words, four columns per add; no lane can carry into the next
               (a lane sums at most 64 ones: tile_n / 4 columns of a row, or tile_m / 4 rows).
  token_count  row sums of packed (a reduction within a quad's lanes: no SMEM), the four lanes
               of each row added at the end -> [tile_m] per column tile, added atomically
               (`red.global.add`, one lane per row) into token_count [Tp] int32, zeroed by
               XLA before the kernel (`_add_row_counts`).
  seq_count    column sums of packed over the rows of each sequence segment that meets the row
               tile, per warp: a warp holds tile_m / 4 of the tile's rows, so its sum needs only
               register adds and shuffles within the warp; the cross-warp sum through SMEM, with
               two warpgroup barriers per round, was the largest piece of the statistics (2300
               of ~9000 epilogue cycles per tile at 8192x1024x32768). Each warp's sums are added
               atomically into the sequence's row of zeroed int32 words [n_seq, Fp / 2], two
               columns per word in 16-bit lanes (so seq_len <= 65535: ops.counting_seq_len
               splits longer sequences into parts the kernel counts), one add per two columns
               and only where nonzero (`_add_col_counts`); JAX unpacks the words. Adding in
               the kernel replaced per-warp partials that XLA summed and unpacked in four small
               fusions after the kernel (with the token-count sum and the mask packing, 0.015 ms
               at 8192x512x8192 at e1ee1ec, 14% of XLA's GEMM: bench/RESULTS.md).
               Sequences need not align with tiles: a tile meets at most `n_seg` sequences
               (static), and segment s of a tile counts the rows of sequence
               floor(row0 / seq_len) + s, masked by a row iota (padding rows belong to no
               sequence, so they never count).
  token_mask   word w of a row = the sum over its 32 columns c of used << (c % 32): distinct
               powers of two, so the sum is their OR (int32 addition wraps like uint32's at bit
               31). Like the token counts, a row reduction within a quad's lanes, per word; stored
               from registers into its column of tm_part [Tp, Fp / 32] int32, which is the mask
               (bitcast to uint32) once padding is sliced off.
  seq_mask     left to JAX: pack_bits(seq_count > 0) on the [n_seq, F] counts (tiny).
The atomic adds are of integers, so the counts do not depend on their order: the results are
deterministic. The interpreter runs neither inline Mosaic GPU nor atomics: there, the kernel
writes per-tile partials (plain-JAX sums of the same packed words) and JAX adds them.

Padding (done by the caller, ops.py): Tp, Fp, Dp are multiples of the CTA tile and tile_k. Zero
columns of w1 and b1 give h = 0 (never used); zero rows of x give h = relu(b1), which may be > 0,
but those rows lie outside every sequence segment and their token counts / mask words are sliced
off. f32 inputs are not fed to wgmma (which would round them to TF32): ops.py splits them into
bf16 pieces (see there), and the kernel writes h in the output dtype it is given.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

BITS_PER_WORD = 32
# Hopper: 227 KiB of dynamic shared memory per block (sm_90 opt-in maximum; Mosaic GPU's limit).
SMEM_LIMIT_BYTES = 232448
WARPS = 4  # per warpgroup; the WGMMA layout gives warp w rows 16 w .. 16 w + 15 of each 64
LANE_BITS = 8  # the statistics' packing: four 8-bit lanes per int32
# Sequence counts are added in 16-bit lanes (`_add_col_counts`); ops counts longer sequences in
# parts of at most this length and adds the parts.
MAX_SEQ_LEN = 0xFFFF
MEMORY_REGISTERS = 40
# Registers per thread of a compute warpgroup when the memory warpgroup keeps 40: (512 - 40) / 2
# rounded down to a multiple of 8 (what emit_pipeline_warp_specialized gives them too).
COMPUTE_REGISTERS = 232


# Field defaults are the split schedule's 64x256 tiles; shapes without a tuned entry use
# DEFAULT_CONFIG below (ping-pong), not TileConfig().
@dataclasses.dataclass(frozen=True)
class TileConfig:
    tile_m: int = 64  # rows per compute warpgroup (multiple of 64)
    tile_n: int = 256  # columns per compute warpgroup (multiple of 64, <= 256)
    tile_k: int = 64  # D per pipeline step (64 bf16 = one 128-byte swizzle row)
    stages: int = 4  # SMEM ring depth (max_concurrent_steps)
    # "m" / "n": the two compute warpgroups split one CTA tile along M or N and both read every
    # stage; "pingpong": each takes whole [tile_m, tile_n] tiles in turn, reading its own steps.
    wg_dim: str = "m"
    epi_tile_n: int = 32  # width of one h store through SMEM
    grid_minor: str = "m"  # planar snake: the minor grid dimension ("m" or "n")
    grid_tile_width: int = 8  # planar snake: tile width along the minor dimension
    # h's store: "tma" writes [64, epi_tile_n] pieces through `epi_slots` SMEM slots per
    # warpgroup (a piece waits only for the store epi_slots pieces back: with every piece of a
    # tile in its own slot, none waits within a tile); "direct" stores from registers to global
    # memory (no SMEM, so more room for ring stages; 4-byte stores of bf16 pairs).
    epi_slots: int = 2
    h_store: str = "tma"
    # Ping-pong only: a warpgroup starts its mainloop only once the other's has finished (its
    # last wgmma done), so the two never share the tensor cores and their epilogues alternate.
    ordered: bool = False

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dim == "n" else 1)

    def validate(self) -> None:
        problems = []
        if self.tile_m % 64 or self.tile_m <= 0:
            problems.append(f"tile_m={self.tile_m} must be a positive multiple of 64")
        if self.tile_n % 64 or not 0 < self.tile_n <= 256:
            problems.append(f"tile_n={self.tile_n} must be a multiple of 64 in [64, 256]")
        if self.tile_k % 64 or self.tile_k <= 0:
            problems.append(f"tile_k={self.tile_k} must be a positive multiple of 64")
        if self.stages < 2:
            problems.append(f"stages={self.stages} must be >= 2")
        if self.wg_dim not in ("m", "n", "pingpong"):
            problems.append("wg_dim must be 'm', 'n' or 'pingpong'")
        if self.grid_minor not in ("m", "n"):
            problems.append("grid_minor must be 'm' or 'n'")
        if self.epi_tile_n % 32 or self.tile_n % self.epi_tile_n:
            problems.append(f"epi_tile_n={self.epi_tile_n} must divide tile_n and be a "
                            "multiple of 32")
        if self.epi_slots < 1:
            problems.append(f"epi_slots={self.epi_slots} must be >= 1")
        if self.h_store not in ("tma", "direct"):
            problems.append("h_store must be 'tma' or 'direct'")
        if self.ordered and self.wg_dim != "pingpong":
            problems.append("ordered needs wg_dim='pingpong'")
        if self.tile_m * self.tile_n > 64 * 256:
            problems.append(f"tile {self.tile_m}x{self.tile_n} needs more than 128 accumulator "
                            "registers per thread (at most 64x256 or 128x128)")
        if problems:
            raise ValueError(f"invalid mosaic_gpu TileConfig {self}: " + "; ".join(problems))


# Shapes without a tuned entry: ping-pong through a 6-stage ring beat the split schedule's
# 64x256 tiles at every untuned shape measured on the H200 (bench/RESULTS.md).
DEFAULT_CONFIG = TileConfig(tile_m=128, tile_n=128, tile_k=64, stages=6, wg_dim="pingpong",
                            grid_tile_width=16)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shapes of one call."""
    T: int
    D: int
    F: int
    seq_len: int
    config: TileConfig
    n_seg: int  # sequence segments a row tile can meet (static upper bound, >= 1)

    @property
    def n_seq(self) -> int:
        return self.T // self.seq_len

    @property
    def Tp(self) -> int:
        return _round_up(self.T, self.config.cta_m)

    @property
    def Fp(self) -> int:
        return _round_up(self.F, self.config.cta_n)

    @property
    def Dp(self) -> int:
        return _round_up(self.D, self.config.tile_k)

    @property
    def row_tiles(self) -> int:  # per compute warpgroup
        return self.Tp // self.config.tile_m

    @property
    def col_tiles(self) -> int:  # per compute warpgroup
        return self.Fp // self.config.tile_n

    @property
    def aligned(self) -> bool:
        """Every row tile lies inside one sequence and holds no padding rows."""
        return self.seq_len % self.config.tile_m == 0 and self.Tp == self.T

    def segment_ids(self) -> np.ndarray:
        """[row_tiles, n_seg] sequence id of each segment partial; n_seq where it is empty."""
        tm, L = self.config.tile_m, self.seq_len
        ids = np.full((self.row_tiles, self.n_seg), self.n_seq, np.int64)
        for i in range(self.row_tiles):
            r0 = i * tm
            for s in range(self.n_seg):
                n = r0 // L + s
                if n < self.n_seq and n * L < r0 + tm:
                    ids[i, s] = n
        return ids


def make_plan(T: int, D: int, F: int, seq_len: int, config: TileConfig) -> Plan:
    config.validate()
    if T % seq_len:
        raise ValueError(f"seq_len={seq_len} must divide T={T}")
    tm = config.tile_m
    # Sequences a row tile [r0, r0 + tm) meets: the most over all tiles (computed, not bounded,
    # so that aligned layouts get exactly one segment).
    n_seg = 1
    for r0 in range(0, min(T, math.lcm(tm, seq_len)), tm):
        last = min(r0 + tm, T) - 1
        n_seg = max(n_seg, last // seq_len - r0 // seq_len + 1)
    return Plan(T=T, D=D, F=F, seq_len=seq_len, config=config, n_seg=n_seg)


def smem_bytes(config: TileConfig, in_itemsize: int, out_itemsize: int) -> int:
    """Shared memory the kernel allocates (pipeline ring, h staging, barriers; the statistics
    take none), an estimate within a few hundred bytes of Mosaic's own count."""
    ring = config.stages * (config.cta_m + config.cta_n) * config.tile_k * in_itemsize
    out = 0 if config.h_store == "direct" else (
        2 * config.epi_slots * 64 * config.epi_tile_n * out_itemsize)
    # ping-pong: 2 warpgroups x 2 barriers per stage, and 4 more (the 2 "done" barriers among
    # them, allocated whether ordered or not)
    barriers = 8 * (4 * config.stages + 4)
    return ring + out + barriers + 2048  # + Mosaic's own (~1 KiB measured)


def check_smem(config: TileConfig, in_dtype, out_dtype) -> None:
    need = smem_bytes(config, jnp.dtype(in_dtype).itemsize, jnp.dtype(out_dtype).itemsize)
    if need > SMEM_LIMIT_BYTES:
        raise ValueError(
            f"mosaic_gpu TileConfig {config} needs about {need / 1024:.1f} KiB of shared memory "
            f"({config.stages} stages of [{config.cta_m} + {config.cta_n}] x {config.tile_k} "
            "operand blocks plus the epilogue's buffers), more than the "
            f"{SMEM_LIMIT_BYTES // 1024} KiB a Hopper block can have: use fewer stages or "
            "smaller tiles")


def fit_stages(config: TileConfig, in_dtype, out_dtype) -> TileConfig:
    """`config` with as many pipeline stages as fit in shared memory, at most its own and at
    least 2 (f32 outputs double the epilogue's buffers: a ring tuned for bf16 may not fit)."""
    fitted = config
    while fitted.stages > 2 and smem_bytes(
            fitted, jnp.dtype(in_dtype).itemsize,
            jnp.dtype(out_dtype).itemsize) > SMEM_LIMIT_BYTES:
        fitted = dataclasses.replace(fitted, stages=fitted.stages - 1)
    return fitted


def _lane_and_warp():
    """(lane in the warp, warp in the warpgroup) of this thread, i32."""
    i32 = ir.IntegerType.get_signless(32)
    tid = mgpu_utils.thread_idx()
    lane = arith.remui(tid, mgpu_utils.c(32, i32))
    warp = arith.remui(arith.divui(tid, mgpu_utils.c(32, i32)), mgpu_utils.c(WARPS, i32))
    return lane, warp


def _global_i32_ptr(ref):
    """An LLVM global-space pointer to the first int32 of the global-memory ref `ref`."""
    ptr = mgpu_utils.memref_ptr(ref)
    if ptr.type.address_space != 1:
        ptr = llvm.addrspacecast(llvm.PointerType.get(address_space=1), ptr)
    return ptr


# ptr[0] += $1 in global memory, by the lanes where $2 == $3 (relaxed, device scope: the counts
# are only read after the kernel; integer adds, so the sums do not depend on their order).
_RED_ADD_IF_EQ_PTX = ("{ .reg .pred p; setp.eq.u32 p, $2, $3; "
                      "@p red.relaxed.gpu.global.add.s32 [$0], $1; }")


def _red_add_if(ptr, index, value, a, b) -> None:
    """ptr[index] += value (int32, atomically) where a == b (i32 values)."""
    i32 = ir.IntegerType.get_signless(32)
    llvm.inline_asm(ir.Type.parse("!llvm.void"),
                    [mgpu_utils.getelementptr(ptr, [index], i32), value, a, b],
                    _RED_ADD_IF_EQ_PTX, "l,r,r,r", has_side_effects=True)


def _add_row_counts(counts: jax.Array, acc_ref) -> None:
    """acc_ref[r] += counts[r], atomically: int32 counts [tile_m] (WGMMA row layout, each row in
    the four lanes of a quad), acc_ref [tile_m] in global memory. Lane q of a quad adds the
    rows of its registers k with k % 4 == q, so each row is added once."""
    tm, = counts.shape

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA.reduce(1), plgpu.RefType()))
    def add(ctx, arr, ref):
        del ctx
        # WGMMA row layout of [tm]: registers [tm / 64, 1, 2, 1, 1] of vector<1xi32>; register
        # (i, .., r, ..) of lane l in warp w holds row 64 i + 16 w + 8 r + l // 4.
        assert arr.layout == fa.WGMMA_ROW_LAYOUT, arr.layout
        regs = arr.registers
        assert regs.shape == (tm // 64, 1, 2, 1, 1), regs.shape
        i32 = ir.IntegerType.get_signless(32)
        lane, warp = _lane_and_warp()
        quad = arith.remui(lane, mgpu_utils.c(4, i32))
        row = arith.addi(arith.muli(warp, mgpu_utils.c(16, i32)),
                         arith.divui(lane, mgpu_utils.c(4, i32)))
        ptr = _global_i32_ptr(ref)
        for k, idx in enumerate(np.ndindex(regs.shape)):
            i, r = idx[0], idx[2]
            index = arith.addi(row, mgpu_utils.c(64 * i + 8 * r, i32))
            _red_add_if(ptr, index, llvm.bitcast(i32, regs[idx]), quad, mgpu_utils.c(k % 4, i32))

    add(counts, acc_ref)


def _warp_column_totals(regs, tm: int, j: int):
    """The sum over the rows a warp holds of register column j (vector<2xi32>, columns 8 j +
    2 (l % 4) + {0, 1}) of int32 [tm, n] WGMMA-layout registers `regs`: register adds, then
    shuffles across the lanes of the same columns. Every lane ends with its columns' sums."""
    parts = [regs[i, j, 0, 0, r, 0, 0, 0, 0] for i in range(tm // 64) for r in range(2)]
    while len(parts) > 1:  # a tree: independent adds
        parts = [arith.addi(a, b) for a, b in zip(parts[::2], parts[1::2])] + (
            [parts[-1]] if len(parts) % 2 else [])
    total = parts[0]
    for stride in (4, 8, 16):  # the lanes of the same columns (l // 4 varies)
        total = arith.addi(total, mgpu_utils.shfl_bfly(total, stride))
    return total


def _add_col_counts(packed: jax.Array, acc_ref, off: int, lane_cols: int) -> None:
    """Adds the sums of packed over the rows of each warp into acc_ref, atomically, two columns
    per int32 in 16-bit lanes: packed int32 [tile_m, n] in 8-bit lanes (WGMMA layout; lane i
    of word c is column i * lane_cols + off + c), acc_ref [tile_n / 2] int32 in global memory,
    word p * lane_cols + off + c holding column p * lane_cols + off + c in its low half and
    column (p + 2) * lane_cols + off + c in its high half (p = 0, 1; `_unpack_col_counts`).
    Register adds and shuffles within each warp (no SMEM, no barrier), then one atomic add per
    lane for every two register columns: the 8 lane groups holding a column pair's sums take
    (register column, word of the pair, p). Zero sums are not added."""
    tm, n = packed.shape
    assert n % 16 == 0, n

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def add(ctx, arr, ref):
        del ctx
        # WGMMA layout of [tm, n]: registers [tm / 64, n / 8, 1, 1, 2, 1, 1, 1, 1] of
        # vector<2xi32>; register (i, j, .., r, ..) of lane l in warp w holds row
        # 64 i + 16 w + 8 r + l // 4, columns 8 j + 2 (l % 4) + {0, 1}.
        assert arr.layout == fa.WGMMA_LAYOUT, arr.layout
        regs = arr.registers
        assert regs.shape == (tm // 64, n // 8, 1, 1, 2, 1, 1, 1, 1), regs.shape
        i32 = ir.IntegerType.get_signless(32)
        c = functools.partial(mgpu_utils.c, ty=i32)
        lane, _ = _lane_and_warp()
        group = arith.divui(lane, c(4))
        second = arith.cmpi(arith.CmpIPredicate.uge, group, c(4))  # the odd register column
        element = arith.remui(group, c(2))  # which word of the pair
        p = arith.remui(arith.divui(group, c(2)), c(2))  # 8-bit lanes p and p + 2
        shift = arith.muli(p, c(LANE_BITS))
        # word of (register column 0, element, p) in acc_ref
        index0 = arith.addi(
            arith.addi(arith.muli(p, c(lane_cols)), c(off)),
            arith.addi(arith.muli(arith.remui(lane, c(4)), c(2)), element))
        index0 = arith.addi(index0, arith.muli(arith.extui(i32, second), c(8)))
        ptr = _global_i32_ptr(ref)
        for j in range(0, n // 8, 2):
            pair = arith.select(second, _warp_column_totals(regs, tm, j + 1),
                                _warp_column_totals(regs, tm, j))
            word = llvm.extractelement(pair, element)
            counts = arith.andi(arith.shrui(word, shift), c(0x00FF00FF))
            nonzero = arith.extui(i32, arith.cmpi(arith.CmpIPredicate.ne, counts, c(0)))
            _red_add_if(ptr, arith.addi(index0, c(8 * j)), counts, nonzero, c(1))

    add(packed, acc_ref)


def _unpack_col_counts(words: jax.Array, tile_n: int) -> jax.Array:
    """[..., Fp] int32 counts from the [..., Fp / 2] words `_add_col_counts` fills: per tile, the
    low halves are its first tile_n / 2 columns and the high halves the rest."""
    *lead, half = words.shape
    tiles = words.reshape(*lead, half // (tile_n // 2), tile_n // 2)
    cols = jnp.concatenate([tiles & 0xFFFF, lax.shift_right_logical(tiles, 16)], axis=-1)
    return cols.reshape(*lead, 2 * half)


def _store_warp_col_sums_interpreted(values: jax.Array, out_ref) -> None:
    """out_ref[w, c] = the sum of values[:, c] over the rows warp w holds (rows 64 i + 16 w ..
    64 i + 16 w + 15) in plain JAX: the interpreter's stand-in for `_add_col_counts` (it can
    run neither inline Mosaic GPU nor atomics), one partial per warp as the kernel's."""
    tm, n = values.shape
    out_ref[...] = jnp.sum(values.reshape(tm // 64, WARPS, 16, n), axis=(0, 2))


# PTX for one pair of packed registers (columns c and c + 1 of a row) from four registers of h,
# each the bf16 pair of columns i * lane_cols + c, + 1 (i = 0..3): `set` compares both halves
# with 0 (NaN compares false, as h > 0 does) into 0xFFFF / 0 masks; `prmt` gathers the low byte
# of each half, column c's four into one word and column c + 1's into another; the AND leaves
# 1 / 0 bytes. Ten instructions for eight elements.
_PACK_BF16_PAIRS_PTX = """{
.reg .b32 z, m0, m1, m2, m3, x, y, p0, p1;
mov.b32 z, 0;
set.gt.u32.bf16x2 m0, $1, z;
set.gt.u32.bf16x2 m1, $2, z;
set.gt.u32.bf16x2 m2, $3, z;
set.gt.u32.bf16x2 m3, $4, z;
prmt.b32 x, m0, m1, 0x6240;
prmt.b32 y, m2, m3, 0x6240;
prmt.b32 p0, x, y, 0x5410;
prmt.b32 p1, x, y, 0x7632;
and.b32 p0, p0, 0x01010101;
and.b32 p1, p1, 0x01010101;
mov.b64 $0, {p0, p1};
}"""


def _used(h: jax.Array, c0: int, width: int) -> jax.Array:
    """The exactness rule, h > 0 on the value as stored (compared in h's dtype), for columns
    c0 .. c0 + width - 1 of h."""
    return h[:, c0:c0 + width] > jnp.zeros((), h.dtype)


def _pack_used(h: jax.Array, off: int, chunk: int, interpret: bool) -> jax.Array:
    """packed[r, c] = sum over i < 4 of (h[r, i * lane_cols + off + c] > 0) << (8 i), for
    c < chunk, lane_cols = tile_n / 4: int32 [tile_m, chunk] (WGMMA layout) from h [tile_m,
    tile_n] (WGMMA layout). For bf16 h, compiled, ten PTX instructions per eight elements
    (`_PACK_BF16_PAIRS_PTX`); otherwise, and in the interpreter (which cannot run inline Mosaic
    GPU), the same in plain JAX."""
    tm, tn = h.shape
    n_lanes = 32 // LANE_BITS
    lane_cols = tn // n_lanes
    if interpret or h.dtype != jnp.bfloat16:
        packed = None
        for i in range(n_lanes):
            used = _used(h, i * lane_cols + off, chunk)
            term = jnp.where(used, 1 << (i * LANE_BITS), 0)
            packed = term if packed is None else packed | term
        return packed

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                       return_type=plgpu.ShapeDtypeStruct((tm, chunk), jnp.int32,
                                                          layout=plgpu.Layout.WGMMA))
    def pack(ctx, arr):
        del ctx
        # Registers as in _add_col_counts: (i, j, .., r, ..) holds columns 8 j + 2 (l % 4)
        # + {0, 1} as vector<2xbf16>, so register j of column group i is j + (i lane_cols +
        # off) / 8, and the packed register has the same rows and lanes.
        assert arr.layout == fa.WGMMA_LAYOUT, arr.layout
        regs = arr.registers
        i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
        pair_ty = ir.VectorType.get((2,), i32)
        out = np.empty((tm // 64, chunk // 8) + regs.shape[2:], dtype=object)
        for idx in np.ndindex(out.shape):
            srcs = [llvm.bitcast(i32, regs[(idx[0], idx[1] + (i * lane_cols + off) // 8)
                                           + idx[2:]]) for i in range(n_lanes)]
            words = llvm.inline_asm(i64, srcs, _PACK_BF16_PAIRS_PTX, "=l,r,r,r,r")
            out[idx] = llvm.bitcast(pair_ty, words)
        return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=True)

    return pack(h)


def build_call(plan: Plan, in_dtype, out_dtype, *, with_stats: bool, with_token_mask: bool,
               num_sms: int, interpret=None, profile_dir: str | None = None,
               profile_ranges: int = 200):
    """The plgpu.kernel for one plan: f(x [Tp, Dp], w1 [Dp, Fp], b1 [Fp] bf16 or f32) -> outputs.

    Outputs: h [Tp, Fp] out_dtype; with stats also token_count [Tp], seq_count [n_seq, Fp]
    and, with the token mask, tm_part [Tp, Fp / 32] (int32; see the module docstring). Compiled,
    the kernel adds the counts atomically into zeroed arrays it is given; interpreted, it writes
    per-tile partials (tc_part [col_tiles, Tp], sc_part [row_tiles, n_seg, WARPS, Fp / 4]) that
    JAX reduces here (the interpreter runs neither inline Mosaic GPU nor atomics).
    `interpret`: None compiles; an InterpretGPUParams runs Mosaic GPU's interpreter.
    `profile_dir`: write a Mosaic GPU profiler trace (Chrome trace JSON) of each call there: the
    named phases below (mainloop, epilogue_h, and per piece of the statistics pack (the
    comparison with 0 included), token_count, seq_count, token_mask) per warpgroup, the first
    `profile_ranges` of each (their buffer takes 16 bytes per range and warpgroup of shared
    memory); for bench/profile_mosaic.py."""
    cfg = plan.config
    cfg.validate()
    check_smem(cfg, in_dtype, out_dtype)
    in_dtype, out_dtype = jnp.dtype(in_dtype), jnp.dtype(out_dtype)
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    m_iters, n_iters, k_iters = plan.Tp // cta_m, plan.Fp // cta_n, plan.Dp // tk
    epi_m, epi_n = 64, cfg.epi_tile_n
    n_epi = (tm // epi_m) * (tn // epi_n)
    L, T, n_seg, aligned = plan.seq_len, plan.T, plan.n_seg, plan.aligned
    n_seq = plan.n_seq
    is_interpret = interpret is not None
    if with_stats and not is_interpret and plan.seq_len > MAX_SEQ_LEN:
        raise ValueError(
            f"mosaic_gpu: seq_len={plan.seq_len} > {MAX_SEQ_LEN}: the kernel's sequence counts "
            "are 16-bit (ops.mosaic_gpu_forward counts a longer sequence in parts)")
    n_lanes = 32 // LANE_BITS
    lane_cols = tn // n_lanes
    chunk = min(lane_cols, BITS_PER_WORD)  # columns of one piece of the statistics

    swizzle = plgpu.find_swizzle(tk * in_dtype.itemsize * 8)
    in_transforms = (plgpu.TilingTransform((8, swizzle // in_dtype.itemsize)),
                     plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(epi_n * out_dtype.itemsize * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_dtype.itemsize)),
                      plgpu.SwizzleTransform(out_swizzle))
    minor = 0 if cfg.grid_minor == "m" else 1
    wgmma_layout = plgpu.Layout.WGMMA

    def body(x_gmem, w_gmem, b_gmem, *refs):
        # compiled: the zeroed accumulators (inputs) token counts [Tp] and sequence-count words
        # [n_seq, Fp / 2], then the outputs h and tm_part; interpreted: the outputs h, tc_part,
        # sc_part, tm_part
        refs = list(refs)
        tc_gmem = sc_gmem = tm_gmem = None
        if with_stats and not is_interpret:
            tc_gmem, sc_gmem = refs.pop(0), refs.pop(0)
        h_gmem = refs.pop(0)
        if with_stats:
            if is_interpret:
                tc_gmem, sc_gmem = refs.pop(0), refs.pop(0)
            if with_token_mask:
                tm_gmem = refs.pop(0)

        def tile_indices(lin):
            """(m, n) of the lin-th CTA tile along a planar snake (L2 reuse)."""
            return plgpu.planar_snake(lin, (m_iters, n_iters), minor, cfg.grid_tile_width)

        def load_bias(col_tile):
            # b1 in its own dtype (bf16 or f32): converting here spares XLA a convert fusion
            # launched before the kernel
            bias = plgpu.load(b_gmem.at[pl.ds(col_tile * tn, tn)],
                              layout=wgmma_layout.reduce(0), optimized=False)
            return bias.astype(jnp.float32)

        def store_h_by_tma(h, h_tile, out_smem):
            """h [tm, tn] (registers) -> h_tile (global) in [64, epi_n] pieces through this
            warpgroup's epi_slots SMEM slots, each piece's TMA store in flight until its slot
            comes round again."""
            slots = cfg.epi_slots
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores
            for e in range(n_epi):
                ei, ej = divmod(e, tn // epi_n)
                rows = slice(ei * epi_m, (ei + 1) * epi_m)
                cols = slice(ej * epi_n, (ej + 1) * epi_n)
                if e >= slots:
                    plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                out_smem[e % slots] = h[rows, cols]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[e % slots], h_tile.at[rows, cols])

        def epilogue(acc, bias, wg, row_tile, col_tile, epi):
            """Bias, ReLU, h's store and the statistics of warpgroup `wg`'s [tm, tn] output tile
            (row tile `row_tile`, column tile `col_tile`, in units of tm and tn)."""
            row0, col0 = row_tile * tm, col_tile * tn
            h_tile = h_gmem.at[pl.ds(row0, tm), pl.ds(col0, tn)]
            with jax.named_scope("epilogue_h"):
                pre = acc + lax.broadcast_in_dim(bias, (tm, tn), [1])
                h = jnp.maximum(pre, 0.0).astype(out_dtype)
                if cfg.h_store == "direct":
                    h_tile[...] = h
                else:
                    store_h_by_tma(h, h_tile, epi["out_smem"].at[wg])
            if with_stats:
                statistics(h, row0, row_tile, col_tile)

        def segment_bounds(row0):
            """(None, [None]) when every row of the tile is in one sequence (aligned); else the
            tile's row iota [tm, chunk] and the [start, stop) rows of each of its n_seg
            segments."""
            if aligned:
                return None, [None]
            local = plgpu.broadcasted_iota(jnp.int32, (tm, chunk), 0, layout=wgmma_layout)
            first = lax.div(row0, L)
            bounds = []
            for s in range(n_seg):
                start = (first + s) * L - row0
                bounds.append((start, jnp.minimum(start + L, T - row0)))
            return local, bounds

        def statistics(h, row0, row_tile, col_tile):
            """The statistics of one [tm, tn] tile of h whose first row is row0 (module
            docstring), over [tm, chunk] column pieces so that only h and one piece's values are
            live (all of `used` as int32 would be 128 registers a thread at 128 x 128, and
            spilled)."""
            local, bounds = segment_bounds(row0)
            if with_token_mask:
                bit = plgpu.broadcasted_iota(jnp.int32, (tm, chunk), 1, layout=wgmma_layout)
            token_count = None
            mask_words = {}
            # Piece (i, off) is columns i * lane_cols + off .. + chunk - 1: lane i of the packed
            # words off .. off + chunk - 1.
            for off in range(0, lane_cols, chunk):
                if with_token_mask:
                    with jax.named_scope("token_mask"):
                        for i in range(n_lanes):
                            c0 = i * lane_cols + off
                            used = _used(h, c0, chunk)
                            # used << (c % 32) summed over a word's columns: their OR.
                            w = c0 // BITS_PER_WORD
                            part = jnp.sum(jnp.where(
                                used, lax.shift_left(1, bit + c0 % BITS_PER_WORD), 0), axis=1)
                            mask_words[w] = part if w not in mask_words else mask_words[w] + part
                with jax.named_scope("pack"):
                    packed = _pack_used(h, off, chunk, is_interpret)
                with jax.named_scope("token_count"):
                    lanes = jnp.sum(packed, axis=1)  # four counts of up to 64 per row
                    token_count = lanes if token_count is None else token_count + lanes
                for s, seg in enumerate(bounds):
                    vals = packed
                    if seg is not None:
                        start, stop = seg
                        vals = jnp.where((local >= start) & (local < stop), packed, 0)
                    with jax.named_scope("seq_count"):
                        if is_interpret:
                            _store_warp_col_sums_interpreted(
                                vals, sc_gmem.at[row_tile, s, :,
                                                 pl.ds(col_tile * lane_cols + off, chunk)])
                        else:
                            # A segment past the last sequence has no rows (all masked): its
                            # zeros go to the last sequence's row, so any index is in bounds.
                            seq = jnp.minimum(lax.div(row0, L) + s, n_seq - 1)
                            _add_col_counts(
                                vals, sc_gmem.at[seq, pl.ds(col_tile * (tn // 2), tn // 2)],
                                off, lane_cols)
            with jax.named_scope("token_count"):  # add each row's four lanes
                pairs = ((token_count & 0x00FF00FF)
                         + (lax.shift_right_logical(token_count, 8) & 0x00FF00FF))
                counts = (pairs & 0xFFFF) + lax.shift_right_logical(pairs, 16)
                if is_interpret:
                    tc_gmem.at[col_tile, pl.ds(row0, tm)][...] = counts
                else:
                    _add_row_counts(counts, tc_gmem.at[pl.ds(row0, tm)])
            if with_token_mask:
                with jax.named_scope("token_mask"):
                    words = tn // BITS_PER_WORD
                    for w, word in mask_words.items():
                        tm_gmem.at[pl.ds(row0, tm), col_tile * words + w][...] = word

        # The epilogue's SMEM (both schedules): h staging per compute warpgroup.
        epi_scoped = {}
        if cfg.h_store == "tma":
            epi_scoped["out_smem"] = plgpu.SMEM((2, cfg.epi_slots, epi_m, epi_n), out_dtype,
                                                transforms=out_transforms)

        def cooperative():
            """Both compute warpgroups consume every stage of one ring and split the CTA tile
            (`emit_pipeline_warp_specialized`); their epilogues run at the same time."""
            def get_pipeline(step, compute_context):
                return plgpu.emit_pipeline_warp_specialized(
                    step,
                    grid=(k_iters,),
                    memory_registers=MEMORY_REGISTERS,
                    in_specs=[
                        plgpu.BlockSpec((cta_m, tk), lambda k: (0, k), transforms=in_transforms,
                                        memory_space=plgpu.SMEM),
                        plgpu.BlockSpec((tk, cta_n), lambda k: (k, 0), transforms=in_transforms,
                                        memory_space=plgpu.SMEM),
                    ],
                    wg_axis="wg",
                    num_compute_wgs=2,
                    max_concurrent_steps=cfg.stages,
                    compute_context=compute_context,
                )

            ignore = lambda *_, **__: None  # noqa: E731
            pipeline_allocs = get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem)

            @functools.partial(pl.run_scoped, pipeline_allocs=pipeline_allocs, **epi_scoped,
                               collective_axes="wg")
            def _scope(pipeline_allocs, **epi):
                wg = lax.axis_index("wg")

                @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
                def _tile_loop(loop_info):
                    (lin,) = loop_info.index
                    m_idx, n_idx = tile_indices(lin)
                    cta_rows = pl.ds(m_idx * cta_m, cta_m)
                    cta_cols = pl.ds(n_idx * cta_n, cta_n)
                    if cfg.wg_dim == "m":
                        wg_rows, wg_cols = pl.ds(wg * tm, tm), slice(None)
                        row_tile, col_tile = m_idx * 2 + wg, n_idx
                    else:
                        wg_rows, wg_cols = slice(None), pl.ds(wg * tn, tn)
                        row_tile, col_tile = m_idx, n_idx * 2 + wg

                    def compute_context(eval_pipeline):
                        @functools.partial(pl.run_scoped,
                                           acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                        def _acc_scope(acc_ref):
                            with jax.named_scope("mainloop"):
                                eval_pipeline(acc_ref)
                            epilogue(acc_ref[...], load_bias(col_tile), wg, row_tile, col_tile,
                                     epi)

                    def mma_step(idxs, x_smem, w_smem, acc_ref):
                        del idxs
                        plgpu.wgmma(acc_ref, x_smem.at[wg_rows], w_smem.at[:, wg_cols])
                        plgpu.wgmma_wait(0)
                        return acc_ref

                    get_pipeline(mma_step, compute_context)(
                        x_gmem.at[cta_rows, :], w_gmem.at[:, cta_cols],
                        allocations=pipeline_allocs)

        def pingpong():
            """Each compute warpgroup owns whole [tm, tn] output tiles (this CTA's even or odd
            ones); the memory warpgroup streams every tile's steps in order through one SMEM
            ring, so a warpgroup's mainloop starts when the other's is nearly done: one's
            epilogue runs while the other's wgmmas keep the tensor cores busy. One ring for both
            (not one each) doubles how far ahead of the running mainloop the loads can be: 6
            shared stages instead of 3 each took the kernel with statistics from 1.22 to 1.14 of
            XLA's GEMM at 8192x1024x32768 (bench/RESULTS.md)."""
            S = cfg.stages
            ring_x = plgpu.SMEM((S, tm, tk), in_dtype, transforms=in_transforms)
            ring_w = plgpu.SMEM((S, tk, tn), in_dtype, transforms=in_transforms)
            # Per compute warpgroup and stage, index wg * S + slot: "loaded" (two TMA arrivals:
            # x and w) and "consumed". A stage serves both warpgroups in turn, but each barrier
            # sees only its own warpgroup's uses of it, so whoever waits on a barrier waits on
            # each of its phases in order (a waiter must not fall two phases behind: mbarrier
            # waits go by phase parity).
            loaded = plgpu.Barrier(num_arrivals=2, num_barriers=2 * S)
            consumed = plgpu.Barrier(num_arrivals=1, num_barriers=2 * S)
            # cfg.ordered: "mainloop done", one per compute warpgroup, arrived after each of its
            # mainloops; the other waits on each phase in turn before its next mainloop. (Also
            # allocated, unused, when not ordered: 16 bytes, and the kernels timed and tested on
            # the H200 have them.)
            done = plgpu.Barrier(num_arrivals=1, num_barriers=2)

            def local_tile_count():
                """How many output tiles this CTA takes (nd_loop: tiles sm, sm + num_sms, ...)."""
                n_tiles = m_iters * n_iters
                return jnp.maximum(n_tiles - lax.axis_index("sm") + num_sms - 1, 0) // num_sms

            def owner(step):
                """The compute warpgroup of this CTA's step `step` (its tiles in order, k_iters
                steps each, tile i to warpgroup i % 2)."""
                return lax.rem(lax.div(step, k_iters), 2)

            @functools.partial(pl.run_scoped, ring_x=ring_x, ring_w=ring_w, loaded=loaded,
                               consumed=consumed, done=done, **epi_scoped,
                               collective_axes="wg")
            def _scope(ring_x, ring_w, loaded, consumed, done, **epi):
                wg = lax.axis_index("wg")

                @pl.when(wg == 2)
                def _memory():
                    plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

                    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
                    def _tile_loop(loop_info):
                        (lin,) = loop_info.index
                        m_idx, n_idx = tile_indices(lin)
                        first_step = loop_info.local_index * k_iters
                        # this tile's owner's "loaded" barriers (owner(step) of its steps)
                        loaded_base = (loop_info.local_index % 2) * S

                        def load(k, carry):
                            step = first_step + k
                            slot = lax.rem(step, S)

                            @pl.when(step >= S)
                            def _():
                                plgpu.barrier_wait(consumed.at[owner(step - S) * S + slot])

                            plgpu.copy_gmem_to_smem(
                                x_gmem.at[pl.ds(m_idx * tm, tm), pl.ds(k * tk, tk)],
                                ring_x.at[slot], loaded.at[loaded_base + slot])
                            plgpu.copy_gmem_to_smem(
                                w_gmem.at[pl.ds(k * tk, tk), pl.ds(n_idx * tn, tn)],
                                ring_w.at[slot], loaded.at[loaded_base + slot])
                            return carry

                        lax.fori_loop(0, k_iters, load, None)

                    # Observe each stage's last release too (every phase of a barrier is
                    # waited for by the thread that waits on it).
                    steps = local_tile_count() * k_iters
                    for slot in range(S):
                        @pl.when(steps > slot)
                        def _():
                            last = slot + lax.div(steps - 1 - slot, S) * S
                            plgpu.barrier_wait(consumed.at[owner(last) * S + slot])

                @pl.when(wg < 2)
                def _compute():
                    plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")

                    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
                    def _tile_loop(loop_info):
                        @pl.when(loop_info.local_index % 2 == wg)
                        def _mine():
                            (lin,) = loop_info.index
                            m_idx, n_idx = tile_indices(lin)
                            bias = load_bias(n_idx)
                            first_step = loop_info.local_index * k_iters

                            def release(step):
                                plgpu.barrier_arrive(consumed.at[wg * S + lax.rem(step, S)])

                            @functools.partial(pl.run_scoped,
                                               acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                            def _acc_scope(acc_ref):
                                # One wgmma stays in flight: step k is issued before step k - 1
                                # is waited for, then k - 1's stage is released.
                                def mma(k, carry):
                                    slot = lax.rem(first_step + k, S)
                                    plgpu.barrier_wait(loaded.at[wg * S + slot])
                                    plgpu.wgmma(acc_ref, ring_x.at[slot], ring_w.at[slot])
                                    plgpu.wgmma_wait(1)

                                    @pl.when(k > 0)
                                    def _():
                                        release(first_step + k - 1)

                                    return carry

                                if cfg.ordered:
                                    @pl.when(loop_info.local_index > 0)
                                    def _():  # the other's mainloop of the tile before
                                        plgpu.barrier_wait(done.at[1 - wg])

                                with jax.named_scope("mainloop"):
                                    lax.fori_loop(0, k_iters, mma, None)
                                    plgpu.wgmma_wait(0)
                                    release(first_step + k_iters - 1)
                                if cfg.ordered:
                                    plgpu.barrier_arrive(done.at[wg])
                                epilogue(acc_ref[...], bias, wg, m_idx, n_idx, epi)

                    if cfg.ordered:
                        # Observe the other's last arrival too, when no tile of ours followed
                        # it: warpgroup 0 waits once per tile of its own after the first, so
                        # for an even count of local tiles warpgroup 1's last is left over;
                        # warpgroup 1 waits once per own tile, leaving 0's last when odd.
                        n_local = local_tile_count()
                        left_over = jnp.where(wg == 0, (n_local > 0) & (n_local % 2 == 0),
                                              n_local % 2 == 1)

                        @pl.when(left_over)
                        def _():
                            plgpu.barrier_wait(done.at[1 - wg])

        if cfg.wg_dim == "pingpong":
            pingpong()
        else:
            cooperative()
        # Every TMA store has landed before the kernel exits.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_type = [jax.ShapeDtypeStruct((plan.Tp, plan.Fp), out_dtype)]
    if with_stats and is_interpret:
        out_type += [jax.ShapeDtypeStruct((plan.col_tiles, plan.Tp), jnp.int32),
                     jax.ShapeDtypeStruct((plan.row_tiles, n_seg, WARPS, plan.Fp // 4),
                                          jnp.int32)]
    if with_stats and with_token_mask:
        out_type.append(jax.ShapeDtypeStruct((plan.Tp, plan.Fp // BITS_PER_WORD), jnp.int32))
    kernel = plgpu.kernel(
        body,
        out_type=tuple(out_type),
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane,
            **(dict(profile_space=profile_ranges, profile_dir=profile_dir,
                    profile_bounds_check=True) if profile_dir else {})),
        interpret=interpret,
    )
    if not with_stats:
        return kernel
    if is_interpret:
        def call(x, w, b):
            h, tc_part, sc_part, *token_mask = kernel(x, w, b)
            return (h, jnp.sum(tc_part, axis=0, dtype=jnp.int32),
                    _interpreted_sequence_counts(sc_part, plan), *token_mask)
        return call

    def call(x, w, b):
        token_count = jax.new_ref(jnp.zeros((plan.Tp,), jnp.int32))
        seq_words = jax.new_ref(jnp.zeros((n_seq, plan.Fp // 2), jnp.int32))
        h, *token_mask = kernel(x, w, b, token_count, seq_words)
        return (h, jax.freeze(token_count), _unpack_col_counts(jax.freeze(seq_words), tn),
                *token_mask)
    return call


def _interpreted_sequence_counts(sc_part: jax.Array, plan: Plan) -> jax.Array:
    """seq_count [n_seq, Fp] from the interpreted kernel's per-warp column counts sc_part
    [row_tiles, n_seg, WARPS, Fp / 4]: four 8-bit lanes per int32, lane i of a tile's word c
    being column i * tile_n / 4 + c of that tile; segment s of row tile t is sequence
    plan.segment_ids()[t, s] (n_seq: none)."""
    tn, n_seq = plan.config.tile_n, plan.n_seq
    lanes = [lax.shift_right_logical(sc_part, LANE_BITS * i) & 0xFF for i in range(4)]
    lead, words = sc_part.shape[:-1], sc_part.shape[-1]
    per_tile = jnp.stack([a.reshape(*lead, words * 4 // tn, tn // 4) for a in lanes], axis=-2)
    seq_part = per_tile.reshape(*lead, plan.Fp).sum(axis=2, dtype=jnp.int32)
    ids = jnp.asarray(plan.segment_ids().reshape(-1))
    return jnp.zeros((n_seq + 1, plan.Fp), jnp.int32).at[ids].add(
        seq_part.reshape(-1, plan.Fp))[:n_seq]
