"""Q4_0 / Q8_0 blocks, the Q4_0 grid and the GGUF ops, against gguf-py's numpy port of
llama.cpp's reference quantizers (``gguf.quants``) and integer block references written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qqq_compile.targets.gguf import ops  # noqa: F401 - registers torch.ops.qqq.q4_0_linear...
from qqq_compile.targets.gguf.formats import (
    BlockFormatError,
    PackedQ4_0,
    PackedQ8_0,
    decode_q8_0,
    fake_quant_act,
    quantize_act_q8_0,
    unpack_q4_0,
)
from qqq_compile.targets.gguf.grid import Q4_0Grid, absmax_scales
from qqq_compile.targets.registry import ClipSearch

gq = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType as QT  # noqa: E402


def heavy(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Weights with heavy tails and signed outliers (both signs of extreme per block)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w += torch.randn(n, k, generator=g).pow(3) * 0.01
    return w


def test_q4_0_layout_is_llamacpps():
    """Our packed blocks decode, by gguf-py's own Q4_0 decoder, to exactly our dequantize()."""
    w = heavy(48, 96)
    grid = Q4_0Grid(w)
    p = grid.pack(grid.quantize_all(w)[0])
    theirs = gq.dequantize(p.blocks().numpy(), QT.Q4_0)
    assert np.array_equal(theirs, p.dequantize().numpy())
    # ... and byte j of a block holds value j (low nibble) and value j+16 (high nibble).
    codes = p.codes()
    assert torch.equal(p.qs[:, 0], codes[:, 0] | (codes[:, 16] << 4))
    assert torch.equal(unpack_q4_0(p.qs), codes)


def test_absmax_grid_is_llamacpp_q4_0():
    """RTN on the absmax grid: the fp16 scales are llama.cpp's bytes exactly; the codes agree
    except where llama.cpp rounds against its fp32 d and we round to the nearest value of the
    stored fp16 d (never farther from the weight)."""
    w = heavy(64, 256, seed=1)
    ref = gq.quantize(w.numpy(), QT.Q4_0).reshape(64, 8, 18)
    ours = PackedQ4_0.from_codes(*_rtn(w)).blocks().numpy().reshape(64, 8, 18)
    assert np.array_equal(ours[..., :2], ref[..., :2])  # the d bytes
    deq_ref = torch.from_numpy(gq.dequantize(ref.reshape(64, -1), QT.Q4_0))
    deq = Q4_0Grid(w).quantize_all(w)[1]
    assert ((deq - w).abs() <= (deq_ref - w).abs() + 1e-9).all()
    assert (deq == deq_ref).float().mean() > 0.99


def _rtn(w):
    grid = Q4_0Grid(w)
    return grid.quantize_all(w)[0], grid.d


def test_grid_column_and_whole_agree_and_pack_exactly():
    w = heavy(40, 128, seed=2)
    grid = Q4_0Grid(w, clip=ClipSearch(), col_weight=torch.rand(128) + 0.1)
    q_all, deq_all = grid.quantize_all(w)
    for j in (0, 31, 32, 77, 127):
        q, dq = grid.quantize(w[:, j], int(grid.col_group()[j]))
        assert torch.equal(q.to(torch.int8), q_all[:, j]) and torch.equal(dq, deq_all[:, j])
    assert torch.equal(grid.pack(q_all).dequantize(), deq_all)
    rows = slice(8, 20)
    assert torch.equal(grid.pack(q_all[rows], rows).dequantize(), deq_all[rows])


def test_clip_search_never_loses_and_uses_both_signs():
    w = heavy(256, 256, seed=3)
    c = torch.rand(256) + 0.05
    absmax = Q4_0Grid(w).quantize_all(w)[1]
    searched_grid = Q4_0Grid(w, clip=ClipSearch(), col_weight=c)
    searched = searched_grid.quantize_all(w)[1]

    def err(deq):  # weighted error per row and block
        return ((deq - w).pow(2) * c).reshape(256, 8, 32).sum(-1)

    assert (err(searched) <= err(absmax) * (1 + 1e-6) + 1e-12).all()
    assert err(searched).sum() < 0.95 * err(absmax).sum()
    # Both ends: some blocks map their extreme to the 8-step side, some to the 7-step side.
    sign = torch.sign(searched_grid.d.float()) * torch.sign(absmax_scales(w).float())
    assert (sign > 0).any() and (sign < 0).any()


