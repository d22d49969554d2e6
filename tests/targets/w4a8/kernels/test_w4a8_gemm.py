"""Triton W4A8 GEMM vs the pure-torch reference: bit-exact int32, outputs equal to rounding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qqq_compile.targets.w4a8.formats import PackedW4, pack_int4, quantize_act_per_token
from qqq_compile.targets.w4a8.kernels import w4a8_gemm as gemm
from qqq_compile.targets.w4a8.kernels.w4a8_gemm import GemmConfig

MODES = ("per_channel", "group_int8", "group_fp16")
# One program covers M <= 128 and N <= 256: the interpreter pays per program.
BIG = GemmConfig(128, 256, 128)
SMALL = GemmConfig(16, 64, 64, group_m=2)  # many programs: exercises the grouped tile order


def gemm_int32(xq, p: PackedW4, config=BIG):
    return gemm.w4a8_gemm_int32(xq, p.qweight, p.group_scale, p.group_size, config=config)


def ref_int32(xq, p: PackedW4):
    return gemm.w4a8_gemm_int32_ref(xq, p.qweight, p.group_scale, p.group_size)


def assert_equal_to_rounding(out, ref):
    """Equal up to one rounding step of the output dtype (in practice: identical)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", (576, 1536))
@pytest.mark.parametrize("m", (1, 3, 16, 100))
def test_int32_accumulator_bit_exact(m, k, mode, make_weight, make_act):
    p = make_weight(200, k, mode, seed=k)
    xq, _ = quantize_act_per_token(make_act((m, k), seed=m))
    acc = gemm_int32(xq, p)
    assert acc.dtype == torch.int32 and acc.shape == (m, 200)
    assert torch.equal(acc, ref_int32(xq, p))


