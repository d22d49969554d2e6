"""Packed W4 formats: exact round trips (hypothesis), ranges, bits per weight."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.targets.w4a8.formats import (
    FormatError,
    PackedW4,
    choose_scales,
    pack_int4,
    quantize_act_per_token,
    quantize_to_int4,
    unpack_int4,
)
from tests.targets.w4a8 import numpy_reference as rule


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), q)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 6),
    k=st.sampled_from([16, 48, 96, 100]),
    gs=st.sampled_from([-1, 16, 32]),
    dtype=st.sampled_from(["int8", "float16"]),
    seed=st.integers(0, 2**16),
)
def test_packed_weight_decodes_to_what_the_quantizer_chose(n, k, gs, dtype, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    scales = choose_scales(w, gs, dtype)
    q4 = quantize_to_int4(w, scales)
    p = PackedW4.from_int4(q4, scales, dtype)
    assert torch.equal(p.int4(), q4)
    w8 = p.int8_weight()
    if gs <= 0:
        assert torch.equal(w8, q4 * 16) and int(q4.abs().max()) <= 7
    elif dtype == "int8":
        step = scales.step.repeat_interleave(gs, 1)[:, :k]
        # two-level int8 scales reproduce the quantizer's step exactly
        torch.testing.assert_close(p.dequantize(), q4.float() * step, rtol=1e-6, atol=1e-7)
        assert 1 <= int(p.group_scale.min()) and int(p.group_scale.max()) <= 16
    assert int(w8.min()) >= -128 and int(w8.max()) <= 127


def test_k_not_multiple_of_group_keeps_the_short_last_group():
    w = torch.randn(8, 576)
    p = PackedW4.from_float(w, 128)
    assert p.group_scale.shape == (8, 5)
    assert sqnr_db(w, p.dequantize()) > 15


@pytest.mark.parametrize(
    "gs,dtype,lo,hi", [(-1, "int8", 4.0, 4.1), (128, "int8", 4.1, 4.15), (128, "float16", 4.15, 4.25)]
)
def test_bits_per_weight(gs, dtype, lo, hi):
    p = PackedW4.from_float(torch.randn(1536, 576), gs, dtype)
    assert lo <= p.bits_per_weight() <= hi


def test_per_token_activation_quant():
    """The exact rule (written independently in NumPy), on every float dtype, with ties,
    an all-zero row and an outlier row; and what it means: max |q| is 127 per row."""
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 10, 64)
    x[0, 0] = 0
    x[0, 1] = 0
    x[0, 1, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # s = 1: halves round to even
    x[1, 2, 7] = 5e3
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        q, s = quantize_act_per_token(xd)
        qr, sr = rule.act_quant(xd)
        assert q.dtype == torch.int8 and s.shape == (3, 5, 1) and s.dtype == torch.float32
        assert torch.equal(q, qr) and torch.equal(s, sr)
    assert q[0, 1, :4].tolist() == [127, 0, 2, -2] and int(q[0, 0].abs().max()) == 0
    assert bool((q.abs().amax(-1)[x.abs().amax(-1) > 0] == 127).all())


def test_format_errors_are_clear():
    with pytest.raises(FormatError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((2, 2), 9, dtype=torch.int8))
    with pytest.raises(FormatError, match="group_scale"):
        PackedW4(torch.zeros(2, 2, dtype=torch.uint8), torch.ones(2), None, 4, 128)
