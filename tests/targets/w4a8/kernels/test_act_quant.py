"""Triton per-token int8 quantization (and fused RMSNorm + quantization) vs torch references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qqq_compile.targets.w4a8.kernels import act_quant
from tests.targets.w4a8 import numpy_reference as rule

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def big_block(m: int, k: int) -> tuple[int, int] | None:
    """One program for M = 100 (the interpreter pays per program); shipped blocks otherwise."""
    return (128, 2048) if m >= 64 else None


def assert_rmsnorm_close(q, s, q_ref, s_ref):
    """Same math, different summation order: ulp-level scale differences and at most a
    few one-step flips of q where a value sits on a rounding boundary."""
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1
    assert int((diff > 0).sum()) <= max(2, q.numel() // 1000)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", (576, 1536))
@pytest.mark.parametrize("m", (1, 3, 16, 100))
def test_quantize_act_bit_exact(m, k, dtype, make_act):
    x = make_act((m, k), seed=m * k, dtype=dtype)
    q, s = act_quant.quantize_act(x, block=big_block(m, k))
    q_ref, s_ref = act_quant.quantize_act_ref(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == (m, k) and s.shape == (m, 1)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", (576, 1536))
@pytest.mark.parametrize("m", (1, 3, 16, 100))
def test_rmsnorm_quant(m, k, dtype, make_act):
    x = make_act((m, k), seed=m + k, dtype=dtype)
    w = (torch.rand(k, generator=torch.Generator().manual_seed(k)) + 0.5).to(dtype)
    q, s = act_quant.rmsnorm_quant(x, w, 1e-6, block=big_block(m, k))
    assert q.shape == (m, k) and s.shape == (m, 1)
    assert_rmsnorm_close(q, s, *act_quant.rmsnorm_quant_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_follows_the_rule(make_act, dtype):
    """The torch reference (what the kernels are compared with) against the rule written
    independently in NumPy, including rows with ties, zeros and huge outliers."""
    x = make_act((6, 576), dtype=dtype)
    x[1] = 0
    x[2] = 0
    x[2, :6] = torch.tensor([127.0, 0.5, -0.5, 1.5, 2.5, -2.5]).to(dtype)  # s = 1: ties round to even
    x[3, 0] = 1e4
    for a, b in zip(act_quant.quantize_act_ref(x), rule.act_quant(x), strict=True):
        assert torch.equal(a, b)
    assert act_quant.quantize_act_ref(x)[0][2, :6].tolist() == [127, 0, 0, 2, 2, -2]


def test_rmsnorm_ref_matches_hf_style_norm(make_act):
    # fp32 input: identical to LlamaRMSNorm's math, so the fused op can replace it.
    x, w, eps = make_act((4, 96)), torch.rand(96) + 0.5, 1e-5
    hf = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    torch.testing.assert_close(act_quant.rmsnorm_ref(x, w, eps), hf, rtol=1e-6, atol=1e-6)


def test_leading_dims_and_long_rows(make_act):
    # 3-D input, and K = 5000 > 4096 so every pass loops over several column blocks.
    x = make_act((2, 3, 5000), seed=1, dtype=torch.float16)
    q, s = act_quant.quantize_act(x)
    q_ref, s_ref = act_quant.quantize_act_ref(x)
    assert q.shape == x.shape and s.shape == (2, 3, 1)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    w = torch.rand(5000, dtype=torch.float16) + 0.5
    assert_rmsnorm_close(*act_quant.rmsnorm_quant(x, w, 1e-6), *act_quant.rmsnorm_quant_ref(x, w, 1e-6))


def test_edge_rows():
    # An all-zero row (scale clamps to 1e-8 / 127), exact ties of x / s at .5, huge values.
    x = torch.zeros(4, 40)
    x[1, 0] = 127.0  # s = 1, so x = 2.5 / 3.5 are exact ties: round half to even
    x[1, 1:5] = torch.tensor([2.5, 3.5, -2.5, -0.5])
    x[2] = torch.linspace(-3e4, 3e4, 40)
    x[3, 7] = -1e-30
    q, s = act_quant.quantize_act(x)
    q_ref, s_ref = act_quant.quantize_act_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q[1, 1:5].tolist() == [2, 4, -2, 0]
    assert q[0].abs().sum() == 0


def test_k_one_and_empty_batch():
    x = torch.tensor([[3.0], [-0.25]])
    q, s = act_quant.quantize_act(x)
    assert q.flatten().tolist() == [127, -127]
    q, s = act_quant.rmsnorm_quant(x, torch.ones(1), 1e-12)
    assert q.flatten().tolist() == [127, -127]
    q, s = act_quant.quantize_act(torch.empty(0, 8))
    assert q.shape == (0, 8) and s.shape == (0, 1)


def test_non_contiguous_rows(make_act):
    x = make_act((6, 256))[:, :200]  # row stride 256, unit column stride
    assert torch.equal(act_quant.quantize_act(x)[0], act_quant.quantize_act_ref(x)[0])
    xt = make_act((200, 6)).t()  # column-major: the wrapper copies it
    assert torch.equal(act_quant.quantize_act(xt)[0], act_quant.quantize_act_ref(xt)[0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: act_quant.quantize_act(torch.ones(2, 4, dtype=torch.int32)), "float32, float16 or bfloat16"),
        (lambda: act_quant.quantize_act(torch.ones(2, 0)), "non-empty last dimension"),
        (lambda: act_quant.rmsnorm_quant(torch.ones(2, 4), torch.ones(5), 1e-6), r"shape \(4,\)"),
        (lambda: act_quant.rmsnorm_quant(torch.ones(2, 4), torch.ones(4, dtype=torch.int8), 1e-6), "float"),
        (lambda: act_quant.quantize_act(torch.ones(2, 4, device="meta")), "CUDA tensors"),
        (lambda: act_quant.quantize_act(torch.ones(2, 4), block=(3, 64)), "powers of two"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 300),
    log_scale=st.floats(-6, 6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_property_quantize_matches_reference(m, k, log_scale, dtype, seed):
    # Finite inputs only (fp16 overflows past 65504); inf/nan rows are undefined in both.
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 10.0**log_scale).clamp(-6e4, 6e4)
    x = x.to(dtype)
    q, s = act_quant.quantize_act(x)
    q_ref, s_ref = act_quant.quantize_act_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(2, 300), seed=st.integers(0, 2**16))
def test_property_rmsnorm_matches_reference(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(m, k, generator=g) * 3, torch.rand(k, generator=g) + 0.1
    assert_rmsnorm_close(*act_quant.rmsnorm_quant(x, w, 1e-6), *act_quant.rmsnorm_quant_ref(x, w, 1e-6))
