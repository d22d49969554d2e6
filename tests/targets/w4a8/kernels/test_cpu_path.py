"""The C++ CPU W4A8 kernels agree bit for bit with the pure-torch reference.

The reference is ``PackedW4.int8_weight()`` + an int32 matmul and the epilogue
``((acc * s_tok) * s_ch) + bias`` in fp32. Every test here calls the ops through the
dispatcher and checks (call counters) that the C++ kernel ran; the ``cpp_kernels`` fixture
fails them when this CPU could run the extension but it did not build. The first test to
run builds the C++ extension (about a minute, then cached).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from qqq_compile.targets.w4a8.formats import PackedW4, quantize_act_per_token
from qqq_compile.targets.w4a8.kernels import cpu

qqq = torch.ops.qqq
pytestmark = pytest.mark.usefixtures("cpp_kernels")

FORMATS = [(-1, "int8"), (128, "int8"), (128, "float16")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _packed(n: int, k: int, group_size: int, gdtype: str, seed: int = 0) -> PackedW4:
    g = torch.Generator().manual_seed(seed)
    # Rows of different magnitude so channel and group scales vary.
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    return PackedW4.from_float(w, group_size if group_size <= k else -1, gdtype)


def _exact_acc(q: torch.Tensor, p: PackedW4) -> torch.Tensor:
    # float64 GEMM of int8 values is exact (|acc| << 2^53), and independent of _int_mm.
    return (q.double() @ p.int8_weight().double().t()).to(torch.int32)


def _reference(
    x: torch.Tensor, p: PackedW4, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 accumulator, output) computed with plain torch ops."""
    q, s = quantize_act_per_token(x.reshape(-1, x.shape[-1]))
    acc = _exact_acc(q, p)
    y = acc.float() * s * p.channel_scale
    if bias is not None:
        y = y + bias.float()
    return acc, y.to(out_dtype).reshape(*x.shape[:-1], -1)


@contextlib.contextmanager
def cpp_calls(**expected: int):
    """Assert that the block ran each named C++ kernel exactly that many times."""
    before = cpu.cpp_call_counts()
    yield
    after = cpu.cpp_call_counts()
    got = {op: after[op] - before[op] for op in expected}
    assert got == expected, f"C++ kernel calls {got}, expected {expected}"


def _call(x: torch.Tensor, p: PackedW4, bias: torch.Tensor | None) -> torch.Tensor:
    with cpp_calls(w4a8_linear=1):
        return qqq.w4a8_linear(x, p.qweight, p.channel_scale, p.group_scale, bias, p.group_size)


def _call_q(q: torch.Tensor, s: torch.Tensor, p: PackedW4, scale: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    with cpp_calls(w4a8_linear_q=1):
        return qqq.w4a8_linear_q(q, s, p.qweight, scale, p.group_scale, bias, p.group_size, out_dtype)


@pytest.mark.parametrize("k", [576, 1536, 4096])
@pytest.mark.parametrize("fmt", FORMATS, ids=["channel", "g128-int8", "g128-fp16"])
def test_linear_matches_reference(k: int, fmt: tuple[int, str]) -> None:
    n = 100  # not a multiple of 16 or 64: exercises the row tail of every tile shape
    p = _packed(n, k, *fmt)
    bias = torch.randn(n)
    for m in (1, 3, 16, 100, 512):
        x = torch.randn(m, k) * 2
        for dtype in DTYPES:
            xd = x.to(dtype)
            b = bias if m % 2 else None
            _, ref = _reference(xd, p, b, dtype)
            out = _call(xd, p, b)
            assert out.dtype == dtype and out.shape == (m, n)
            assert torch.equal(out, ref), (m, dtype, (out.float() - ref.float()).abs().max())


@pytest.mark.parametrize("fmt", FORMATS + [(64, "int8"), (32, "float16"), (256, "float16")])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 64, 300])
def test_int32_accumulator_is_exact(fmt: tuple[int, str], m: int) -> None:
    """With unit scales the fp32 output is the int32 accumulator itself (|acc| < 2^24)."""
    k, n = 1536, 40
    p = _packed(n, k, *fmt, seed=m)
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    q[0, :] = 127  # a saturated token: the largest accumulators
    acc = _exact_acc(q, p)
    out = _call_q(q, torch.ones(m, 1), p, torch.ones(n), None, torch.float32)
    assert torch.equal(out, acc.float())


@pytest.mark.parametrize("k", [1, 2, 64, 129, 200, 640])
@pytest.mark.parametrize("n", [1, 5, 33])
def test_odd_shapes(k: int, n: int) -> None:
    """K tails (odd K, partial chunks) and N tails."""
    for fmt in [(-1, "int8"), (32, "int8"), (64, "float16")]:
        if fmt[0] > k:
            continue
        p = _packed(n, k, *fmt)
        for m in (1, 4, 7, 70):
            x = torch.randn(m, k)
            _, ref = _reference(x, p, None, torch.float32)
            assert torch.equal(_call(x, p, None), ref), (fmt, m)


