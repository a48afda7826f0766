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
    warpgroup's wgmmas.
Output tiles are visited by `plgpu.nd_loop` over a planar snake (L2 reuse), as in JAX's example
Hopper matmul (jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py), which this follows.

Epilogue of one compute warpgroup (registers in the WGMMA layout):
  h = max(acc + b1, 0) rounded to the output dtype; written in [64, epi_tile_n] pieces through
  `epi_slots` SMEM slots and TMA (`copy_smem_to_gmem`), or with h_store="direct" from registers
  straight to global memory. With statistics, `used = h > 0` on
  the *rounded* value (the exactness rule), then:
  token_count  row sums of `used` (a reduction across the lanes of a quad: no SMEM) -> one
               partial [tile_m] per column tile: tc_part [Fp / tile_n, Tp] int32, stored from
               registers. JAX adds the Fp / tile_n partials (a [n, T] sum).
  seq_count    column sums of `used` over the rows of each sequence segment that meets the row
               tile -> sc_part [Tp / tile_m, n_seg, Fp] int32. The rows of a tile are spread over
               the four warps, so this reduction crosses warps (shuffles within a warp, then
               SMEM). It is summed four columns per int32 (8-bit lanes: a count is at most
               tile_m < 256; 16-bit lanes two per int32 at tile_m = 256), so the shuffles and
               SMEM rounds are a quarter of one per column, then unpacked. Pallas's own
               `jnp.sum(axis=0)` uses one scratch area shared by every warpgroup, which the two
               compute warpgroups would race on, so the compiled kernel calls
               `FragmentedArray.reduce` through `plgpu.inline_mgpu` with a scratch area of its
               own per warpgroup (`_col_sum`; the interpreter, which cannot run inline Mosaic GPU,
               takes `jnp.sum`). JAX adds the partials of each sequence: with seq_len a multiple
               of tile_m (the benchmarks: 512 / 64) a [n_seq, seq_len / tile_m, F] sum, i.e.
               4 / tile_m bytes per element of h read once (3% of a bf16 h's bytes at
               tile_m = 64, 1.6% at 128).
               Sequences need not align with tiles: a tile meets at most `n_seg` sequences
               (static), and segment s of a tile counts the rows of sequence
               floor(row0 / seq_len) + s, masked by a row iota (padding rows belong to no
               sequence, so they never count).
  token_mask   word w of a row = the sum over its 32 columns c of used << (c % 32): distinct
               powers of two, so the sum is their OR (int32 addition wraps like uint32's at bit
               31). Like the token counts, a row reduction within a quad's lanes, per word; stored
               from registers into its column of tm_part [Tp, Fp / 32] int32, which is the mask
               (bitcast to uint32) once padding is sliced off. (Before: one extra wgmma per tile
               with a constant power-of-two matrix; in ping-pong it queued behind the other
               warpgroup's wgmmas: +11% at 8192x1024x32768.)
  seq_mask     left to JAX: pack_bits(seq_count > 0) on the [n_seq, F] counts (tiny).
Nothing is atomic; every partial is written exactly once, so the results are deterministic.

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
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BITS_PER_WORD = 32
# Hopper: 227 KiB of dynamic shared memory per block (sm_90 opt-in maximum; Mosaic GPU's limit).
SMEM_LIMIT_BYTES = 232448
# Per-warpgroup scratch of the cross-warp column reduction (the size Pallas reserves for its own).
REDUCTION_SCRATCH_BYTES = 128 * 4 * 4
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


def smem_bytes(config: TileConfig, in_itemsize: int, out_itemsize: int, with_stats: bool) -> int:
    """Shared memory the kernel allocates (pipeline ring, h staging, reduction scratch,
    barriers), an estimate within a few hundred bytes of Mosaic's own count."""
    ring = config.stages * (config.cta_m + config.cta_n) * config.tile_k * in_itemsize
    out = 2 * config.epi_slots * 64 * config.epi_tile_n * out_itemsize
    if config.h_store == "direct":
        out = 0
    extra = 0
    if with_stats:
        extra += 2 * REDUCTION_SCRATCH_BYTES
    barriers = 8 * (4 * config.stages + 4)  # (ping-pong: 2 warpgroups x 2 barriers per stage)
    return ring + out + extra + barriers + 2048  # + Mosaic's own (~1 KiB measured)


def check_smem(config: TileConfig, in_dtype, out_dtype, with_stats: bool) -> None:
    need = smem_bytes(config, jnp.dtype(in_dtype).itemsize, jnp.dtype(out_dtype).itemsize,
                      with_stats)
    if need > SMEM_LIMIT_BYTES:
        raise ValueError(
            f"mosaic_gpu TileConfig {config} needs about {need / 1024:.1f} KiB of shared memory "
            f"({config.stages} stages of [{config.cta_m} + {config.cta_n}] x {config.tile_k} "
            "operand blocks plus the epilogue's buffers), more than the "
            f"{SMEM_LIMIT_BYTES // 1024} KiB a Hopper block can have: use fewer stages or "
            "smaller tiles")


def fit_stages(config: TileConfig, in_dtype, out_dtype, with_stats: bool) -> TileConfig:
    """`config` with as many pipeline stages as fit in shared memory, at most its own and at
    least 2 (f32 outputs double the epilogue's buffers: a ring tuned for bf16 may not fit)."""
    fitted = config
    while fitted.stages > 2 and smem_bytes(
            fitted, jnp.dtype(in_dtype).itemsize, jnp.dtype(out_dtype).itemsize,
            with_stats) > SMEM_LIMIT_BYTES:
        fitted = dataclasses.replace(fitted, stages=fitted.stages - 1)
    return fitted


def _col_sum(values: jax.Array, scratch, interpret: bool) -> jax.Array:
    """int32 [tile_m, n] (WGMMA layout) -> [n] column sums, reduced across the four
    warps through this warpgroup's own SMEM `scratch` (see the module docstring)."""
    if interpret:
        return jnp.sum(values, axis=0)

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((values.shape[1],), jnp.int32,
                                           layout=plgpu.Layout.WGMMA.reduce(0)),
    )
    def reduce(ctx, arr, scratch_ref):
        del ctx
        return arr.reduce("add", 0, scratch=scratch_ref)

    return reduce(values, scratch)


