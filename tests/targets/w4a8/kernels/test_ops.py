"""The ``torch.ops.qqq.*`` custom ops: CPU dispatch, the Triton path (interpreter), fake
kernels, ``torch.export`` with dynamic shapes and ``torch.compile(fullgraph=True)``, and
input validation (the C++ kernels raise the Python implementations' messages)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim

from qqq_compile.targets.w4a8.formats import quantize_int8_per_row
from qqq_compile.targets.w4a8.kernels import act_quant, cpu, ops
from qqq_compile.targets.w4a8.kernels import w4a8_gemm as gemm

MODES = ("per_channel", "group_int8", "group_fp16")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
qqq = torch.ops.qqq


def close_to_rounding(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=torch.finfo(out.dtype).eps, atol=1e-6)


def linear_ref(x, p, bias):
    """Reference W4A8 linear on float x: per-token quantization, int32 GEMM, epilogue."""
    xq, xs = act_quant.quantize_act_ref(x)
    return gemm.w4a8_gemm_ref(xq, xs, p.qweight, p.channel_scale, p.group_scale, bias, p.group_size, x.dtype)


def weight_args(p, bias=None):
    return (p.qweight, p.channel_scale, p.group_scale, bias, p.group_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", (3, 80))  # the CPU path switches GEMM strategy at M = 64
def test_w4a8_linear_cpu_and_triton_match_reference(m, mode, dtype, make_weight, make_act):
    p = make_weight(200, 576, mode, seed=m)
    x = make_act((m, 576), seed=1, dtype=dtype)
    bias = torch.randn(200).to(dtype)
    ref = linear_ref(x, p, bias)
    close_to_rounding(qqq.w4a8_linear(x, *weight_args(p, bias)), ref)
    close_to_rounding(ops.w4a8_linear_triton(x, *weight_args(p, bias)), ref)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_rmsnorm_quant_then_linear_q(out_dtype, make_weight, make_act):
    p = make_weight(96, 576, "group_int8", seed=2)
    x, w = make_act((2, 5, 576), seed=3), torch.rand(576) + 0.5
    q, s = qqq.rmsnorm_quant(x, w, 1e-6)
    q_ref, s_ref = act_quant.rmsnorm_quant_ref(x, w, 1e-6)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert int((q.int() - q_ref.int()).abs().max()) <= 1
    qt, st = ops.rmsnorm_quant_triton(x, w, 1e-6)
    assert int((qt.int() - q_ref.int()).abs().max()) <= 1
    y = qqq.w4a8_linear_q(q, s, *weight_args(p), out_dtype)
    assert y.shape == (2, 5, 96)
    ref = gemm.w4a8_gemm_ref(q, s, p.qweight, p.channel_scale, p.group_scale, None, p.group_size, out_dtype)
    close_to_rounding(y, ref)
    close_to_rounding(ops.w4a8_linear_q_triton(q, s, *weight_args(p), out_dtype), ref)


@pytest.mark.parametrize("shape", ((576,), (3, 576), (2, 3, 576)))
def test_quantize_act_op_any_leading_dims(shape, make_act):
    x = make_act(shape, dtype=torch.bfloat16)
    q_ref, s_ref = act_quant.quantize_act_ref(x)
    for q, s in (qqq.quantize_act(x), ops.quantize_act_triton(x)):
        assert q.shape == shape and s.shape == (*shape[:-1], 1)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_one_dim_linear(make_weight):
    p = make_weight(16, 64, "per_channel")
    x = torch.randn(64)
    y = qqq.w4a8_linear(x, *weight_args(p))
    assert y.shape == (16,)
    close_to_rounding(y, linear_ref(x[None], p, None)[0])


def test_kernels_registered(cpp_kernels):
    for name in cpu.OP_NAMES:
        assert str(getattr(qqq, name).default._schema) == f"qqq::{ops.SCHEMAS[name]}"
        has = lambda key, name=name: torch._C._dispatch_has_kernel_for_dispatch_key(f"qqq::{name}", key)
        assert has("CPU") and has("Meta") and has("CompositeExplicitAutograd")
        assert has("CUDA")
        assert cpu.cpu_kernel_source(name) == "cpp"


def test_fake_kernels_shapes(make_weight):
    p = make_weight(48, 128, "group_fp16", group_size=64)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 7, 128, dtype=torch.float16)
        q, s = qqq.quantize_act(x)
        assert (q.shape, q.dtype, s.shape, s.dtype) == ((2, 7, 128), torch.int8, (2, 7, 1), torch.float32)
        q, s = qqq.rmsnorm_quant(x, torch.empty(128), 1e-6)
        assert q.shape == (2, 7, 128) and s.shape == (2, 7, 1)
        y = qqq.w4a8_linear(x, *weight_args(p))
        assert y.shape == (2, 7, 48) and y.dtype == torch.float16
        y = qqq.w4a8_linear_q(q, s, *weight_args(p), torch.bfloat16)
        assert y.shape == (2, 7, 48) and y.dtype == torch.bfloat16
        y = qqq.w8a8_linear(x, torch.empty(40, 128, dtype=torch.int8), torch.empty(40), None)
        assert y.shape == (2, 7, 40) and y.dtype == torch.float16


@pytest.mark.parametrize("mode", ("per_channel", "group_fp16"))
def test_opcheck(mode, make_weight, make_act):
    p = make_weight(32, 128, mode, group_size=64)
    x = make_act((3, 128))
    q, s = act_quant.quantize_act_ref(x)
    checks = [
        (qqq.quantize_act.default, (x,)),
        (qqq.rmsnorm_quant.default, (x, torch.rand(128) + 0.5, 1e-6)),
        (qqq.w4a8_linear.default, (x, *weight_args(p, torch.randn(32)))),
        (qqq.w4a8_linear_q.default, (q, s, *weight_args(p), torch.float16)),
        (qqq.w8a8_linear.default, (x, *quantize_int8_per_row(torch.randn(24, 128)), torch.randn(24))),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


class _Block(torch.nn.Module):
    """RMSNorm fused with quantization feeding two projections, one via each linear op."""

    def __init__(self, p_up, p_down):
        super().__init__()
        self.norm_w = torch.nn.Parameter(torch.rand(p_up.in_features) + 0.5, requires_grad=False)
        for name, p in (("up", p_up), ("down", p_down)):
            for key, t in p.tensors().items():
                self.register_buffer(f"{name}_{key}", t)
        self.gs = (p_up.group_size, p_down.group_size)
        self.register_buffer("down_bias", torch.randn(p_down.out_features))

    def forward(self, x):
        q, s = qqq.rmsnorm_quant(x, self.norm_w, 1e-6)
        h = qqq.w4a8_linear_q(
            q, s, self.up_qweight, self.up_channel_scale, self.up_group_scale, None, self.gs[0], x.dtype
        )
        h = torch.nn.functional.silu(h)
        y = qqq.w4a8_linear(h, self.down_qweight, self.down_channel_scale, None, self.down_bias, self.gs[1])
        return x + y


@pytest.fixture(scope="module")
def block():
    from qqq_compile.targets.w4a8.formats import PackedW4

    torch.manual_seed(0)
    return _Block(PackedW4.from_float(torch.randn(192, 128), 64, "int8"), PackedW4.from_float(torch.randn(128, 192)))


def test_export_dynamic_leading_dims(block):
    x = torch.randn(2, 5, 128)
    ep = torch.export.export(block, (x,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", min=2)},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"qqq.rmsnorm_quant.default", "qqq.w4a8_linear_q.default", "qqq.w4a8_linear.default"} <= targets
    for shape in ((2, 5, 128), (3, 11, 128), (1, 2, 128)):
        x = torch.randn(shape)
        torch.testing.assert_close(ep.module()(x), block(x), rtol=0, atol=0)


def test_compile_fullgraph(block):
    # aot_eager traces through dynamo and AOT autograd (fake kernels, no graph breaks)
    # without inductor's C++ build of the surrounding silu/add, which costs a minute here.
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((2, 5, 128), (1, 9, 128)):
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)


def _w8(n=8, k=128):
    return quantize_int8_per_row(torch.randn(n, k))


# (call, message fragment): every op's checks, in the order each implementation runs them.
BAD_INPUTS = [
    (lambda p: qqq.quantize_act(torch.ones(2, 4, dtype=torch.int32)), "float32, float16 or bfloat16"),
    (lambda p: qqq.quantize_act(torch.ones(2, 0)), "non-empty last dimension"),
    (lambda p: qqq.rmsnorm_quant(torch.ones(2, 128), torch.ones(5), 1e-6), r"shape \(128,\)"),
    (lambda p: qqq.rmsnorm_quant(torch.ones(2, 128), torch.ones(128, dtype=torch.int64), 1e-6), "torch.int64"),
    (lambda p: qqq.w4a8_linear(torch.ones(2, 100), *weight_args(p)), "bytes per row"),
    (lambda p: qqq.w4a8_linear(torch.ones(2, 128), p.qweight.view(torch.int8), *weight_args(p)[1:]), "uint8"),
    (lambda p: qqq.w4a8_linear(torch.ones(128), p.qweight, p.channel_scale[:3], None, None, -1), "channel_scale"),
    (lambda p: qqq.w4a8_linear(torch.ones(2, 128), *weight_args(p)[:4], 64), "exactly when"),
    (
        lambda p: qqq.w4a8_linear(torch.ones(2, 128), p.qweight, p.channel_scale, torch.ones(8, 3).half(), None, 64),
        r"shape \(8, 2\)",
    ),
    (lambda p: qqq.w4a8_linear(torch.ones(2, 128), *weight_args(p, torch.ones(8, dtype=torch.int32))), "bias"),
    (
        lambda p: qqq.w4a8_linear_q(torch.ones(2, 128, dtype=torch.int8), torch.ones(2), *weight_args(p), torch.half),
        "xscale",
    ),
    (lambda p: qqq.w4a8_linear_q(torch.ones(2, 128), torch.ones(2, 1), *weight_args(p), torch.half), "xq must be"),
    (
        lambda p: qqq.w4a8_linear_q(
            torch.ones(2, 128, dtype=torch.int8), torch.ones(2, 1), *weight_args(p), torch.int32
        ),
        "out_dtype",
    ),
    (lambda p: qqq.w8a8_linear(torch.ones(3, 64), *_w8(), None), r"shape \(N, 64\)"),
    (lambda p: qqq.w8a8_linear(torch.ones(3, 128), _w8()[0], torch.ones(8).double(), None), "scale must be"),
    (lambda p: qqq.w8a8_linear(torch.ones(3, 128), *_w8(), torch.ones(9)), r"bias must .* shape \(8,\)"),
]


@pytest.mark.parametrize("call, match", BAD_INPUTS)
def test_ops_raise_value_error(call, match, make_weight):
    p = make_weight(8, 128, "per_channel")
    with pytest.raises(ValueError, match=match):
        call(p)


@pytest.mark.parametrize("call, match", BAD_INPUTS)
def test_cpp_and_python_messages_identical(call, match, make_weight, cpp_kernels):
    """The C++ kernel (real tensors) and the Python checks (fake tensors, the same functions the
    torch reference runs) reject a bad input with the very same message."""
    p = make_weight(8, 128, "per_channel")
    before = cpu.cpp_call_counts()
    with pytest.raises(ValueError) as cpp_err:
        call(p)
    assert sum(cpu.cpp_call_counts().values()) == sum(before.values()) + 1  # C++ raised it
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError) as py_err:
        call(p)
    assert str(cpp_err.value) == str(py_err.value)