def test_linear_q_and_leading_dims() -> None:
    p = _packed(72, 576, 128, "float16")
    x = torch.randn(2, 9, 576, dtype=torch.bfloat16)
    bias = torch.randn(72, dtype=torch.bfloat16)
    _, ref = _reference(x, p, bias, torch.bfloat16)
    assert torch.equal(_call(x, p, bias), ref)
    with cpp_calls(quantize_act=1):
        q, s = qqq.quantize_act(x)
    assert q.shape == x.shape and s.shape == (2, 9, 1)
    assert torch.equal(_call_q(q, s, p, p.channel_scale, bias, torch.bfloat16), ref)


def test_empty_inputs() -> None:
    p = _packed(8, 64, 32, "float16")
    for shape in [(0, 64), (2, 0, 64)]:
        x = torch.randn(*shape)
        assert _call(x, p, None).shape == (*shape[:-1], 8)
        q, s = qqq.quantize_act(x)
        assert _call_q(q, s, p, p.channel_scale, None, torch.float32).shape == (*shape[:-1], 8)


def test_quantize_act_matches_format() -> None:
    x = torch.randn(37, 1000) * torch.logspace(-3, 3, 37)[:, None]
    x[3] = 0.0  # all-zero token: s = 1e-8 / 127
    x[5, 7] = 1e4  # outlier
    for dtype in DTYPES:
        xd = x.to(dtype)
        with cpp_calls(quantize_act=1):
            q, s = qqq.quantize_act(xd)
        qr, sr = quantize_act_per_token(xd)
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert torch.equal(q, qr) and torch.equal(s, sr), dtype


def test_rmsnorm_quant_close_to_torch() -> None:
    x = torch.randn(64, 576) * 3
    w = torch.rand(576) + 0.5
    eps = 1e-5
    with cpp_calls(rmsnorm_quant=1):
        q, s = qqq.rmsnorm_quant(x, w, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * w
    qr, sr = quantize_act_per_token(y)
    # The fused kernel sums x^2 in another order: s within an ulp or two, q off by at most
    # one step, and only where a value lands on a rounding tie.
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    diff = (q.int() - qr.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= q.numel() // 1000
    qb, sb = qqq.rmsnorm_quant(x.to(torch.bfloat16).view(8, 8, 576), w.to(torch.bfloat16), eps)
    assert qb.shape == (8, 8, 576) and sb.shape == (8, 8, 1)


@pytest.mark.parametrize("fmt", [(48, "float16"), (48, "int8"), (20, "float16")])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_group_size_without_simd_path(fmt: tuple[int, str], m: int) -> None:
    """group_size % 32 != 0 has no LUT kernel: C++ unpacks W8 (scalar) for _int_mm, same numbers."""
    p = _packed(24, 300, *fmt)
    x = torch.randn(m, 300)
    _, ref = _reference(x, p, None, torch.float32)
    assert torch.equal(_call(x, p, None), ref)
    q, _ = quantize_act_per_token(x)
    assert torch.equal(_call_q(q, torch.ones(m, 1), p, torch.ones(24), None, torch.float32), _exact_acc(q, p).float())


@pytest.mark.parametrize("m", [1, 16, 300])
def test_fp16_group_scales_saturate_with_the_sign_kept(m: int) -> None:
    """|q4 * gs| > 127 clamps to ±127 (the sign kept), as ``int8_weight`` does.

    ``from_int4`` never produces such products, but a PackedW4 built by hand or imported
    (QQQ's fp16 group scales reach 127/7 ≈ 18.1) can; -8 * 18 must give -127, not +127.
    """
    from qqq_compile.targets.w4a8.formats import pack_int4

    n, k, gsz = 40, 256, 64
    g = torch.Generator().manual_seed(m)
    q4 = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    q4[:, 0] = -8
    q4[:, 1] = 7
    gs = (torch.rand(n, k // gsz, generator=g) * 4 + 15).to(torch.float16)  # 15..19: some saturate
    p = PackedW4(pack_int4(q4), torch.rand(n, generator=g) + 0.5, gs, k, gsz)
    w8 = p.int8_weight()
    assert int(w8.min()) == -127 and int(w8.max()) == 127
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    out = _call_q(q, torch.ones(m, 1), p, torch.ones(n), None, torch.float32)
    assert torch.equal(out, _exact_acc(q, p).float())


_FIRST_CALL = r"""
import torch
from qqq_compile.targets.w4a8.formats import PackedW4
from qqq_compile.targets.w4a8.kernels import cpu
p = PackedW4.from_float(torch.randn(40, 128), 64, "int8")
x = torch.randn(3, 128)
args = (p.qweight, p.channel_scale, p.group_scale, None, 64)
before = cpu.cpu_kernel_source("w4a8_linear")
y1 = torch.ops.qqq.w4a8_linear(x, *args)  # the torch-registered kernel loads the extension
after = cpu.cpu_kernel_source("w4a8_linear")
y2 = torch.ops.qqq.w4a8_linear(x, *args)  # straight to C++
ref = cpu.w4a8_linear_torch(x, *args)
print(before, after, cpu.cpp_call_counts()["w4a8_linear"], torch.equal(y1, y2), torch.equal(y1, ref))
"""


def test_first_cpu_call_loads_and_registers_the_extension() -> None:
    """In a fresh process nothing needs ``ensure_cpp_kernels``: the first CPU call builds/loads
    the extension (registering its kernels) and already runs C++; later calls reach C++ directly."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[4])}
    env.pop("QQQ_CPU_KERNEL", None)
    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["torch", "cpp", "2", "True", "True"]
