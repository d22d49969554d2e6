"""The CPU W4A8 path agrees bit for bit with the pure-torch reference.

The reference is ``PackedW4.int8_weight()`` + an int32 matmul and the epilogue
``((acc * s_tok) * s_ch) + bias`` in fp32. The first test to run builds the C++ extension
(about a minute, then cached).
"""

from __future__ import annotations

import pytest
import torch

from qqq_compile.formats import PackedW4, quantize_act_per_token
from qqq_compile.kernels import cpu

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


def _call(x: torch.Tensor, p: PackedW4, bias: torch.Tensor | None) -> torch.Tensor:
    return cpu.w4a8_linear(x, p.qweight, p.channel_scale, p.group_scale, bias, p.group_size)


@pytest.fixture(scope="module")
def ext_on() -> bool:
    return cpu.extension_available()


@pytest.fixture
def torch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the pure-torch fallback."""
    monkeypatch.setitem(cpu._ext_state, "mod", None)


@pytest.mark.parametrize("k", [576, 1536, 4096])
@pytest.mark.parametrize("fmt", FORMATS, ids=["channel", "g128-int8", "g128-fp16"])
def test_linear_matches_reference(k: int, fmt: tuple[int, str], ext_on: bool) -> None:
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
    ones_n = torch.ones(n)
    out = cpu.w4a8_linear_q(q, torch.ones(m, 1), p.qweight, ones_n, p.group_scale, None, p.group_size, torch.float32)
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
    q, s = cpu.quantize_act(x)
    assert q.shape == x.shape and s.shape == (2, 9, 1)
    out = cpu.w4a8_linear_q(q, s, p.qweight, p.channel_scale, p.group_scale, bias, 128, torch.bfloat16)
    assert torch.equal(out, ref)


def test_empty_inputs() -> None:
    p = _packed(8, 64, 32, "float16")
    for shape in [(0, 64), (2, 0, 64)]:
        x = torch.randn(*shape)
        assert _call(x, p, None).shape == (*shape[:-1], 8)
        q, s = cpu.quantize_act(x)
        out = cpu.w4a8_linear_q(q, s, p.qweight, p.channel_scale, p.group_scale, None, 32, torch.float32)
        assert out.shape == (*shape[:-1], 8)


def test_quantize_act_matches_format() -> None:
    x = torch.randn(37, 1000) * torch.logspace(-3, 3, 37)[:, None]
    x[3] = 0.0  # all-zero token: s = 1e-8 / 127
    x[5, 7] = 1e4  # outlier
    for dtype in DTYPES:
        xd = x.to(dtype)
        q, s = cpu.quantize_act(xd)
        qr, sr = quantize_act_per_token(xd)
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert torch.equal(q, qr) and torch.equal(s, sr), dtype


def test_rmsnorm_quant_close_to_torch() -> None:
    x = torch.randn(64, 576) * 3
    w = torch.rand(576) + 0.5
    eps = 1e-5
    q, s = cpu.rmsnorm_quant(x, w, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * w
    qr, sr = quantize_act_per_token(y)
    # The fused kernel sums x^2 in another order: s within an ulp or two, q off by at most
    # one step, and only where a value lands on a rounding tie.
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    diff = (q.int() - qr.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= q.numel() // 1000
    qb, sb = cpu.rmsnorm_quant(x.to(torch.bfloat16).view(8, 8, 576), w.to(torch.bfloat16), eps)
    assert qb.shape == (8, 8, 576) and sb.shape == (8, 8, 1)


def test_fallback_path_matches(torch_only: None) -> None:
    assert not cpu.extension_available()
    for fmt in FORMATS + [(48, "int8")]:
        p = _packed(50, 576, *fmt)
        for m in (1, 16, 100):
            x = torch.randn(m, 576, dtype=torch.bfloat16)
            _, ref = _reference(x, p, None, torch.bfloat16)
            assert torch.equal(_call(x, p, None), ref)
    x = torch.randn(4, 576)
    q, s = cpu.quantize_act(x)
    qr, sr = quantize_act_per_token(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)


def test_unsupported_group_size_falls_back(ext_on: bool) -> None:
    """group_size % 32 != 0 has no fast path: the torch path handles it, same numbers."""
    p = _packed(24, 300, 48, "float16")
    x = torch.randn(5, 300)
    _, ref = _reference(x, p, None, torch.float32)
    assert torch.equal(_call(x, p, None), ref)


def test_load_failure_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: set())
    with pytest.warns(UserWarning, match="pure-torch"):
        assert cpu._load_extension() is None
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: set(cpu._REQUIRED_FLAGS))
    monkeypatch.setattr(cpu, "_CSRC", cpu._CSRC.with_name("does_not_exist.cpp"))
    with pytest.warns(UserWarning, match="could not build"):
        assert cpu._load_extension() is None
    monkeypatch.setenv("QQQ_CPU_KERNEL", "torch")
    assert cpu._load_extension() is None


@pytest.mark.parametrize("m", [1, 16, 300])
def test_fp16_group_scales_saturate_with_the_sign_kept(m: int) -> None:
    """|q4 * gs| > 127 clamps to ±127 (the sign kept), as ``int8_weight`` does.

    ``from_int4`` never produces such products, but a PackedW4 built by hand or imported
    (QQQ's fp16 group scales reach 127/7 ≈ 18.1) can; -8 * 18 must give -127, not +127.
    """
    from qqq_compile.formats import pack_int4

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
    out = cpu.w4a8_linear_q(q, torch.ones(m, 1), p.qweight, torch.ones(n), p.group_scale, None, gsz, torch.float32)
    assert torch.equal(out, _exact_acc(q, p).float())
