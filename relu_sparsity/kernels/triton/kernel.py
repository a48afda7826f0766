"""Triton kernel: h = relu(x @ w1 + b1) with the sparsity statistics reduced in the GEMM epilogue.

This module imports only `triton`: Triton's interpreter runs it in a side environment without JAX,
and it must load standalone by file path. `fused_mlp_up_kernel` is left undecorated because
`TRITON_INTERPRET` is read when `triton.jit` decorates and jax-triton refuses an interpreted
function: callers build the compiled or the interpreted kernel from it themselves,

    kernel = triton.jit(fused_mlp_up_kernel)

and launch it with the arguments `launch_plan` lists. All arrays are row-major and contiguous:
x [T, D], w1 [D, F], b1 [F], h [T, F] (strides are D, F and F; no stride arguments). The sizes
are constexprs, so every shape compiles its own kernel.

Statistics (the kernel contract, docs/design.md §2), from `used = h > 0` on h as stored (x.dtype):
  token_count [T] int32, seq_count [n_seq, F] int32, seq_mask [n_seq, W] uint32,
  token_mask [T, W] uint32, W = ceil(F / 32), unit j = bit j % 32 of word j // 32.

Three epilogue paths, picked by constexprs:
  SEQ_ALIGNED and not SEQ_PROGRAMS: one program per output tile; the tile lies in one sequence,
    so its column counts go to one seq_count row with vector atomic_adds (even and odd columns)
    and its mask words with one vector atomic_or.
  not SEQ_ALIGNED: the general case; the tile may span several sequences and loops over them.
  SEQ_PROGRAMS (needs SEQ_ALIGNED): one program per (sequence, column tile) walks the sequence's
    row tiles, keeps its column counts in registers and writes seq_count / seq_mask once with
    plain stores (no atomics, no zero-initialisation for them).
token_count is always an atomic_add (several column tiles add to each token); token_mask words
are plain stores (BLOCK_N % 32 == 0, so each word belongs to exactly one column tile).
"""

import dataclasses

import triton
import triton.language as tl

# bits.BITS_PER_WORD, written again because this module imports only triton (see above);
# tests/test_triton_lowering.py checks that the two agree.
BITS_PER_WORD = 32