def test_q8_0_weights_are_llamacpp_q8_0():
    w = heavy(32, 64, seed=4)
    p = PackedQ8_0.from_float(w)
    ref = gq.quantize(w.numpy(), QT.Q8_0)
    assert np.array_equal(p.blocks().numpy().reshape(32, 2, 34)[..., :2], ref.reshape(32, 2, 34)[..., :2])
    assert np.array_equal(gq.dequantize(p.blocks().numpy(), QT.Q8_0), p.dequantize().numpy())
    deq_ref = torch.from_numpy(gq.dequantize(ref, QT.Q8_0))
    assert ((p.dequantize() - w).abs() <= (deq_ref - w).abs() + 1e-9).all()


def test_q8_0_activations_match_the_reference_quantizer():
    """Same fp16 d as llama.cpp's reference; codes equal but for rounding ties (the x86 path we
    model rounds half to even and multiplies by 127/amax, the reference rounds half away and
    multiplies by 1/d)."""
    x = torch.randn(16, 256) * torch.rand(16, 1) * 4
    q, d = quantize_act_q8_0(x)
    ref = gq.quantize(x.numpy(), QT.Q8_0).reshape(16, 8, 34)
    assert np.array_equal(d.numpy().view(np.uint8).reshape(16, 8, 2), ref[..., :2])
    ref_q = torch.from_numpy(ref[..., 2:].copy().view(np.int8).reshape(16, 256))
    assert (q.int() - ref_q.int()).abs().max() <= 1
    assert (q == ref_q).float().mean() > 0.999
    assert torch.equal(fake_quant_act(x), decode_q8_0(q, d))
    with pytest.raises(BlockFormatError, match="multiple of 32"):
        quantize_act_q8_0(torch.randn(2, 48))


def _block_dot_reference(x: torch.Tensor, wq: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    """ggml_vec_dot_q*_q8_0 written out: per block an integer dot, times d_x * d_w, summed."""
    xq, xd = quantize_act_q8_0(x)
    m, k = x.shape
    out = torch.zeros(m, wq.shape[0], dtype=torch.float64)
    for b in range(k // 32):
        cols = slice(32 * b, 32 * b + 32)
        dot = xq[:, cols].long() @ wq[:, cols].long().t()  # exact integers
        scale = xd[:, b].double()[:, None] * wd[:, b].double()[None, :]
        out += scale * dot.double()
    return out


def test_q4_0_linear_is_the_block_dot_product():
    w, x, bias = heavy(96, 160, seed=5), torch.randn(7, 160), torch.randn(96)
    grid = Q4_0Grid(w)
    p = grid.pack(grid.quantize_all(w)[0])
    y = torch.ops.qqq.q4_0_linear(x, p.qs, p.d, bias)
    ref = _block_dot_reference(x, p.codes().long() - 8, p.d) + bias.double()
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6)
    y3 = torch.ops.qqq.q4_0_linear(x.reshape(7, 1, 160), p.qs, p.d, None)
    assert y3.shape == (7, 1, 96)


def test_q8_0_linear_embedding_and_f16_linear(monkeypatch):
    w, x = heavy(80, 64, seed=6), torch.randn(5, 64)
    p = PackedQ8_0.from_float(w)
    monkeypatch.setattr(ops, "ROW_CHUNK", 32)  # several row chunks
    y = torch.ops.qqq.q8_0_linear(x, p.qs, p.d, None)
    assert torch.allclose(y.double(), _block_dot_reference(x, p.qs, p.d), rtol=1e-5, atol=1e-6)
    ids = torch.tensor([[3, 0, 79]])
    assert torch.equal(torch.ops.qqq.q8_0_embedding(ids, p.qs, p.d)[0], p.dequantize()[[3, 0, 79]])
    g = Q4_0Grid(w)
    p4 = g.pack(g.quantize_all(w)[0])
    assert torch.equal(torch.ops.qqq.q4_0_embedding(ids, p4.qs, p4.d)[0], p4.dequantize()[[3, 0, 79]])
    w16 = w.half()
    ref = x.half().double() @ w16.double().t()  # fp16 activations and weights, exact products
    assert torch.allclose(torch.ops.qqq.f16_linear(x, w16, None).double(), ref, rtol=1e-5, atol=1e-6)


def test_formats_refuse_what_llamacpp_cannot_hold():
    with pytest.raises(BlockFormatError, match="multiple of 32"):
        Q4_0Grid(torch.randn(4, 48))
    with pytest.raises(BlockFormatError, match="0..15"):
        PackedQ4_0.from_codes(torch.full((2, 32), 16), torch.ones(2, 1))
