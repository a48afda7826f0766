"""The Triton kernel under Triton's interpreter (CPU, torch tensors), against NumPy.

Runs in the Triton side environment (Python 3.11, torch CPU, triton 3.6, numpy, pytest; no JAX):
    TRITON_INTERPRET=1 /work/venv311/bin/python -m pytest -q tests/interpreter
kernel.py is loaded by file path so that the package's JAX-importing __init__ never runs.
"""

import dataclasses
import importlib.util
import os
import pathlib

os.environ["TRITON_INTERPRET"] = "1"  # read when triton.jit decorates, so before that

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

_PATH = pathlib.Path(__file__).parents[2] / "relu_sparsity" / "kernels" / "triton" / "kernel.py"
_spec = importlib.util.spec_from_file_location("relu_sparsity_triton_kernel", _PATH)
K = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(K)
KERNEL = triton.jit(K.fused_mlp_up_kernel)

# Triton 3.6's interpreter stores bf16 as uint16 and its tl.dot multiplies those raw bits as
# integers (it converts only fp8 operands): convert bf16 operands to f32 first, which is what the
# tensor cores do (bf16 products are exact in f32).
_builder_cls = interpreter.InterpreterBuilder
_create_dot = _builder_cls.create_dot


def _create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
    if a.dtype.scalar == tl.bfloat16:
        a, b = self.cast_impl(a, tl.float32), self.cast_impl(b, tl.float32)
    return _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


_builder_cls.create_dot = _create_dot_bf16
# Triton's interpreter converts 1-element arrays to ints (deprecated in NumPy 1.25, an error
# from NumPy 2.4 on: the side environment pins numpy<2.4).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# Small tiles keep the interpreter fast; block_n must be a multiple of 32.
SMALL = K.TileConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=1)
SEQ_PROGRAMS = K.TileConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4,
                            num_stages=1, seq_programs=True)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SENTINEL = 0x5A5A5A5A  # fills outputs that the kernel must overwrite (or must leave alone)
GUARD = 64  # sentinel elements behind every output buffer


def run_kernel(x, w, b, seq_len, config, with_stats, with_token_mask):
    """Launches the kernel as the JAX wrapper does: everything from launch_plan."""
    T, D = x.shape
    F = w.shape[1]
    plan = K.launch_plan(T, D, F, seq_len, config, with_stats, with_token_mask)
    outs, guards = [], []
    for o in plan.outputs:
        # Each output is the front of a buffer with GUARD sentinel elements behind it, which
        # the kernel must not write.
        size = int(np.prod(o.shape))
        if o.dtype == "same-as-x":
            buf = torch.full((size + GUARD,), float("nan"), dtype=x.dtype)
            buf[size:] = SENTINEL
        else:
            dtype = {"int32": torch.int32, "uint32": torch.uint32}[o.dtype]
            buf = torch.full((size + GUARD,), SENTINEL, dtype=torch.int64)
            if o.zeroed:
                buf[:size] = 0
            buf = buf.to(dtype)
        outs.append(buf[:size].view(o.shape))
        guards.append((buf[size:], buf[size:].clone()))
    KERNEL[plan.grid](x, w, b, *outs, num_warps=plan.num_warps,
                      num_stages=plan.num_stages, **plan.constexprs)
    for o, (guard, before) in zip(plan.outputs, guards):
        assert torch.equal(guard.view(torch.int8), before.view(torch.int8)), f"{o.name}: overrun"
    return plan, {o.name: t for o, t in zip(plan.outputs, outs)}


def np_pack_bits(used):
    """bool [..., F] -> uint32 [..., ceil(F/32)], unit j = bit j % 32 of word j // 32."""
    F = used.shape[-1]
    pad = -F % 32
    padded = np.pad(used, [(0, 0)] * (used.ndim - 1) + [(0, pad)])
    return np.packbits(padded, axis=-1, bitorder="little").view("<u4").astype(np.uint32)