@triton.jit
def _matmul_tile(x_ptr, w_ptr, offs_m, offs_bn, T: tl.constexpr, D: tl.constexpr,
                 F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, F32_DOT_PRECISION: tl.constexpr):
    """x[offs_m] @ w1[:, offs_bn] as an f32 [BLOCK_M, BLOCK_N] accumulator. Wrapped row
    indices keep the loads in bounds without masks (tutorial 03); the caller masks the stores."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_am = (offs_m % T).to(tl.int64)
    a_ptrs = x_ptr + offs_am[:, None] * D + offs_k[None, :]
    b_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * F + offs_bn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        k_left = D - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if x_ptr.dtype.element_ty == tl.float32:
            # f32 inputs: tl.dot would default to tf32; the contract is an f32 product.
            acc = tl.dot(a, b, acc, input_precision=F32_DOT_PRECISION)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * F
    return acc


@triton.jit
def _used_pairs(h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_N / 2]: 1 in the low 16 bits where column 2c of h is used, 1 << 16
    where column 2c + 1 is.

    "Used" is h > 0 on h as stored (exactness rule), never on the f32 accumulator. h is relu'd,
    so as a signed integer of its own width it is > 0 exactly when h > 0 (-0.0 is negative; on
    the GPU relu never returns NaN): one integer compare, also right where Triton's interpreter
    compares bf16 as raw uint16 bits. The epilogue costs instructions per element, so columns go
    in pairs (2c, 2c+1), which the MMA layout keeps in one thread, and one sum counts both (no
    count reaches 2^16: BLOCK_M, BLOCK_N <= 2^15)."""
    if h.dtype.primitive_bitwidth == 16:
        used = h.to(tl.int16, bitcast=True) > 0
    else:
        used = h.to(tl.int32, bitcast=True) > 0
    lo, hi = tl.split(tl.reshape(used.to(tl.int32), [BLOCK_M, BLOCK_N // 2, 2]))
    return lo + (hi << 16)


@triton.jit
def _pair_bits(c_lo, c_hi, pair_shift):
    """Column-pair counts -> their mask bits in place: bit 2(c % 16) set where column 2c counts,
    bit 2(c % 16) + 1 where column 2c + 1 does. Summed over each 16 pairs (distinct bits: the
    sum is their OR) they are the column tile's mask words."""
    two_bits = (c_lo != 0).to(tl.uint32) | ((c_hi != 0).to(tl.uint32) << 1)
    return two_bits << pair_shift


@triton.jit
def _add_sequence_stats(seq_count_ptr, seq_mask_ptr, s, col_pairs, offs_p, offs_w, mask_w,
                        pair_shift, F: tl.constexpr, num_words, WORDS_N: tl.constexpr):
    """Adds one sequence's column-pair counts of this tile to its seq_count row (two strided
    atomics: per-column work runs on every thread's replicated copy of the column vector, so it
    stays on pairs) and ORs in its mask words (zero words change nothing: no atomic)."""
    c_lo = col_pairs & 0xFFFF
    c_hi = col_pairs >> 16
    row_ptr = seq_count_ptr + s * F
    tl.atomic_add(row_ptr + offs_p, c_lo, mask=offs_p < F, sem="relaxed")
    tl.atomic_add(row_ptr + offs_p + 1, c_hi, mask=offs_p + 1 < F, sem="relaxed")
    words = tl.sum(tl.reshape(_pair_bits(c_lo, c_hi, pair_shift), [WORDS_N, 16]), axis=1)
    tl.atomic_or(seq_mask_ptr + s * num_words + offs_w, words, mask=mask_w & (words != 0),
                 sem="relaxed")


@triton.jit
def _token_stats(token_count_ptr, token_mask_ptr, pairs, offs_m, mask_m, offs_w, mask_w,
                 pair_shift, num_words, BLOCK_M: tl.constexpr, WORDS_N: tl.constexpr,
                 WITH_TOKEN_MASK: tl.constexpr):
    """Adds the tile's per-row unit counts to token_count (rows past T, wrapped only when
    T % BLOCK_M != 0, are masked here and at every store) and stores its token-mask words
    (columns past F are unused, so the padding bits come out zero)."""
    row_pairs = tl.sum(pairs, axis=1)
    tl.atomic_add(token_count_ptr + offs_m, (row_pairs & 0xFFFF) + (row_pairs >> 16),
                  mask=mask_m, sem="relaxed")
    if WITH_TOKEN_MASK:
        two_bits = ((pairs & 1) | ((pairs >> 15) & 2)).to(tl.uint32)
        tm_bits = tl.reshape(two_bits << pair_shift[None, :], [BLOCK_M, WORDS_N, 16])
        tm_row = token_mask_ptr + offs_m.to(tl.int64) * num_words
        tm_ptrs = tm_row[:, None] + offs_w[None, :]
        tl.store(tm_ptrs, tl.sum(tm_bits, axis=2), mask=mask_m[:, None] & mask_w[None, :])


def fused_mlp_up_kernel(
    # inputs
    x_ptr, w_ptr, b_ptr,
    # outputs
    h_ptr, token_count_ptr, seq_count_ptr, seq_mask_ptr, token_mask_ptr,
    # sizes: constexprs, because jax-triton gives integer arguments no divisibility hints, and
    # without them Triton cannot prove 16-byte alignment and drops the cp.async pipeline
    # (bench/RESULTS.md has the measurement)
    T: tl.constexpr, D: tl.constexpr, F: tl.constexpr, seq_len: tl.constexpr,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WITH_STATS: tl.constexpr, WITH_TOKEN_MASK: tl.constexpr, SEQ_ALIGNED: tl.constexpr,
    SEQ_PROGRAMS: tl.constexpr = False, F32_DOT_PRECISION: tl.constexpr = "ieee",
):
    WORDS_N: tl.constexpr = BLOCK_N // 32  # mask words per column tile
    num_words = tl.cdiv(F, 32)

    # Grouped ordering (Triton tutorial 03): GROUP_M row blocks sweep the column tiles together,
    # so their x rows and w columns stay in L2. A "row block" is one tile of BLOCK_M rows, or,
    # with SEQ_PROGRAMS, one whole sequence (seq_len // BLOCK_M tiles walked by one program).
    pid = tl.program_id(axis=0)
    if SEQ_PROGRAMS:
        num_pid_m = T // seq_len
        tiles_per_program = seq_len // BLOCK_M
    else:
        num_pid_m = tl.cdiv(T, BLOCK_M)
        tiles_per_program = 1
    num_pid_n = tl.cdiv(F, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < F
    offs_bn = offs_n % F  # wrapped: in-bounds loads; wrapped columns are masked out of stores
    offs_w = pid_n * WORDS_N + tl.arange(0, WORDS_N)  # this column tile's mask words
    mask_w = offs_w < num_words
    # Column pairs (2c, 2c+1), see `_used_pairs`: the first column of each, and where the pair's
    # two mask bits go in its word (bits 2(c % 16) and 2(c % 16) + 1).
    offs_p = pid_n * BLOCK_N + 2 * tl.arange(0, BLOCK_N // 2)
    pair_shift = 2 * (tl.arange(0, BLOCK_N // 2) % 16).to(tl.uint32)
    bias = tl.load(b_ptr + offs_bn).to(tl.float32)
    if WITH_STATS:
        # Columns past F get bias -inf: their h is 0, so no statistic needs a column mask.
        bias = tl.where(mask_n, bias, float("-inf"))
    seq_pairs = tl.zeros([BLOCK_N // 2], dtype=tl.int32)  # SEQ_PROGRAMS: packed column counts

    for tile in range(tiles_per_program):
        row0 = (pid_m * tiles_per_program + tile) * BLOCK_M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        acc = _matmul_tile(x_ptr, w_ptr, offs_m, offs_bn, T, D, F, BLOCK_M, BLOCK_N, BLOCK_K,
                           F32_DOT_PRECISION)
        h = tl.maximum(acc + bias[None, :], 0.0).to(h_ptr.dtype.element_ty)
        in_bounds = mask_m[:, None] & mask_n[None, :]
        tl.store(h_ptr + offs_m[:, None].to(tl.int64) * F + offs_n[None, :], h, mask=in_bounds)

        if WITH_STATS:
            pairs = _used_pairs(h, BLOCK_M, BLOCK_N)
            _token_stats(token_count_ptr, token_mask_ptr, pairs, offs_m, mask_m, offs_w, mask_w,
                         pair_shift, num_words, BLOCK_M, WORDS_N, WITH_TOKEN_MASK)
            if SEQ_PROGRAMS:
                seq_pairs += tl.sum(pairs, axis=0)
            elif SEQ_ALIGNED:  # seq_len % BLOCK_M == 0: the whole tile lies in sequence s
                _add_sequence_stats(seq_count_ptr, seq_mask_ptr, (row0 // seq_len).to(tl.int64),
                                    tl.sum(pairs, axis=0), offs_p, offs_w, mask_w, pair_shift,
                                    F, num_words, WORDS_N)
            else:
                # General case: the tile's rows may belong to several sequences. Rows past T
                # have row_seq >= n_seq and fall in none of them.
                row_seq = offs_m // seq_len
                s_first = row0 // seq_len
                s_last = (min(row0 + BLOCK_M, T) - 1) // seq_len
                for s in range(s_first, s_last + 1):
                    s_pairs = tl.sum(tl.where((row_seq == s)[:, None], pairs, 0), axis=0)
                    # (tl.cast: in the interpreter s is a Python int)
                    _add_sequence_stats(seq_count_ptr, seq_mask_ptr, tl.cast(s, tl.int64),
                                        s_pairs, offs_p, offs_w, mask_w, pair_shift, F,
                                        num_words, WORDS_N)

    if WITH_STATS and SEQ_PROGRAMS:
        # This program owns sequence pid_m for its column tile: plain stores.
        s = pid_m.to(tl.int64)
        c_lo = seq_pairs & 0xFFFF
        c_hi = seq_pairs >> 16
        tl.store(seq_count_ptr + s * F + offs_p, c_lo, mask=offs_p < F)
        tl.store(seq_count_ptr + s * F + offs_p + 1, c_hi, mask=offs_p + 1 < F)
        two_bits = _pair_bits(c_lo, c_hi, pair_shift)
        tl.store(seq_mask_ptr + s * num_words + offs_w,
                 tl.sum(tl.reshape(two_bits, [WORDS_N, 16]), axis=1), mask=mask_w)


# ----------------------------------------------------------------------------------------------
# Launch plan: pure Python, shared by the JAX wrapper (jax_triton.triton_call) and the tests.


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int  # a multiple of 32 (token_mask words are owned by one column tile)
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    # One program per (sequence, column tile), when seq_len % block_m == 0 and with stats;
    # otherwise launch_plan falls back to one program per tile.
    seq_programs: bool = False


# 128x256 tiles (144 KiB of shared memory at 3 stages, one program per SM) and seq_programs
# (no sequence-count atomics, two fewer zeroing memsets) were the fastest with statistics in the
# device sweep (bench/device_triton.py; figures in bench/RESULTS.md).
DEFAULT_CONFIG = TileConfig(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8,
                            num_stages=3, seq_programs=True)


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "same-as-x", "int32" or "uint32"
    zeroed: bool  # must be zero-initialised before launch (atomically accumulated)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    grid: tuple[int, ...]
    # Kernel order: h, token_count, seq_count, seq_mask, token_mask. Outputs not asked for (all
    # statistics without with_stats, token_mask without with_token_mask) are 1-element dummies
    # the kernel never touches; the caller drops them.
    outputs: tuple[OutputSpec, ...]
    constexprs: dict  # keyword meta-parameters
    num_warps: int
    num_stages: int

    @property
    def zeroed_outputs(self) -> tuple[int, ...]:
        """Indices into `outputs` to zero before launch (jax_triton's `zeroed_outputs`)."""
        return tuple(i for i, o in enumerate(self.outputs) if o.zeroed)


def launch_plan(T: int, D: int, F: int, seq_len: int, config: TileConfig = DEFAULT_CONFIG,
                with_stats: bool = True, with_token_mask: bool = False) -> LaunchPlan:
    """Grid, arguments and outputs for one launch of `fused_mlp_up_kernel`. T must be a whole
    number of sequences (the kernel contract's check, kernels/contract.py)."""
    for name, v in (("T", T), ("D", D), ("F", F), ("seq_len", seq_len)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    c = config
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(c, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"config.{name} must be a power of two >= 16, got {v}")
    if c.block_n % BITS_PER_WORD:
        raise ValueError(f"config.block_n must be a multiple of 32, got {c.block_n}")
    seq_aligned = seq_len % c.block_m == 0
    # Without stats there is nothing per sequence to keep, and a sequence that is not a whole
    # number of row tiles cannot be one program's: use the tile grid then. (A program's packed
    # per-column counts hold up to 2^16 - 1 tokens.)
    seq_programs = c.seq_programs and with_stats and seq_aligned and seq_len < 2 ** 16

    n_seq = T // seq_len
    W = triton.cdiv(F, BITS_PER_WORD)
    num_pid_n = triton.cdiv(F, c.block_n)
    num_pid_m = n_seq if seq_programs else triton.cdiv(T, c.block_m)

    def out(name, shape, dtype, zeroed, wanted):
        if not wanted:
            return OutputSpec(name, (1,), dtype, False)
        return OutputSpec(name, shape, dtype, zeroed)

    outputs = (
        OutputSpec("h", (T, F), "same-as-x", False),
        out("token_count", (T,), "int32", True, with_stats),
        out("seq_count", (n_seq, F), "int32", not seq_programs, with_stats),
        out("seq_mask", (n_seq, W), "uint32", not seq_programs, with_stats),
        out("token_mask", (T, W), "uint32", False, with_stats and with_token_mask),
    )
    constexprs = dict(
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        WITH_STATS=with_stats, WITH_TOKEN_MASK=with_stats and with_token_mask,
        SEQ_ALIGNED=seq_aligned, SEQ_PROGRAMS=seq_programs, F32_DOT_PRECISION="ieee",
    )
    constexprs.update(T=T, D=D, F=F, seq_len=seq_len)
    return LaunchPlan(grid=(num_pid_m * num_pid_n,), outputs=outputs,
                      constexprs=constexprs, num_warps=c.num_warps, num_stages=c.num_stages)