def build_call(plan: Plan, in_dtype, out_dtype, *, with_stats: bool, with_token_mask: bool,
               num_sms: int, interpret=None, profile_dir: str | None = None,
               profile_ranges: int = 200):
    """The plgpu.kernel for one plan: f(x [Tp, Dp], w1 [Dp, Fp], b1 [Fp] f32) -> outputs.

    Outputs: h [Tp, Fp] out_dtype; with stats also tc_part [col_tiles, Tp], sc_part
    [row_tiles, n_seg, Fp] and, with the token mask, tm_part [Tp, Fp / 32] (int32).
    `interpret`: None compiles; an InterpretGPUParams runs Mosaic GPU's interpreter.
    `profile_dir`: write a Mosaic GPU profiler trace (Chrome trace JSON) of each call there: the
    named phases below (mainloop, epilogue_h, used, token_count, seq_count with seq_pack /
    seq_reduce / seq_store inside it, token_mask) per
    warpgroup, the first `profile_ranges` of each (their buffer takes 16 bytes per range and
    warpgroup of shared memory); for bench/profile_mosaic.py."""
    cfg = plan.config
    cfg.validate()
    check_smem(cfg, in_dtype, out_dtype, with_stats)
    in_dtype, out_dtype = jnp.dtype(in_dtype), jnp.dtype(out_dtype)
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    m_iters, n_iters, k_iters = plan.Tp // cta_m, plan.Fp // cta_n, plan.Dp // tk
    epi_m, epi_n = 64, cfg.epi_tile_n
    n_epi = (tm // epi_m) * (tn // epi_n)
    L, T, n_seg, aligned = plan.seq_len, plan.T, plan.n_seg, plan.aligned
    is_interpret = interpret is not None
    # seq_count's packing: 8-bit lanes hold counts up to 255 (tile_m <= 192), else 16-bit.
    lane_bits = 8 if tm < 256 else 16
    n_lanes = 32 // lane_bits
    lane_cols, lane_mask = tn // n_lanes, (1 << lane_bits) - 1

    swizzle = plgpu.find_swizzle(tk * in_dtype.itemsize * 8)
    in_transforms = (plgpu.TilingTransform((8, swizzle // in_dtype.itemsize)),
                     plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(epi_n * out_dtype.itemsize * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_dtype.itemsize)),
                      plgpu.SwizzleTransform(out_swizzle))
    minor = 0 if cfg.grid_minor == "m" else 1
    wgmma_layout = plgpu.Layout.WGMMA

    def body(x_gmem, w_gmem, b_gmem, *refs):
        refs = list(refs)
        h_gmem = refs.pop(0)
        tc_gmem = sc_gmem = tm_gmem = None
        if with_stats:
            tc_gmem, sc_gmem = refs.pop(0), refs.pop(0)
            if with_token_mask:
                tm_gmem = refs.pop(0)

        def tile_indices(lin):
            """(m, n) of the lin-th CTA tile along a planar snake (L2 reuse)."""
            return plgpu.planar_snake(lin, (m_iters, n_iters), minor, cfg.grid_tile_width)

        def load_bias(col_tile):
            return plgpu.load(b_gmem.at[pl.ds(col_tile * tn, tn)],
                              layout=wgmma_layout.reduce(0), optimized=False)

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
            if not with_stats:
                return
            # The exactness rule: "used" is h > 0 on the value as stored.
            with jax.named_scope("used"):
                used = h.astype(jnp.float32) > 0.0
                ones = jnp.where(used, 1, 0).astype(jnp.int32)
            with jax.named_scope("token_count"):
                tc_gmem.at[col_tile, pl.ds(row0, tm)][...] = jnp.sum(ones, axis=1)
            if aligned:
                segments = [None]
            else:
                local = plgpu.broadcasted_iota(jnp.int32, (tm, tn), 0, layout=wgmma_layout)
                first = lax.div(row0, L)
                segments = []
                for s in range(n_seg):
                    start = (first + s) * L - row0
                    stop = jnp.minimum(start + L, T - row0)
                    segments.append((start, stop))
            for s, seg in enumerate(segments):
                vals = ones
                if seg is not None:
                    start, stop = seg
                    vals = jnp.where((local >= start) & (local < stop), ones, 0)
                with jax.named_scope("seq_count"):
                    # Column sums of tn / n_lanes columns at a time, n_lanes counts per int32:
                    # each count is at most tm < 2^lane_bits, so the lanes never carry into
                    # each other, and the cross-warp reduction moves n_lanes times less.
                    # (Sub-phases named for bench/profile_mosaic.py.)
                    with jax.named_scope("seq_pack"):
                        packed = vals[:, :lane_cols]
                        for i in range(1, n_lanes):
                            packed = packed | lax.shift_left(
                                vals[:, i * lane_cols:(i + 1) * lane_cols], i * lane_bits)
                    with jax.named_scope("seq_reduce"):
                        sums = _col_sum(packed, epi["red_smem"].at[wg], is_interpret)
                    with jax.named_scope("seq_store"):
                        for i in range(n_lanes):
                            count = lax.shift_right_logical(sums, i * lane_bits) & lane_mask
                            sc_gmem.at[row_tile, s,
                                       pl.ds(col0 + i * lane_cols, lane_cols)][...] = count
            if with_token_mask:
                with jax.named_scope("token_mask"):
                    # Word w of a row: sum over its 32 columns c of used << (c % 32). The terms
                    # are distinct powers of two, so the sum is their OR (int32 wraps like
                    # uint32 at bit 31); a row reduction within the lanes of a quad, as for the
                    # token counts.
                    bit = plgpu.broadcasted_iota(jnp.int32, (tm, BITS_PER_WORD), 1,
                                                 layout=wgmma_layout)
                    words = tn // BITS_PER_WORD
                    for w in range(words):
                        cols = slice(w * BITS_PER_WORD, (w + 1) * BITS_PER_WORD)
                        tm_gmem.at[pl.ds(row0, tm), col_tile * words + w][...] = jnp.sum(
                            lax.shift_left(ones[:, cols], bit), axis=1)

        # The epilogue's SMEM: h staging and reduction scratch per compute warpgroup (both
        # schedules).
        epi_scoped = {}
        if cfg.h_store == "tma":
            epi_scoped["out_smem"] = plgpu.SMEM((2, cfg.epi_slots, epi_m, epi_n), out_dtype,
                                                transforms=out_transforms)
        if with_stats:
            epi_scoped["red_smem"] = plgpu.SMEM((2, REDUCTION_SCRATCH_BYTES // 4), jnp.int32)

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

            def owner(step):
                """The compute warpgroup of this CTA's step `step` (its tiles in order, k_iters
                steps each, tile i to warpgroup i % 2)."""
                return lax.rem(lax.div(step, k_iters), 2)

            @functools.partial(pl.run_scoped, ring_x=ring_x, ring_w=ring_w, loaded=loaded,
                               consumed=consumed, **epi_scoped, collective_axes="wg")
            def _scope(ring_x, ring_w, loaded, consumed, **epi):
                wg = lax.axis_index("wg")

                @pl.when(wg == 2)
                def _memory():
                    plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

                    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
                    def _tile_loop(loop_info):
                        (lin,) = loop_info.index
                        m_idx, n_idx = tile_indices(lin)
                        first_step = loop_info.local_index * k_iters
                        b = (loop_info.local_index % 2) * S

                        def load(k, carry):
                            step = first_step + k
                            slot = lax.rem(step, S)

                            @pl.when(step >= S)
                            def _():
                                plgpu.barrier_wait(consumed.at[owner(step - S) * S + slot])

                            plgpu.copy_gmem_to_smem(
                                x_gmem.at[pl.ds(m_idx * tm, tm), pl.ds(k * tk, tk)],
                                ring_x.at[slot], loaded.at[b + slot])
                            plgpu.copy_gmem_to_smem(
                                w_gmem.at[pl.ds(k * tk, tk), pl.ds(n_idx * tn, tn)],
                                ring_w.at[slot], loaded.at[b + slot])
                            return carry

                        lax.fori_loop(0, k_iters, load, None)

                    # Observe each stage's last release too (every phase of a barrier is
                    # waited for by the thread that waits on it).
                    n_tiles = m_iters * n_iters
                    sm = lax.axis_index("sm")
                    local_tiles = jnp.maximum(n_tiles - sm + num_sms - 1, 0) // num_sms
                    steps = local_tiles * k_iters
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

                                with jax.named_scope("mainloop"):
                                    lax.fori_loop(0, k_iters, mma, None)
                                    plgpu.wgmma_wait(0)
                                    release(first_step + k_iters - 1)
                                epilogue(acc_ref[...], bias, wg, m_idx, n_idx, epi)

        if cfg.wg_dim == "pingpong":
            pingpong()
        else:
            cooperative()
        # Every TMA store has landed before the kernel exits.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_type = [jax.ShapeDtypeStruct((plan.Tp, plan.Fp), out_dtype)]
    if with_stats:
        out_type += [jax.ShapeDtypeStruct((plan.col_tiles, plan.Tp), jnp.int32),
                     jax.ShapeDtypeStruct((plan.row_tiles, n_seg, plan.Fp), jnp.int32)]
        if with_token_mask:
            out_type.append(jax.ShapeDtypeStruct((plan.Tp, plan.Fp // BITS_PER_WORD),
                                                 jnp.int32))
    return plgpu.kernel(
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
