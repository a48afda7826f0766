"""Pallas Mosaic-GPU (Hopper) kernel: h = relu(x @ w1 + b1) with the sparsity statistics reduced
in the GEMM epilogue.

Structure (one CTA per SM, persistent; `plgpu.kernel` with three warpgroups), two schedules:
  * cooperative (`wg_dim="m"` or `"n"`; `cooperative_schedule`): warpgroup 2 is the memory
    thread of `plgpu.emit_pipeline_warp_specialized`, streaming x [cta_m, tile_k] and w1
    [tile_k, cta_n] blocks by TMA into one `stages`-deep SMEM ring; warpgroups 0 and 1 each own
    a [tile_m, tile_n] f32 wgmma accumulator (the CTA tile split between them along M or N) and
    both read every stage, so they reach their epilogues together and the tensor cores idle
    through them.
  * ping-pong (`wg_dim="pingpong"`; `pingpong_schedule`): warpgroups 0 and 1 take this CTA's
    output tiles in turn, whole; warpgroup 2 streams the tiles' steps in order through one SMEM
    ring serving both (hand-written pipeline: "loaded" and "consumed" barriers per warpgroup and
    stage), so one warpgroup's mainloop starts as the other's ends and each epilogue runs under
    the other warpgroup's wgmmas. With `ordered`, a warpgroup also waits for the other's
    mainloop to finish before starting its own, so the two never share the tensor cores: without
    it, a short epilogue (no statistics) lets the mainloops overlap, and both slow down (see
    bench/RESULTS.md).
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
               register adds and shuffles within the warp (a sum across the warps would go
               through SMEM, with two warpgroup barriers per round). Each warp's sums are added
               atomically into the sequence's row of zeroed int32 words [n_seq, Fp / 2], two
               columns per word in 16-bit lanes (so seq_len <= 65535: ops.counting_seq_len
               splits longer sequences into parts the kernel counts), one add per two columns
               and only where nonzero (`_add_col_counts`); JAX unpacks the words. Adding in
               the kernel spares the small XLA fusions that summing per-warp partials after the
               kernel would take (see bench/RESULTS.md).
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

Edges: the grid covers Tp x Fp (multiples of the CTA tile) and each tile Dp (a multiple of
tile_k). Each of x [T, D], w1 [D, F] and h [T, F] that TMA can address as it is (`tma_edges`,
decided per array) stays unpadded in global memory: TMA fills the parts of a load past an edge
with zeros and drops the parts of a store past one, so no padded copy of it is made (for h, no
sliced copy: a full extra pass over h). The others the caller (ops.py) pads to Tp, Dp, Fp with
zeros. h's edge is the one that matters (w1's padded copy is D x F, h's slice T x F): its SMEM
pieces take narrower tiles, or none, where that lets TMA store it (`h_tile_cols`).
Either way the kernel computes the same values past the edges: zero columns of w1 and b1 (b1 is
always padded: it is read into registers, not by TMA) give h = 0 (never used); zero rows of x
give h = relu(b1), which may be > 0, but those rows lie outside every sequence segment and their
token counts / mask words are sliced off. f32 inputs are not fed to wgmma (which would round
them to TF32): ops.py splits them into bf16 pieces (see there), and the kernel writes h in the
output dtype it is given.

Code: `build_call` picks the schedule, declares the outputs and the epilogue's SMEM and calls
`plgpu.kernel`. The parts are top-level functions of `KernelFacts` (the static facts of one
call: plan, dtypes, which statistics) and `GlobalRefs` (the kernel's global-memory refs):
`cooperative_schedule` (producer and stage loop `cooperative_pipeline`, mainloop step
`cooperative_mainloop_step`), `pingpong_schedule` (`pingpong_producer`, `pingpong_consumer`,
`pingpong_mainloop`), `epilogue` and `epilogue_statistics`, over the inline-PTX helpers of the
statistics. The module is longer than ~500 lines because it is one Pallas kernel whose parts all
read the same static plan and are traced into one Mosaic GPU module.
"""

import dataclasses
import functools
import math
from typing import Any

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

from relu_sparsity.kernels.bits import BITS_PER_WORD

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


# Field defaults are the cooperative schedule's 64x256 tiles; shapes without a tuned entry use
# DEFAULT_CONFIG below (ping-pong), not TileConfig().
@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiling, pipeline depth, schedule and epilogue of the kernel (tuned per device and
    shape: kernels/configs/mosaic_gpu.json)."""
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


# Shapes without a tuned entry: ping-pong through a 6-stage ring (faster than the cooperative
# schedule's 64x256 tiles at the untuned shapes on the H200; see bench/RESULTS.md).
DEFAULT_CONFIG = TileConfig(tile_m=128, tile_n=128, tile_k=64, stages=6, wg_dim="pingpong",
                            grid_tile_width=16)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclasses.dataclass(frozen=True)
class Unpadded:
    """Which global arrays keep their own shape, their edges left to TMA (`tma_edges`). The
    caller pads the others to whole tiles (x to [Tp, Dp], w1 to [Dp, Fp]); a padded h is
    written [Tp, Fp] and sliced to [T, F] after the kernel, a full extra pass over h."""
    x: bool = False
    w: bool = False
    h: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shapes of one call."""
    T: int
    D: int
    F: int
    seq_len: int
    config: TileConfig
    n_seg: int  # sequence segments a row tile can meet (static upper bound, >= 1)
    # Which of x [T, D], w1 [D, F] and h [T, F] stay unpadded in global memory (`tma_edges`);
    # the others are padded to [Tp, Dp], [Dp, Fp] and [Tp, Fp].
    unpadded: Unpadded = Unpadded()

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