def stats_from_h(h, seq_len):
    """The contract's statistics from an h [T, F] (f32 NumPy)."""
    used = h > 0
    T, F = used.shape
    seq_count = used.reshape(T // seq_len, seq_len, F).sum(axis=1, dtype=np.int32)
    return dict(token_count=used.sum(axis=1, dtype=np.int32), seq_count=seq_count,
                seq_mask=np_pack_bits(seq_count > 0), token_mask=np_pack_bits(used))


def to_np(t):
    if t.dtype == torch.uint32:
        return t.to(torch.int64).numpy().astype(np.uint32)
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def make_inputs(T, D, F, dtype, seed):
    """Random inputs with about half the units used, plus units that are never / always on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w = torch.randn(D, F, generator=g) / D ** 0.5
    b = 0.3 * torch.randn(F, generator=g)
    b[::7] = -100.0  # dead units: seq_count 0, mask bits 0
    b[3::11] = 100.0  # always on
    return x.to(DTYPES[dtype]), w.to(DTYPES[dtype]), b.to(DTYPES[dtype])


def check(x, w, b, seq_len, config, with_stats=True, with_token_mask=True):
    F = w.shape[1]
    plan, out = run_kernel(x, w, b, seq_len, config, with_stats, with_token_mask)
    h = to_np(out["h"])
    ref = np.maximum(x.double().numpy() @ w.double().numpy() + b.double().numpy(), 0.0)
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(h, ref, rtol=tol, atol=tol)  # NaN: an element never written
    if not with_stats:
        for name in ("token_count", "seq_count", "seq_mask", "token_mask"):
            assert out[name].shape == (1,) and to_np(out[name])[0] == SENTINEL, name
        return plan, out
    # Own-h rule: the integer outputs equal the statistics of the kernel's returned h, exactly.
    want = stats_from_h(h, seq_len)
    names = ["token_count", "seq_count", "seq_mask"] + (["token_mask"] if with_token_mask else [])
    for name in names:
        got = to_np(out[name])
        assert got.shape == want[name].shape, name
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    if not with_token_mask:
        assert out["token_mask"].shape == (1,) and to_np(out["token_mask"])[0] == SENTINEL
    # Padding bits past F are zero (implied by the equality above; stated for clarity).
    if F % 32:
        assert not np.any(to_np(out["seq_mask"])[:, -1] >> np.uint32(F % 32))
    return plan, out


# (T, D, F, seq_len): which epilogue path each case takes with SMALL (block_m 16, block_n 32).
CASES = [
    pytest.param(48, 24, 70, 4, id="4-seqs-per-tile"),  # general path, tiles hold whole seqs
    pytest.param(48, 24, 70, 6, id="seqs-straddle-tiles"),  # general path, seqs cut by tiles
    pytest.param(64, 20, 45, 32, id="2-tiles-per-seq-aligned"),  # SEQ_ALIGNED path
    pytest.param(48, 16, 45, 24, id="tiles-per-seq-unaligned"),  # general, tile spans 2 seqs
    pytest.param(40, 8, 33, 20, id="partial-last-row-tile"),  # T % block_m != 0
    pytest.param(20, 12, 5, 1, id="seq_len-1-F-5"),
    pytest.param(32, 3, 1, 16, id="F-1-D-3-aligned"),
    pytest.param(48, 32, 100, 48, id="one-seq-F-100"),  # seq_len == T, 3 tiles per seq
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T,D,F,seq_len", CASES)
def test_stats_with_token_mask(T, D, F, seq_len, dtype):
    x, w, b = make_inputs(T, D, F, dtype, seed=T * 1000 + F + seq_len)
    plan, _ = check(x, w, b, seq_len, SMALL, with_token_mask=True)
    assert plan.constexprs["SEQ_ALIGNED"] == (seq_len % SMALL.block_m == 0)


@pytest.mark.parametrize("T,D,F,seq_len", [(48, 24, 70, 6), (64, 20, 45, 32)])
def test_stats_without_token_mask(T, D, F, seq_len):
    x, w, b = make_inputs(T, D, F, "bfloat16", seed=1)
    check(x, w, b, seq_len, SMALL, with_token_mask=False)


@pytest.mark.parametrize("T,D,F,seq_len", [(64, 20, 70, 32), (96, 16, 45, 16), (48, 8, 20, 48)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_seq_programs(T, D, F, seq_len, dtype):
    x, w, b = make_inputs(T, D, F, dtype, seed=2)
    plan, _ = check(x, w, b, seq_len, SEQ_PROGRAMS, with_token_mask=True)
    assert plan.constexprs["SEQ_PROGRAMS"]
    assert plan.grid == ((T // seq_len) * triton.cdiv(F, 32),)
    # seq_count and seq_mask are written with plain stores: no zero-initialisation asked for.
    assert [o.name for o in plan.outputs if o.zeroed] == ["token_count"]


@pytest.mark.parametrize("config", [SMALL, SEQ_PROGRAMS], ids=["tiles", "seq-programs"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_without_stats(config, dtype):
    x, w, b = make_inputs(48, 24, 70, dtype, seed=3)
    plan, _ = check(x, w, b, 16, config, with_stats=False)
    assert not plan.constexprs["WITH_STATS"] and plan.zeroed_outputs == ()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seq_len", [8, 16])
def test_small_integers_exact(dtype, seq_len):
    # |x @ w + b| <= 16 * 2 * 2 + 8: every partial sum is an integer exact in bf16 and f32, so h
    # and its statistics must equal the reference exactly, whatever the summation order.
    T, D, F = 48, 16, 40
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-2, 3, (T, D), generator=g).to(DTYPES[dtype])
    w = torch.randint(-2, 3, (D, F), generator=g).to(DTYPES[dtype])
    b = torch.randint(-8, 9, (F,), generator=g).to(DTYPES[dtype])
    _, out = run_kernel(x, w, b, seq_len, SMALL, True, True)
    ref = np.maximum(x.double().numpy() @ w.double().numpy() + b.double().numpy(), 0.0)
    np.testing.assert_array_equal(to_np(out["h"]), ref)
    want = stats_from_h(ref, seq_len)
    for name in ("token_count", "seq_count", "seq_mask", "token_mask"):
        np.testing.assert_array_equal(to_np(out[name]), want[name], err_msg=name)
    assert 0 < want["token_count"].sum() < T * F  # both used and unused units occur


def test_launch_plan():
    config = K.TileConfig(128, 128, 64, 8, 8, 3)
    plan = K.launch_plan(8192, 1024, 32768, 512, config, True, True)
    assert plan.grid == (64 * 256,)
    assert {k: plan.constexprs[k] for k in ("T", "D", "F", "seq_len")} == dict(  # constexprs
        T=8192, D=1024, F=32768, seq_len=512)
    assert [(o.name, o.shape, o.dtype, o.zeroed) for o in plan.outputs] == [
        ("h", (8192, 32768), "same-as-x", False),
        ("token_count", (8192,), "int32", True),
        ("seq_count", (16, 32768), "int32", True),
        ("seq_mask", (16, 1024), "uint32", True),
        ("token_mask", (8192, 1024), "uint32", False),
    ]
    assert plan.zeroed_outputs == (1, 2, 3)
    assert plan.constexprs["SEQ_ALIGNED"] and not plan.constexprs["SEQ_PROGRAMS"]
    assert (plan.num_warps, plan.num_stages) == (8, 3)


def test_seq_programs_plan():
    # The paper's shape with seq_programs: one program per (sequence, column tile), so only
    # token_count is accumulated atomically and needs zeroing.
    config = dataclasses.replace(K.DEFAULT_CONFIG, seq_programs=True)
    plan = K.launch_plan(8192, 1024, 32768, 512, config, True, False)
    assert plan.constexprs["SEQ_PROGRAMS"] and plan.zeroed_outputs == (1,)
    assert plan.grid == (16 * triton.cdiv(32768, config.block_n),)
    assert plan.outputs[4].shape == (1,)  # token_mask not asked for: a dummy


@pytest.mark.parametrize("seq_len", [8, 24])
def test_seq_programs_falls_back_when_unaligned(seq_len):
    # seq_len % block_m != 0: the tile grid and the general path, still exact.
    x, w, b = make_inputs(48, 16, 40, "bfloat16", seed=5)
    plan, _ = check(x, w, b, seq_len, SEQ_PROGRAMS, with_token_mask=True)
    assert not plan.constexprs["SEQ_PROGRAMS"] and not plan.constexprs["SEQ_ALIGNED"]
    assert plan.zeroed_outputs == (1, 2, 3)


@pytest.mark.parametrize("args,match", [
    ((100, 8, 8, 0, SMALL), "seq_len"),
    ((64, 8, 8, 16, K.TileConfig(16, 48, 16, 1, 4, 1)), "block_n"),
    ((64, 0, 8, 16, SMALL), "D"),
])
def test_launch_plan_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        K.launch_plan(*args, with_stats=True, with_token_mask=False)


def test_kernel_is_interpreted():
    # Guards against silently testing nothing: the kernel must run in Triton's interpreter.
    assert type(KERNEL).__name__ == "InterpretedFunction"
