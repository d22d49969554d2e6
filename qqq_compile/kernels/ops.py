"""``torch.library`` custom ops ``torch.ops.qqq.*``: the W4A8 kernels as graph nodes.

Each op has a fake (meta) kernel, so it traces under ``torch.export`` (dynamic leading
dims included) and ``torch.compile(fullgraph=True)``, and two device kernels:

* CUDA tensors run the Triton kernels (:mod:`.act_quant`, :mod:`.w4a8_gemm`);
* CPU tensors run :mod:`qqq_compile.kernels.cpu` (C++/VNNI with a torch fallback).

The ``*_triton`` functions below are the CUDA implementations as plain functions. With
``TRITON_INTERPRET=1`` they also accept CPU tensors and run in the Triton interpreter,
which is how the tests check the Triton path on a machine without a GPU; the ops
themselves always send CPU tensors to :mod:`.cpu`.

Inputs are validated in every implementation and errors are ``ValueError``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qqq_compile.kernels import act_quant, cpu, w4a8_gemm
from qqq_compile.kernels.w4a8_gemm import OUT_DTYPES, check_act_args, check_weight_args

FLOAT_DTYPES = act_quant.FLOAT_DTYPES


# --------------------------------------------------------------------------- validation


def _check_float(x: Tensor, name: str = "x") -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")


def _check_norm(x: Tensor, weight: Tensor) -> None:
    _check_float(x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"weight must be a float tensor of shape ({x.shape[-1]},), got {weight.dtype} {tuple(weight.shape)}"
        )


def _check_out_dtype(dtype: torch.dtype) -> None:
    if dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {dtype}")


def _at_least_2d(t: Tensor) -> Tensor:
    # The CPU contract takes [..., K] with at least one leading dim.
    return t.unsqueeze(0) if t.dim() == 1 else t


def _restore(out: Tensor, like: Tensor) -> Tensor:
    return out.squeeze(0) if like.dim() == 1 else out


# --------------------------------------------------------------------------- Triton path


def quantize_act_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token int8 quantization with the Triton kernel (the CUDA implementation)."""
    _check_float(x)
    return act_quant.quantize_act(x)


def rmsnorm_quant_triton(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Fused RMSNorm + per-token int8 quantization with the Triton kernel."""
    _check_norm(x, weight)
    return act_quant.rmsnorm_quant(x, weight, eps)


def w4a8_linear_q_triton(
    xq: Tensor,
    xscale: Tensor,
    qweight: Tensor,
    channel_scale: Tensor,
    group_scale: Tensor | None,
    bias: Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """W4A8 linear on int8 activations with the Triton GEMM."""
    return w4a8_gemm.w4a8_gemm(xq, xscale, qweight, channel_scale, group_scale, bias, group_size, out_dtype)


def w4a8_linear_triton(
    x: Tensor,
    qweight: Tensor,
    channel_scale: Tensor,
    group_scale: Tensor | None,
    bias: Tensor | None,
    group_size: int,
) -> Tensor:
    """W4A8 linear on float activations: Triton quantization, then the Triton GEMM."""
    _check_float(x)
    check_weight_args(x.shape[-1], qweight, channel_scale, group_scale, bias, group_size)
    xq, xscale = act_quant.quantize_act(x)
    return w4a8_gemm.w4a8_gemm(xq, xscale, qweight, channel_scale, group_scale, bias, group_size, x.dtype)


# --------------------------------------------------------------------------- qqq::quantize_act


@torch.library.custom_op("qqq::quantize_act", mutates_args=(), device_types="cpu")
def quantize_act(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8: ``x [..., K]`` -> ``(q int8 [..., K], scale float32 [..., 1])``."""
    _check_float(x)
    q, s = cpu.quantize_act(_at_least_2d(x))
    return _restore(q, x), _restore(s, x)


quantize_act.register_kernel("cuda")(quantize_act_triton)


@quantize_act.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_float(x)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# --------------------------------------------------------------------------- qqq::rmsnorm_quant


@torch.library.custom_op("qqq::rmsnorm_quant", mutates_args=(), device_types="cpu")
def rmsnorm_quant(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x * rsqrt(mean(x^2) + eps) * weight`` in float32, then per-token int8 (q, scale)."""
    _check_norm(x, weight)
    q, s = cpu.rmsnorm_quant(_at_least_2d(x), weight, eps)
    return _restore(q, x), _restore(s, x)


rmsnorm_quant.register_kernel("cuda")(rmsnorm_quant_triton)


@rmsnorm_quant.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_norm(x, weight)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# --------------------------------------------------------------------------- qqq::w4a8_linear


@torch.library.custom_op("qqq::w4a8_linear", mutates_args=(), device_types="cpu")
def w4a8_linear(
    x: Tensor,
    qweight: Tensor,
    channel_scale: Tensor,
    group_scale: Tensor | None,
    bias: Tensor | None,
    group_size: int,
) -> Tensor:
    """``y = x @ W.T + bias`` with per-token int8 ``x`` (quantized inside) and packed W4.

    ``x`` float ``[..., K]``; the result is ``[..., N]`` in ``x``'s dtype.
    """
    _check_float(x)
    check_weight_args(x.shape[-1], qweight, channel_scale, group_scale, bias, group_size)
    y = cpu.w4a8_linear(_at_least_2d(x), qweight, channel_scale, group_scale, bias, group_size)
    return _restore(y, x)


w4a8_linear.register_kernel("cuda")(w4a8_linear_triton)


@w4a8_linear.register_fake
def _(
    x: Tensor,
    qweight: Tensor,
    channel_scale: Tensor,
    group_scale: Tensor | None,
    bias: Tensor | None,
    group_size: int,
) -> Tensor:
    _check_float(x)
    n = check_weight_args(x.shape[-1], qweight, channel_scale, group_scale, bias, group_size)
    return x.new_empty((*x.shape[:-1], n))


# --------------------------------------------------------------------------- qqq::w4a8_linear_q


@torch.library.custom_op("qqq::w4a8_linear_q", mutates_args=(), device_types="cpu")
def w4a8_linear_q(
    xq: Tensor,
    xscale: Tensor,
    qweight: Tensor,
    channel_scale: Tensor,
    group_scale: Tensor | None,
    bias: Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """W4A8 linear on already-quantized activations (``xq`` int8 ``[..., K]``, ``xscale`` ``[..., 1]``),
    e.g. the output of ``qqq::rmsnorm_quant``; the result is ``[..., N]`` in ``out_dtype``."""
    check_act_args(xq, xscale)
    check_weight_args(xq.shape[-1], qweight, channel_scale, group_scale, bias, group_size)
    _check_out_dtype(out_dtype)
    y = cpu.w4a8_linear_q(
        _at_least_2d(xq), _at_least_2d(xscale), qweight, channel_scale, group_scale, bias, group_size, out_dtype
    )
    return _restore(y, xq)


w4a8_linear_q.register_kernel("cuda")(w4a8_linear_q_triton)


@w4a8_linear_q.register_fake
def _(
    xq: Tensor,
    xscale: Tensor,
    qweight: Tensor,
    channel_scale: Tensor,
    group_scale: Tensor | None,
    bias: Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
) -> Tensor:
    check_act_args(xq, xscale)
    n = check_weight_args(xq.shape[-1], qweight, channel_scale, group_scale, bias, group_size)
    _check_out_dtype(out_dtype)
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


__all__ = [
    "quantize_act",
    "quantize_act_triton",
    "rmsnorm_quant",
    "rmsnorm_quant_triton",
    "w4a8_linear",
    "w4a8_linear_q",
    "w4a8_linear_q_triton",
    "w4a8_linear_triton",
]