@pytest.mark.parametrize("bias", (False, True), ids=("no_bias", "bias"))
@pytest.mark.parametrize("out_dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_epilogue_out_dtypes_and_bias(mode, out_dtype, bias, make_weight, make_act):
    m, k, n = 16, 576, 200
    p = make_weight(n, k, mode, seed=3)
    xq, xs = quantize_act_per_token(make_act((m, k), seed=4))
    b = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(out_dtype) if bias else None
    args = (xq, xs, p.qweight, p.channel_scale, p.group_scale, b, p.group_size, out_dtype)
    out = gemm.w4a8_gemm(*args, config=BIG)
    assert_equal_to_rounding(out, gemm.w4a8_gemm_ref(*args))


@pytest.mark.parametrize("mode", MODES)
def test_many_tiles_grouped_order(mode, make_weight, make_act):
    # 3 x 3 programs with ragged M and N edges, grouped along M two rows at a time,
    # and a short last group (K = 320 = 2 x 128 + 64).
    m, k, n = 40, 320, 150
    p = make_weight(n, k, mode, seed=6)
    xq, xs = quantize_act_per_token(make_act((m, k), seed=7))
    assert torch.equal(gemm_int32(xq, p, SMALL), ref_int32(xq, p))
    args = (xq, xs, p.qweight, p.channel_scale, p.group_scale, None, p.group_size, torch.float16)
    assert_equal_to_rounding(gemm.w4a8_gemm(*args, config=SMALL), gemm.w4a8_gemm_ref(*args))


@pytest.mark.parametrize("m", (1, 16, 64, 65))
def test_shipped_configs(m, make_weight, make_act):
    # The tile sizes pick_config ships for each M range (BLOCK_K 64 or 128), group fp16.
    p = make_weight(130, 576, "group_fp16", seed=m)
    xq, xs = quantize_act_per_token(make_act((m, 576), seed=m))
    assert torch.equal(gemm.w4a8_gemm_int32(xq, p.qweight, p.group_scale, p.group_size), ref_int32(xq, p))


def test_last_group_shorter_than_block(make_act):
    # K = 200 with group 64: the last group has 8 columns; BLOCK_K shrinks from 128 to 64.
    w = torch.randn(40, 200)
    for dtype in ("int8", "float16"):
        p = PackedW4.from_float(w, 64, dtype)
        xq, _ = quantize_act_per_token(make_act((5, 200)))
        assert torch.equal(gemm_int32(xq, p), ref_int32(xq, p))


def test_odd_k_per_channel(make_act):
    p = PackedW4.from_float(torch.randn(33, 129), -1)
    xq, _ = quantize_act_per_token(make_act((4, 129)))
    assert torch.equal(gemm_int32(xq, p), ref_int32(xq, p))


def test_fp16_group_scale_ties_and_clamp():
    # q4 * gs landing exactly on .5 must round half to even; |q4 * gs| > 127 must clamp.
    k, n = 64, 8
    q4 = torch.arange(-8, 8, dtype=torch.int8).repeat(n, k // 16)
    gs = torch.tensor([[0.5], [1.5], [2.5], [0.3], [9.0], [16.0], [20.0], [0.0625]], dtype=torch.float16)
    p = PackedW4(pack_int4(q4), torch.ones(n), gs, k, 64)
    xq = torch.eye(k, dtype=torch.int8)  # the accumulator is then W8.T itself
    acc = gemm_int32(xq, p)
    assert torch.equal(acc, ref_int32(xq, p))
    assert acc[:16, 0].tolist() == [-4, -4, -3, -2, -2, -2, -1, 0, 0, 0, 1, 2, 2, 2, 3, 4]
    assert acc[:16, 6].min() == -127 and acc[:16, 6].max() == 127


def test_int8_extremes_do_not_overflow():
    # q4 = -8 with gs = 16 gives w8 = -128; all activations +-127 at K = 1536.
    k, n = 1536, 4
    q4 = torch.full((n, k), -8, dtype=torch.int8)
    p = PackedW4(pack_int4(q4), torch.ones(n), torch.full((n, k // 128), 16, dtype=torch.int8), k, 128)
    xq = torch.full((3, k), 127, dtype=torch.int8)
    xq[1] = -127
    acc = gemm_int32(xq, p)
    assert torch.equal(acc, ref_int32(xq, p))
    assert int(acc[0, 0]) == -128 * 127 * k


def test_leading_dims_and_empty(make_weight, make_act):
    p = make_weight(24, 128, "group_int8", group_size=64)
    xq, xs = quantize_act_per_token(make_act((2, 3, 128)))
    out = gemm.w4a8_gemm(xq, xs, p.qweight, p.channel_scale, p.group_scale, None, 64, torch.float32, config=BIG)
    assert out.shape == (2, 3, 24)
    ref = gemm.w4a8_gemm_ref(xq, xs, p.qweight, p.channel_scale, p.group_scale, None, 64, torch.float32)
    assert_equal_to_rounding(out, ref)
    e = torch.empty(0, 128, dtype=torch.int8)
    out = gemm.w4a8_gemm(e, torch.empty(0, 1), p.qweight, p.channel_scale, p.group_scale, None, 64)
    assert out.shape == (0, 24)


def test_pick_config():
    assert gemm.pick_config(1).block_m == 16
    assert gemm.pick_config(64).block_m == 64
    assert gemm.pick_config(10**6).block_m == 128
    assert GemmConfig(16, 64, 128).for_group_size(64).block_k == 64
    assert GemmConfig(16, 64, 128).for_group_size(96).block_k == 32


def _bad_calls(p: PackedW4, xq: torch.Tensor, xs: torch.Tensor):
    base = dict(xq=xq, x_scale=xs, qweight=p.qweight, channel_scale=p.channel_scale)
    g = dict(group_scale=p.group_scale, group_size=64)
    return [
        (dict(base, xq=xq.float(), **g), "xq must be an int8"),
        (dict(base, x_scale=xs[:, 0], **g), "xscale must be float32 of shape"),
        (dict(base, qweight=p.qweight[:, :-1], **g), "bytes per row"),
        (dict(base, qweight=p.qweight.view(torch.int8), **g), "uint8"),
        (dict(base, channel_scale=p.channel_scale.half(), **g), "channel_scale"),
        (dict(base, group_scale=None, group_size=64), "exactly when group_size > 0"),
        (dict(base, group_scale=p.group_scale[:, :1], group_size=64), "group_scale must have shape"),
        (dict(base, group_scale=p.group_scale.float(), group_size=64), "int8 or float16"),
        (dict(base, **g, bias=torch.ones(3)), "bias"),
        (dict(base, **g, out_dtype=torch.int8), "out_dtype"),
        (dict(base, group_scale=p.group_scale[:, :1].expand(-1, 3).contiguous(), group_size=48), "multiple of 32"),
    ]


def test_bad_inputs_raise_value_error(make_weight, make_act):
    p = make_weight(8, 128, "group_int8", group_size=64)
    xq, xs = quantize_act_per_token(make_act((2, 128)))
    for kwargs, match in _bad_calls(p, xq, xs):
        with pytest.raises(ValueError, match=match):
            gemm.w4a8_gemm(**kwargs)


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 150),
    groups=st.integers(1, 5),
    tail=st.integers(0, 31),
    mode=st.sampled_from(MODES),
    group_size=st.sampled_from((32, 64, 128)),
    seed=st.integers(0, 2**16),
)
def test_property_int32_matches_reference(m, n, groups, tail, mode, group_size, seed):
    k = groups * group_size + tail  # any K, including odd ones and a short last group
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    p = PackedW4.from_float(w, -1 if mode == "per_channel" else group_size, "float16" if "fp16" in mode else "int8")
    xq, xs = quantize_act_per_token(torch.randn(m, k, generator=g))
    assert torch.equal(gemm_int32(xq, p), ref_int32(xq, p))
    args = (xq, xs, p.qweight, p.channel_scale, p.group_scale, None, p.group_size, torch.float32)
    assert_equal_to_rounding(gemm.w4a8_gemm(*args, config=BIG), gemm.w4a8_gemm_ref(*args))