def swizzle_cols(width: int, dtype) -> int:
    """Columns of one swizzled SMEM row for blocks `width` elements wide: the inner tile of the
    blocks' TMA copies (`KernelFacts.in_transforms`, `out_transforms`)."""
    dtype = jnp.dtype(dtype)
    return plgpu.find_swizzle(width * dtype.itemsize * 8) // dtype.itemsize


def h_tile_cols(config: TileConfig, T: int, F: int, out_dtype) -> int | None:
    """How TMA stores h [T, F] at its own shape, through [64, epi_tile_n] SMEM pieces
    (`KernelFacts.out_transforms`): the columns of the pieces' swizzled SMEM tiles, the widest
    of 128, 64 and 32 bytes that F is a whole number of (T a multiple of 8 rows); 0 where none
    is, for untiled, unswizzled pieces that TMA stores as plain [64, epi_tile_n] boxes (any T;
    rows of whole 16 bytes, TMA's stride rule); None where TMA cannot store h [T, F] at all
    (rows not whole 16 bytes, h stored from registers, or h smaller than one CTA tile). Only
    the pieces' layout differs, not their number; untiled pieces' stores from the WGMMA layout
    meet 4-way bank conflicts (rows of epi_tile_n elements)."""
    itemsize = jnp.dtype(out_dtype).itemsize
    if (config.h_store != "tma" or (F * itemsize) % 16 or T < config.cta_m
            or F < config.cta_n):
        return None
    cols = swizzle_cols(config.epi_tile_n, out_dtype)
    while T % 8 == 0 and cols * itemsize >= 32:
        if F % cols == 0:
            return cols
        cols //= 2
    return 0


def tma_edges(T: int, D: int, F: int, config: TileConfig, in_dtype, out_dtype) -> Unpadded:
    """Which of x [T, D], w1 [D, F] (in_dtype) and h [T, F] (out_dtype) can stay unpadded, each
    decided on its own. A tiled TMA copy views the global array in its SMEM tiles (8 rows by
    `swizzle_cols` columns), so each of its dimensions must be a whole number of them, and the
    array may not be smaller than one block: so for x and w1, which wgmma reads from swizzled
    tiles. h's pieces need no tiles (`h_tile_cols`). The arrays share no condition but their
    dimensions: x may stay unpadded while w1 is padded to Dp rows (TMA fills x past D with
    zeros), and h [T, F] is written whatever Tp and Fp the x and w1 blocks are padded to (TMA
    drops the stores past T and F)."""
    in_cols = swizzle_cols(config.tile_k, in_dtype)
    return Unpadded(
        x=T % 8 == 0 and T >= config.cta_m and D % in_cols == 0 and D >= config.tile_k,
        w=D % 8 == 0 and D >= config.tile_k and F % in_cols == 0 and F >= config.cta_n,
        h=h_tile_cols(config, T, F, out_dtype) is not None)


