"""``qqq::w8a8_linear``: int8 weights (per-channel scale) x per-token int8 activations.

The C++ kernel (VNNI GEMV/GEMM for small M, oneDNN ``_int_mm`` for large M) and the Triton
kernel (run in the interpreter here) must equal the exact reference bit for bit: int32
accumulator, then ``((acc * s_tok) * s_ch) + bias`` in fp32.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from qqq_compile.targets.w4a8.formats import quantize_act_per_token, quantize_int8_per_row
from qqq_compile.targets.w4a8.kernels import cpu, ops
from qqq_compile.targets.w4a8.kernels.w4a8_gemm import GemmConfig

qqq = torch.ops.qqq
cpp = pytest.mark.usefixtures("cpp_kernels")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _reference(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k = x.shape[-1]
    q, s = quantize_act_per_token(x.reshape(-1, k))
    acc = (q.double() @ w8.double().t()).to(torch.int32)  # exact, independent of _int_mm
    y = acc.float() * s * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w8.shape[0])


def _call(x, w8, scale, bias=None):
    before = cpu.cpp_call_counts()["w8a8_linear"]
    y = qqq.w8a8_linear(x, w8, scale, bias)
    assert cpu.cpp_call_counts()["w8a8_linear"] == before + 1, "the C++ kernel did not run"
    return y


@cpp
@pytest.mark.parametrize("k", [1, 63, 64, 100, 576])
@pytest.mark.parametrize("n", [1, 17, 100])
def test_matches_reference(k: int, n: int) -> None:
    g = torch.Generator().manual_seed(k * 1000 + n)
    w8, scale = quantize_int8_per_row(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g))
    bias = torch.randn(n, generator=g)
    # M = 1, 2, 3, 5 walk every token tile (1x16, 2x8, 4x4 and tails); both paths run at every M
    # (the op's rule: VNNI below 16 tokens, then _int_mm; K = 1 always VNNI: _int_mm is wrong there).
    for m in (1, 2, 3, 5, 16, 40, 300):
        x = torch.randn(m, k, generator=g) * 3
        for dtype in DTYPES:
            b = bias if m % 2 else None
            xd = x.to(dtype)
            ref = _reference(xd, w8, scale, b)
            out = _call(xd, w8, scale, b)
            assert out.dtype == dtype and out.shape == (m, n)
            assert torch.equal(out, ref), (m, dtype)
            for path in (0, 1):  # 0: torch._int_mm + epilogue, 1: the VNNI kernel
                assert torch.equal(torch.ops.qqq_cpu.w8a8_linear_path(xd, w8, scale, b, path), ref), (m, dtype, path)
    assert torch.ops.qqq_cpu.use_packed_w8(15, k) and torch.ops.qqq_cpu.use_packed_w8(16, k) == (k < 2)


@cpp
@pytest.mark.parametrize("m", [1, 4, 7, 200])
def test_int32_accumulator_is_exact(m: int) -> None:
    """Tokens holding a +-127 entry quantize with s = 1 to themselves; with unit channel scales
    the fp32 output is then the int32 accumulator (|acc| <= 1000 * 127^2 < 2^24)."""
    k, n = 1000, 40
    g = torch.Generator().manual_seed(m)
    q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    q[:, 0] = 127
    q[0, :] = 127  # a saturated token
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w8[0, :] = 127  # the largest accumulator: 127 * 127 * k
    out = _call(q.float(), w8, torch.ones(n))
    acc = (q.double() @ w8.double().t()).to(torch.int32)
    assert torch.equal(out, acc.float())
    assert int(acc[0, 0]) == 127 * 127 * k


@cpp
def test_leading_dims_one_dim_and_empty() -> None:
    w8, scale = quantize_int8_per_row(torch.randn(9, 48))
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    out = _call(x, w8, scale, torch.randn(9, dtype=torch.bfloat16))
    assert out.shape == (2, 3, 9)
    assert _call(torch.randn(48), w8, scale).shape == (9,)
    assert _call(torch.randn(0, 48), w8, scale).shape == (0, 9)
    assert _call(torch.randn(2, 0, 48), w8, scale).shape == (2, 0, 9)


def test_quantize_int8_per_row() -> None:
    w = torch.randn(30, 70) * torch.logspace(-3, 2, 30)[:, None]
    w[4] = 0.0
    q, s = quantize_int8_per_row(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (30,)
    assert int(q.abs().amax(dim=1)[5]) == 127 and int(q[4].abs().max()) == 0
    assert int(q.min()) >= -127
    err = (q.float() * s[:, None] - w).abs().amax(dim=1)
    assert bool((err <= s / 2 * (1 + 1e-6)).all())  # round to nearest: half a step at most


@cpp
def test_export_and_compile() -> None:
    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w8, scale = quantize_int8_per_row(torch.randn(50, 32))
            self.register_buffer("w8", w8)
            self.register_buffer("scale", scale)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return qqq.w8a8_linear(x, self.w8, self.scale, None)

    head = Head()
    ep = torch.export.export(head, (torch.randn(2, 5, 32),), dynamic_shapes=({0: Dim("b"), 1: Dim("s", min=2)},))
    assert "qqq.w8a8_linear.default" in {str(n.target) for n in ep.graph.nodes}
    x = torch.randn(3, 7, 32)
    assert torch.equal(ep.module()(x), head(x))
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), head(x))


@pytest.mark.parametrize("m, k, n", [(1, 576, 100), (5, 100, 33), (40, 64, 17)])
def test_triton_matches_reference(m: int, k: int, n: int) -> None:
    """The CUDA kernel, in the Triton interpreter: quantization + int8 tl.dot + epilogue."""
    g = torch.Generator().manual_seed(m)
    w8, scale = quantize_int8_per_row(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    cfg = GemmConfig(64, 64, 64, num_warps=4, num_stages=1)  # few programs: the interpreter is slow
    for dtype in DTYPES:
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        for b in (bias, None):
            out = ops.w8a8_gemm.w8a8_linear_triton(x, w8, scale, b, config=cfg)
            ref = _reference(x, w8, scale, b)
            if dtype == torch.float32:
                assert torch.equal(out, ref), b is None
            else:  # the interpreter's fp32 -> 16-bit cast may truncate: one ulp (GPUs round to nearest)
                torch.testing.assert_close(out.float(), ref.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)
    x = torch.randn(2, 3, k, generator=g)
    assert torch.equal(ops.w8a8_linear_triton(x, w8, scale, None), _reference(x, w8, scale, None))
    with pytest.raises(ValueError, match="scale must be"):
        ops.w8a8_linear_triton(x, w8, scale[:-1], None)
