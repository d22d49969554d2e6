"""CPU path for the W4A8 (QQQ) linear: per-token int8 activations x packed int4 weights.

See :mod:`qqq_compile.formats` for the packed layout. All paths compute the exact int32
accumulator ``xq @ W8.T`` and then ``acc * s_token * s_ch + bias``.
"""

from __future__ import annotations

import torch

from qqq_compile.formats import ACT_QMAX, unpack_int4

__all__ = ["quantize_act", "rmsnorm_quant", "w4a8_linear", "w4a8_linear_q", "int8_weight"]


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: returns ``(q int8 [..., K], s float32 [..., 1])``."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / ACT_QMAX
    q = torch.clamp(torch.round(xf / s), -ACT_QMAX, ACT_QMAX).to(torch.int8)
    return q, s


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in fp32 (``x * rsqrt(mean(x^2) + eps) * weight``) followed by per-token int8."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return quantize_act(y)


def int8_weight(
    qweight: torch.Tensor, group_scale: torch.Tensor | None, group_size: int, k: int
) -> torch.Tensor:
    """``W8`` int8 ``[N, K]`` from the packed data (same math as ``PackedW4.int8_weight``)."""
    q4 = unpack_int4(qweight, k)
    if group_scale is None:
        return q4 << 4
    gs = group_scale.repeat_interleave(group_size, dim=1)[:, :k]
    if gs.dtype == torch.int8:
        return (q4.to(torch.int16) * gs.to(torch.int16)).to(torch.int8)
    w8 = torch.round(q4.float() * gs.float())
    return w8.clamp(-ACT_QMAX, ACT_QMAX).to(torch.int8)


def _int_mm_any(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ b_t.T`` for int8 ``a [M, K]``, ``b_t [N, K]``."""
    return torch._int_mm(a, b_t.t())


def w4a8_linear_q(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(xq @ W8.T) * xscale * channel_scale + bias`` for pre-quantized activations."""
    k = xq.shape[-1]
    lead = xq.shape[:-1]
    a = xq.reshape(-1, k).contiguous()
    w8 = int8_weight(qweight, group_scale, group_size, k)
    acc = _int_mm_any(a, w8)
    y = acc.float() * xscale.reshape(-1, 1).float() * channel_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, -1)


def w4a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """W4A8 linear on float ``x [..., K]``: per-token int8 quantization inside; output in x's dtype."""
    q, s = quantize_act(x)
    return w4a8_linear_q(q, s, qweight, channel_scale, group_scale, bias, group_size, x.dtype)