def make_plan(T: int, D: int, F: int, seq_len: int, config: TileConfig,
              unpadded: Unpadded = Unpadded()) -> Plan:
    """The plan of a call on x [T, D], w1 [D, F] counted in sequences of seq_len tokens (T a
    whole number of them: the contract's check, kernels/contract.py); `unpadded` where
    `tma_edges` allows it."""
    config.validate()
    tm = config.tile_m
    # Sequences a row tile [r0, r0 + tm) meets: the most over all tiles (computed, not bounded,
    # so that aligned layouts get exactly one segment).
    n_seg = 1
    for r0 in range(0, min(T, math.lcm(tm, seq_len)), tm):
        last = min(r0 + tm, T) - 1
        n_seg = max(n_seg, last // seq_len - r0 // seq_len + 1)
    return Plan(T=T, D=D, F=F, seq_len=seq_len, config=config, n_seg=n_seg, unpadded=unpadded)


def smem_bytes(config: TileConfig, in_itemsize: int, out_itemsize: int) -> int:
    """Shared memory the kernel allocates (pipeline ring, h staging, barriers; the statistics
    take none), an estimate within a few hundred bytes of Mosaic's own count."""
    ring = config.stages * (config.cta_m + config.cta_n) * config.tile_k * in_itemsize
    out = 0 if config.h_store == "direct" else (
        2 * config.epi_slots * 64 * config.epi_tile_n * out_itemsize)
    # ping-pong: 2 warpgroups x 2 barriers per stage, and 4 more (the 2 "done" barriers among
    # them, allocated whether ordered or not)
    barriers = 8 * (4 * config.stages + 4)
    return ring + out + barriers + 2048  # + Mosaic's own (about 1 KiB)


def check_smem(config: TileConfig, in_dtype, out_dtype) -> None:
    """Raises ValueError if `config` needs more shared memory than a Hopper block has."""
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

    packed_type = plgpu.ShapeDtypeStruct((tm, chunk), jnp.int32, layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=packed_type)
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


@dataclasses.dataclass(frozen=True)
class KernelFacts:
    """The static facts of one `build_call` that every part of the kernel reads."""
    plan: Plan
    in_dtype: jnp.dtype  # x and w1 as wgmma reads them
    out_dtype: jnp.dtype  # h
    with_stats: bool
    with_token_mask: bool
    interpret: bool  # Mosaic GPU's interpreter runs it: per-tile partials instead of atomics
    num_sms: int  # CTAs of the persistent grid

    @property
    def config(self) -> TileConfig:
        return self.plan.config

    @property
    def m_iters(self) -> int:
        """CTA tiles along M."""
        return self.plan.Tp // self.config.cta_m

    @property
    def n_iters(self) -> int:
        """CTA tiles along N."""
        return self.plan.Fp // self.config.cta_n

    @property
    def k_iters(self) -> int:
        """Pipeline steps (of tile_k) per output tile."""
        return self.plan.Dp // self.config.tile_k

    @property
    def lane_cols(self) -> int:
        """Columns per 8-bit lane of the packed statistics: tile_n / 4."""
        return self.config.tile_n // (32 // LANE_BITS)

    @property
    def chunk(self) -> int:
        """Columns of one piece of the statistics."""
        return min(self.lane_cols, BITS_PER_WORD)

    @property
    def in_transforms(self) -> tuple:
        """SMEM tiling and swizzle of the x and w1 blocks."""
        cols = swizzle_cols(self.config.tile_k, self.in_dtype)
        return (plgpu.TilingTransform((8, cols)),
                plgpu.SwizzleTransform(cols * self.in_dtype.itemsize))

    @property
    def out_transforms(self) -> tuple:
        """SMEM tiling and swizzle of the [64, epi_tile_n] h pieces."""
        plan = self.plan
        cols = (h_tile_cols(self.config, plan.T, plan.F, self.out_dtype) if plan.unpadded.h
                else swizzle_cols(self.config.epi_tile_n, self.out_dtype))
        if cols == 0:
            return ()
        return (plgpu.TilingTransform((8, cols)),
                plgpu.SwizzleTransform(cols * self.out_dtype.itemsize))


@dataclasses.dataclass(frozen=True)
class GlobalRefs:
    """The kernel's global-memory refs. The statistics' refs are None without statistics
    (token_mask also without the token mask). Compiled, token_count [Tp] and seq_count
    [n_seq, Fp / 2] are the zeroed accumulators the kernel adds into; interpreted, they are the
    per-tile partials tc_part [col_tiles, Tp] and sc_part [row_tiles, n_seg, WARPS, Fp / 4]."""
    x: Any  # [Tp, Dp], or [T, D] (plan.unpadded.x)
    w: Any  # [Dp, Fp], or [D, F]
    b: Any  # [Fp]
    h: Any  # [Tp, Fp], or [T, F]
    token_count: Any = None
    seq_count: Any = None
    token_mask: Any = None  # tm_part [Tp, Fp / 32] int32


def _global_refs(facts: KernelFacts, x_gmem, w_gmem, b_gmem, refs) -> GlobalRefs:
    """The kernel's refs by name. `refs` (after x, w1, b1): compiled, the zeroed accumulators
    (inputs) token counts and sequence-count words, then the outputs h and tm_part;
    interpreted, the outputs h, tc_part, sc_part, tm_part."""
    refs = list(refs)
    token_count = seq_count = token_mask = None
    if facts.with_stats and not facts.interpret:
        token_count, seq_count = refs.pop(0), refs.pop(0)
    h = refs.pop(0)
    if facts.with_stats:
        if facts.interpret:
            token_count, seq_count = refs.pop(0), refs.pop(0)
        if facts.with_token_mask:
            token_mask = refs.pop(0)
    return GlobalRefs(x=x_gmem, w=w_gmem, b=b_gmem, h=h, token_count=token_count,
                      seq_count=seq_count, token_mask=token_mask)


def _tile_indices(facts: KernelFacts, lin):
    """(m, n) of the lin-th CTA tile along a planar snake (L2 reuse)."""
    minor = 0 if facts.config.grid_minor == "m" else 1
    return plgpu.planar_snake(lin, (facts.m_iters, facts.n_iters), minor,
                              facts.config.grid_tile_width)


def _load_bias(b_gmem, col_tile, tile_n: int) -> jax.Array:
    """b1's columns of column tile `col_tile` as f32 [tile_n] (WGMMA column layout). b1 is
    loaded in its own dtype (bf16 or f32): converting here spares XLA a convert fusion launched
    before the kernel."""
    bias = plgpu.load(b_gmem.at[pl.ds(col_tile * tile_n, tile_n)],
                      layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
    return bias.astype(jnp.float32)


def _store_h_by_tma(config: TileConfig, h: jax.Array, h_tile, out_smem) -> None:
    """h [tile_m, tile_n] (registers) -> h_tile (global) in [64, epi_tile_n] pieces through this
    warpgroup's epi_slots SMEM slots out_smem [epi_slots, 64, epi_tile_n], each piece's TMA
    store in flight until its slot comes round again."""
    tn, slots = config.tile_n, config.epi_slots
    epi_m, epi_n = 64, config.epi_tile_n
    n_epi = (config.tile_m // epi_m) * (tn // epi_n)
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


def epilogue(facts: KernelFacts, refs: GlobalRefs, out_smem, wg, acc: jax.Array,
             bias: jax.Array, row_tile, col_tile) -> None:
    """Compute warpgroup `wg`'s output tile (row tile `row_tile`, column tile `col_tile`, in
    units of tile_m and tile_n): h = max(acc + bias, 0) in h's dtype, stored into h's tile, then
    (with statistics) `epilogue_statistics` of it. acc: the f32 accumulator [tile_m, tile_n];
    bias: f32 [tile_n]; out_smem: both compute warpgroups' h staging slots [2, epi_slots, 64,
    epi_tile_n] (None when h is stored from registers)."""
    cfg = facts.config
    tm, tn = cfg.tile_m, cfg.tile_n
    row0, col0 = row_tile * tm, col_tile * tn
    h_tile = refs.h.at[pl.ds(row0, tm), pl.ds(col0, tn)]
    with jax.named_scope("epilogue_h"):
        pre = acc + lax.broadcast_in_dim(bias, (tm, tn), [1])
        h = jnp.maximum(pre, 0.0).astype(facts.out_dtype)
        if cfg.h_store == "direct":
            h_tile[...] = h
        else:
            _store_h_by_tma(cfg, h, h_tile, out_smem.at[wg])
    if facts.with_stats:
        epilogue_statistics(facts, refs, h, row0, row_tile, col_tile)


def _segment_bounds(facts: KernelFacts, row0):
    """(None, [None]) when every row of the tile is in one sequence (aligned); else the tile's
    row iota [tile_m, chunk] and the [start, stop) rows of each of its n_seg segments."""
    plan = facts.plan
    if plan.aligned:
        return None, [None]
    tm, L = plan.config.tile_m, plan.seq_len
    local = plgpu.broadcasted_iota(jnp.int32, (tm, facts.chunk), 0, layout=plgpu.Layout.WGMMA)
    first = lax.div(row0, L)
    bounds = []
    for s in range(plan.n_seg):
        start = (first + s) * L - row0
        bounds.append((start, jnp.minimum(start + L, plan.T - row0)))
    return local, bounds


def epilogue_statistics(facts: KernelFacts, refs: GlobalRefs, h: jax.Array, row0, row_tile,
                        col_tile) -> None:
    """The statistics of one [tile_m, tile_n] tile of h (WGMMA layout) whose first row is row0
    (module docstring): its rows' used counts added into token_count, its columns' used counts
    per sequence segment added into that sequence's seq_count words and, with the token mask,
    its rows' mask words stored into token_mask. Taken over [tile_m, chunk] column pieces so
    that only h and one piece's values are live (all of `used` as int32 would be 128 registers
    a thread at 128 x 128, and spilled)."""
    plan = facts.plan
    tm, tn = plan.config.tile_m, plan.config.tile_n
    L, n_seq = plan.seq_len, plan.n_seq
    n_lanes = 32 // LANE_BITS
    lane_cols, chunk = facts.lane_cols, facts.chunk
    local, bounds = _segment_bounds(facts, row0)
    if facts.with_token_mask:
        bit = plgpu.broadcasted_iota(jnp.int32, (tm, chunk), 1, layout=plgpu.Layout.WGMMA)
    token_count = None
    mask_words = {}
    # Piece (i, off) is columns i * lane_cols + off .. + chunk - 1: lane i of the packed words
    # off .. off + chunk - 1.
    for off in range(0, lane_cols, chunk):
        if facts.with_token_mask:
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
            packed = _pack_used(h, off, chunk, facts.interpret)
        with jax.named_scope("token_count"):
            lanes = jnp.sum(packed, axis=1)  # four counts of up to 64 per row
            token_count = lanes if token_count is None else token_count + lanes
        for s, seg in enumerate(bounds):
            vals = packed
            if seg is not None:
                start, stop = seg
                vals = jnp.where((local >= start) & (local < stop), packed, 0)
            with jax.named_scope("seq_count"):
                if facts.interpret:
                    _store_warp_col_sums_interpreted(
                        vals, refs.seq_count.at[row_tile, s, :,
                                                pl.ds(col_tile * lane_cols + off, chunk)])
                else:
                    # A segment past the last sequence has no rows (all masked): its zeros go
                    # to the last sequence's row, so any index is in bounds.
                    seq = jnp.minimum(lax.div(row0, L) + s, n_seq - 1)
                    _add_col_counts(
                        vals, refs.seq_count.at[seq, pl.ds(col_tile * (tn // 2), tn // 2)],
                        off, lane_cols)
    with jax.named_scope("token_count"):  # add each row's four lanes
        pairs = ((token_count & 0x00FF00FF)
                 + (lax.shift_right_logical(token_count, 8) & 0x00FF00FF))
        counts = (pairs & 0xFFFF) + lax.shift_right_logical(pairs, 16)
        if facts.interpret:
            refs.token_count.at[col_tile, pl.ds(row0, tm)][...] = counts
        else:
            _add_row_counts(counts, refs.token_count.at[pl.ds(row0, tm)])
    if facts.with_token_mask:
        with jax.named_scope("token_mask"):
            words = tn // BITS_PER_WORD
            for w, word in mask_words.items():
                refs.token_mask.at[pl.ds(row0, tm), col_tile * words + w][...] = word


def cooperative_pipeline(facts: KernelFacts, step, compute_context):
    """The cooperative schedule's pipeline over one CTA tile's k_iters steps
    (`plgpu.emit_pipeline_warp_specialized`). Its memory warpgroup is the producer: it loads the
    x [cta_m, tile_k] and w1 [tile_k, cta_n] blocks of each step by TMA into a `stages`-deep
    SMEM ring. Both compute warpgroups run `step` on every stage, inside `compute_context`."""
    cfg = facts.config
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(facts.k_iters,),
        memory_registers=MEMORY_REGISTERS,
        in_specs=[
            plgpu.BlockSpec((cfg.cta_m, cfg.tile_k), lambda k: (0, k),
                            transforms=facts.in_transforms, memory_space=plgpu.SMEM),
            plgpu.BlockSpec((cfg.tile_k, cfg.cta_n), lambda k: (k, 0),
                            transforms=facts.in_transforms, memory_space=plgpu.SMEM),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.stages,
        compute_context=compute_context,
    )


def cooperative_mainloop_step(wg_rows, wg_cols, idxs, x_smem, w_smem, acc_ref):
    """One pipeline step of a compute warpgroup: acc_ref [tile_m, tile_n] += x_smem[wg_rows] @
    w_smem[:, wg_cols], this warpgroup's part of the stage's x [cta_m, tile_k] and w1 [tile_k,
    cta_n] blocks. Waits for its wgmma, so the pipeline may release the stage."""
    del idxs
    plgpu.wgmma(acc_ref, x_smem.at[wg_rows], w_smem.at[:, wg_cols])
    plgpu.wgmma_wait(0)
    return acc_ref


def cooperative_tile(facts: KernelFacts, refs: GlobalRefs, pipeline_allocs, out_smem, wg,
                     lin) -> None:
    """The lin-th CTA tile of the cooperative schedule, as warpgroup `wg` runs it: the pipeline
    over its steps, in which compute warpgroup wg accumulates its [tile_m, tile_n] part (the
    CTA tile split along M or N) and then runs its `epilogue`."""
    cfg = facts.config
    tm, tn = cfg.tile_m, cfg.tile_n
    m_idx, n_idx = _tile_indices(facts, lin)
    cta_rows = pl.ds(m_idx * cfg.cta_m, cfg.cta_m)
    cta_cols = pl.ds(n_idx * cfg.cta_n, cfg.cta_n)
    if cfg.wg_dim == "m":
        wg_rows, wg_cols = pl.ds(wg * tm, tm), slice(None)
        row_tile, col_tile = m_idx * 2 + wg, n_idx
    else:
        wg_rows, wg_cols = slice(None), pl.ds(wg * tn, tn)
        row_tile, col_tile = m_idx, n_idx * 2 + wg

    def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
        def _acc_scope(acc_ref):
            with jax.named_scope("mainloop"):
                eval_pipeline(acc_ref)
            epilogue(facts, refs, out_smem, wg, acc_ref[...], _load_bias(refs.b, col_tile, tn),
                     row_tile, col_tile)

    step = functools.partial(cooperative_mainloop_step, wg_rows, wg_cols)
    cooperative_pipeline(facts, step, compute_context)(
        refs.x.at[cta_rows, :], refs.w.at[:, cta_cols], allocations=pipeline_allocs)


def cooperative_schedule(facts: KernelFacts, refs: GlobalRefs, epilogue_scratch: dict) -> None:
    """The cooperative schedule (wg_dim "m" or "n"): both compute warpgroups consume every stage
    of one ring and split each CTA tile (`cooperative_pipeline`); their epilogues run at the
    same time. This CTA takes the CTA tiles sm, sm + num_sms, ... of the planar snake."""
    ignore = lambda *_, **__: None  # noqa: E731
    pipeline_allocs = cooperative_pipeline(facts, ignore, ignore).get_allocations(refs.x, refs.w)

    @functools.partial(pl.run_scoped, pipeline_allocs=pipeline_allocs, **epilogue_scratch,
                       collective_axes="wg")
    def _scope(pipeline_allocs, **scratch):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((facts.m_iters * facts.n_iters,), collective_axes="sm")
        def _tile_loop(loop_info):
            (lin,) = loop_info.index
            cooperative_tile(facts, refs, pipeline_allocs, scratch.get("out_smem"), wg, lin)


@dataclasses.dataclass(frozen=True)
class PingPongRing:
    """The ping-pong schedule's SMEM ring and barriers (`pingpong_schedule` allocates them).

    Per compute warpgroup and stage, index wg * stages + slot: "loaded" (two TMA arrivals: x and
    w) and "consumed". A stage serves both warpgroups in turn, but each barrier sees only its
    own warpgroup's uses of it, so whoever waits on a barrier waits on each of its phases in
    order (a waiter must not fall two phases behind: mbarrier waits go by phase parity).
    With `ordered`, "done" (one per compute warpgroup) is arrived after each of its mainloops;
    the other waits on each phase in turn before its next mainloop."""
    x: Any  # [stages, tile_m, tile_k]
    w: Any  # [stages, tile_k, tile_n]
    loaded: Any  # [2 * stages]
    consumed: Any  # [2 * stages]
    done: Any  # [2]


def _local_tile_count(facts: KernelFacts):
    """How many output tiles this CTA takes (nd_loop: tiles sm, sm + num_sms, ...)."""
    n_tiles = facts.m_iters * facts.n_iters
    return jnp.maximum(n_tiles - lax.axis_index("sm") + facts.num_sms - 1, 0) // facts.num_sms


def _step_owner(facts: KernelFacts, step):
    """The compute warpgroup of this CTA's step `step` (its tiles in order, k_iters steps each,
    tile i to warpgroup i % 2)."""
    return lax.rem(lax.div(step, facts.k_iters), 2)


def pingpong_producer(facts: KernelFacts, refs: GlobalRefs, ring: PingPongRing) -> None:
    """The memory warpgroup of the ping-pong schedule: for each of this CTA's tiles in order,
    the x [tile_m, tile_k] and w1 [tile_k, tile_n] blocks of its k_iters steps, loaded by TMA
    into ring slot step % stages once the stage's previous user has consumed it, signalling the
    tile's owner's "loaded" barrier."""
    cfg = facts.config
    tm, tn, tk, S = cfg.tile_m, cfg.tile_n, cfg.tile_k, cfg.stages
    k_iters = facts.k_iters
    plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

    @plgpu.nd_loop((facts.m_iters * facts.n_iters,), collective_axes="sm")
    def _tile_loop(loop_info):
        (lin,) = loop_info.index
        m_idx, n_idx = _tile_indices(facts, lin)
        first_step = loop_info.local_index * k_iters
        # this tile's owner's "loaded" barriers (_step_owner of its steps)
        loaded_base = (loop_info.local_index % 2) * S

        def load(k, carry):
            step = first_step + k
            slot = lax.rem(step, S)

            @pl.when(step >= S)
            def _():
                plgpu.barrier_wait(ring.consumed.at[_step_owner(facts, step - S) * S + slot])

            plgpu.copy_gmem_to_smem(
                refs.x.at[pl.ds(m_idx * tm, tm), pl.ds(k * tk, tk)],
                ring.x.at[slot], ring.loaded.at[loaded_base + slot])
            plgpu.copy_gmem_to_smem(
                refs.w.at[pl.ds(k * tk, tk), pl.ds(n_idx * tn, tn)],
                ring.w.at[slot], ring.loaded.at[loaded_base + slot])
            return carry

        lax.fori_loop(0, k_iters, load, None)

    # Observe each stage's last release too (every phase of a barrier is waited for by the
    # thread that waits on it).
    steps = _local_tile_count(facts) * k_iters
    for slot in range(S):
        @pl.when(steps > slot)
        def _():
            last = slot + lax.div(steps - 1 - slot, S) * S
            plgpu.barrier_wait(ring.consumed.at[_step_owner(facts, last) * S + slot])


def pingpong_mainloop(facts: KernelFacts, ring: PingPongRing, wg, acc_ref, first_step) -> None:
    """acc_ref [tile_m, tile_n] += the k_iters steps from this CTA's step `first_step` on, by
    compute warpgroup `wg`: each waits for its stage's "loaded" barrier and issues a wgmma. One
    wgmma stays in flight: step k is issued before step k - 1 is waited for, then k - 1's stage
    is released ("consumed"); the last is released once all have finished."""
    S, k_iters = facts.config.stages, facts.k_iters

    def release(step):
        plgpu.barrier_arrive(ring.consumed.at[wg * S + lax.rem(step, S)])

    def mma(k, carry):
        slot = lax.rem(first_step + k, S)
        plgpu.barrier_wait(ring.loaded.at[wg * S + slot])
        plgpu.wgmma(acc_ref, ring.x.at[slot], ring.w.at[slot])
        plgpu.wgmma_wait(1)

        @pl.when(k > 0)
        def _():
            release(first_step + k - 1)

        return carry

    lax.fori_loop(0, k_iters, mma, None)
    plgpu.wgmma_wait(0)
    release(first_step + k_iters - 1)


def pingpong_tile(facts: KernelFacts, refs: GlobalRefs, ring: PingPongRing, out_smem, wg,
                  loop_info) -> None:
    """One whole output tile of compute warpgroup `wg` (the loop_info.local_index-th of this
    CTA's tiles): `pingpong_mainloop` into a fresh accumulator (with `ordered`, after the other
    warpgroup's mainloop of the tile before has finished), then its `epilogue`."""
    cfg = facts.config
    (lin,) = loop_info.index
    m_idx, n_idx = _tile_indices(facts, lin)
    bias = _load_bias(refs.b, n_idx, cfg.tile_n)
    first_step = loop_info.local_index * facts.k_iters

    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((cfg.tile_m, cfg.tile_n), jnp.float32))
    def _acc_scope(acc_ref):
        if cfg.ordered:
            @pl.when(loop_info.local_index > 0)
            def _():  # the other's mainloop of the tile before
                plgpu.barrier_wait(ring.done.at[1 - wg])

        with jax.named_scope("mainloop"):
            pingpong_mainloop(facts, ring, wg, acc_ref, first_step)
        if cfg.ordered:
            plgpu.barrier_arrive(ring.done.at[wg])
        epilogue(facts, refs, out_smem, wg, acc_ref[...], bias, m_idx, n_idx)


def pingpong_consumer(facts: KernelFacts, refs: GlobalRefs, ring: PingPongRing, out_smem,
                      wg) -> None:
    """Compute warpgroup `wg` of the ping-pong schedule: `pingpong_tile` on this CTA's tiles
    wg, wg + 2, ... (its even or odd ones)."""
    plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")

    @plgpu.nd_loop((facts.m_iters * facts.n_iters,), collective_axes="sm")
    def _tile_loop(loop_info):
        @pl.when(loop_info.local_index % 2 == wg)
        def _mine():
            pingpong_tile(facts, refs, ring, out_smem, wg, loop_info)

    if facts.config.ordered:
        # Observe the other's last arrival too, when no tile of ours followed it: warpgroup 0
        # waits once per tile of its own after the first, so for an even count of local tiles
        # warpgroup 1's last is left over; warpgroup 1 waits once per own tile, leaving 0's
        # last when odd.
        n_local = _local_tile_count(facts)
        left_over = jnp.where(wg == 0, (n_local > 0) & (n_local % 2 == 0), n_local % 2 == 1)

        @pl.when(left_over)
        def _():
            plgpu.barrier_wait(ring.done.at[1 - wg])


def pingpong_schedule(facts: KernelFacts, refs: GlobalRefs, epilogue_scratch: dict) -> None:
    """The ping-pong schedule: each compute warpgroup owns whole [tile_m, tile_n] output tiles
    (this CTA's even or odd ones); the memory warpgroup streams every tile's steps in order
    through one SMEM ring (`PingPongRing`), so a warpgroup's mainloop starts when the other's is
    nearly done: one's epilogue runs while the other's wgmmas keep the tensor cores busy. One
    ring for both (not one each) doubles how far ahead of the running mainloop the loads can be
    (faster with statistics on the H200; see bench/RESULTS.md)."""
    cfg = facts.config
    S = cfg.stages
    ring_x = plgpu.SMEM((S, cfg.tile_m, cfg.tile_k), facts.in_dtype,
                        transforms=facts.in_transforms)
    ring_w = plgpu.SMEM((S, cfg.tile_k, cfg.tile_n), facts.in_dtype,
                        transforms=facts.in_transforms)
    loaded = plgpu.Barrier(num_arrivals=2, num_barriers=2 * S)
    consumed = plgpu.Barrier(num_arrivals=1, num_barriers=2 * S)
    # Allocated also when not ordered (16 bytes, unused), as smem_bytes counts them.
    done = plgpu.Barrier(num_arrivals=1, num_barriers=2)

    @functools.partial(pl.run_scoped, ring_x=ring_x, ring_w=ring_w, loaded=loaded,
                       consumed=consumed, done=done, **epilogue_scratch, collective_axes="wg")
    def _scope(ring_x, ring_w, loaded, consumed, done, **scratch):
        ring = PingPongRing(x=ring_x, w=ring_w, loaded=loaded, consumed=consumed, done=done)
        wg = lax.axis_index("wg")

        @pl.when(wg == 2)
        def _memory():
            pingpong_producer(facts, refs, ring)

        @pl.when(wg < 2)
        def _compute():
            pingpong_consumer(facts, refs, ring, scratch.get("out_smem"), wg)


def _out_types(facts: KernelFacts) -> tuple:
    """The kernel's outputs: h [Tp, Fp] ([T, F] unpadded); interpreted with statistics, the
    partials tc_part [col_tiles, Tp] and sc_part [row_tiles, n_seg, WARPS, Fp / 4]; with the
    token mask, tm_part [Tp, Fp / 32] int32."""
    plan = facts.plan
    h_shape = (plan.T, plan.F) if plan.unpadded.h else (plan.Tp, plan.Fp)
    out_type = [jax.ShapeDtypeStruct(h_shape, facts.out_dtype)]
    if facts.with_stats and facts.interpret:
        out_type += [jax.ShapeDtypeStruct((plan.col_tiles, plan.Tp), jnp.int32),
                     jax.ShapeDtypeStruct((plan.row_tiles, plan.n_seg, WARPS, plan.Fp // 4),
                                          jnp.int32)]
    if facts.with_stats and facts.with_token_mask:
        out_type.append(jax.ShapeDtypeStruct((plan.Tp, plan.Fp // BITS_PER_WORD), jnp.int32))
    return tuple(out_type)


def _with_count_arrays(kernel, facts: KernelFacts):
    """`kernel` as `build_call` returns it: as it is without statistics; interpreted, with its
    per-tile partials reduced by JAX; compiled, given zeroed count accumulators to add into
    (`jax.new_ref`), returning their contents with the sequence-count words unpacked."""
    plan = facts.plan
    if not facts.with_stats:
        return kernel
    if facts.interpret:
        def call(x, w, b):
            h, tc_part, sc_part, *token_mask = kernel(x, w, b)
            return (h, jnp.sum(tc_part, axis=0, dtype=jnp.int32),
                    _interpreted_sequence_counts(sc_part, plan), *token_mask)
        return call

    def call(x, w, b):
        token_count = jax.new_ref(jnp.zeros((plan.Tp,), jnp.int32))
        seq_words = jax.new_ref(jnp.zeros((plan.n_seq, plan.Fp // 2), jnp.int32))
        h, *token_mask = kernel(x, w, b, token_count, seq_words)
        return (h, jax.freeze(token_count),
                _unpack_col_counts(jax.freeze(seq_words), plan.config.tile_n), *token_mask)
    return call


def build_call(plan: Plan, in_dtype, out_dtype, *, with_stats: bool, with_token_mask: bool,
               num_sms: int, interpret=None, profile_dir: str | None = None,
               profile_ranges: int = 200):
    """The plgpu.kernel for one plan: f(x [Tp, Dp], w1 [Dp, Fp], b1 [Fp] bf16 or f32) -> outputs
    (x [T, D], w1 [D, F] where plan.unpadded.x, .w).

    Outputs: h [Tp, Fp] ([T, F] where plan.unpadded.h) out_dtype; with stats also token_count
    [Tp], seq_count [n_seq, Fp] and, with the token mask, tm_part [Tp, Fp / 32] (int32; see the
    module docstring). Compiled, the kernel adds the counts atomically into zeroed arrays it is
    given; interpreted, it writes per-tile partials (tc_part [col_tiles, Tp], sc_part
    [row_tiles, n_seg, WARPS, Fp / 4]) that JAX reduces here (the interpreter runs neither
    inline Mosaic GPU nor atomics).
    `interpret`: None compiles; an InterpretGPUParams runs Mosaic GPU's interpreter.
    `profile_dir`: write a Mosaic GPU profiler trace (Chrome trace JSON) of each call there: the
    named phases (mainloop, epilogue_h, and per piece of the statistics pack (the comparison
    with 0 included), token_count, seq_count, token_mask) per warpgroup, the first
    `profile_ranges` of each (their buffer takes 16 bytes per range and warpgroup of shared
    memory); for relu_sparsity.bench.profile_mosaic."""
    cfg = plan.config
    cfg.validate()
    check_smem(cfg, in_dtype, out_dtype)
    facts = KernelFacts(plan=plan, in_dtype=jnp.dtype(in_dtype), out_dtype=jnp.dtype(out_dtype),
                        with_stats=with_stats, with_token_mask=with_token_mask,
                        interpret=interpret is not None, num_sms=num_sms)
    if with_stats and not facts.interpret and plan.seq_len > MAX_SEQ_LEN:
        raise ValueError(
            f"mosaic_gpu: seq_len={plan.seq_len} > {MAX_SEQ_LEN}: the kernel's sequence counts "
            "are 16-bit (ops.counting_seq_len counts a longer sequence in parts)")
    schedule = pingpong_schedule if cfg.wg_dim == "pingpong" else cooperative_schedule
    # The epilogue's SMEM (both schedules): h staging slots per compute warpgroup.
    epilogue_scratch = {}
    if cfg.h_store == "tma":
        epilogue_scratch["out_smem"] = plgpu.SMEM(
            (2, cfg.epi_slots, 64, cfg.epi_tile_n), facts.out_dtype,
            transforms=facts.out_transforms)

    def body(x_gmem, w_gmem, b_gmem, *refs):
        schedule(facts, _global_refs(facts, x_gmem, w_gmem, b_gmem, refs), epilogue_scratch)
        # Every TMA store has landed before the kernel exits.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=_out_types(facts),
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
    return _with_count_arrays(kernel, facts)


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
