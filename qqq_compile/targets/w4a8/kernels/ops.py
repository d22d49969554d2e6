"""The ``torch.ops.qqq.*`` operators: the W4A8 (and W8A8 lm_head) kernels as graph nodes.

The schemas are defined here with ``torch.library`` (a ``Library("qqq", "DEF")``); each op has
a fake (meta) kernel, so it traces under ``torch.export`` (dynamic leading dims included) and
``torch.compile(fullgraph=True)``, and these implementations:

* ``CPU``: the C++ extension's own dispatcher registration (``TORCH_LIBRARY_IMPL(qqq, CPU)``
  in ``csrc/ops_cpu.cpp``), once :func:`qqq_compile.targets.w4a8.kernels.cpu.ensure_cpp_kernels` loaded
  it. No Python runs per call, so AOTInductor packages call it from C++.
* ``CUDA``: the Triton kernels (:mod:`.act_quant`, :mod:`.w4a8_gemm`, :mod:`.w8a8_gemm`).
* ``CompositeExplicitAutograd`` (any device without a kernel of its own): the pure-torch
  reference of :mod:`.cpu`. A CPU tensor reaches it only while no C++ CPU kernel is
  registered; the first such call tries to load the extension (so eager users never need
  to call ``ensure_cpp_kernels``) and, when that works, runs C++ already.

The ``*_triton`` functions below are the CUDA implementations as plain functions. With
``TRITON_INTERPRET=1`` they also accept CPU tensors and run in the Triton interpreter,
which is how the tests check the Triton path on a machine without a GPU; the ops
themselves always send CPU tensors to :mod:`.cpu`.

Inputs are validated in every implementation, with the same messages (the C++ kernels raise
``c10::ValueError``), and errors are ``ValueError``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qqq_compile.targets.w4a8.kernels import act_quant, cpu, w4a8_gemm, w8a8_gemm
from qqq_compile.targets.w4a8.kernels.w4a8_gemm import OUT_DTYPES, check_act_args, check_weight_args
from qqq_compile.targets.w4a8.kernels.w8a8_gemm import check_w8_args

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


# --------------------------------------------------------------------------- schemas

# Kept alive for the life of the process: dropping a Library deregisters what it defined.
_LIB = torch.library.Library("qqq", "DEF")
SCHEMAS = {
    "quantize_act": "quantize_act(Tensor x) -> (Tensor, Tensor)",
    "rmsnorm_quant": "rmsnorm_quant(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
    "w4a8_linear": (
        "w4a8_linear(Tensor x, Tensor qweight, Tensor channel_scale, Tensor? group_scale, Tensor? bias, "
        "SymInt group_size) -> Tensor"
    ),
    "w4a8_linear_q": (
        "w4a8_linear_q(Tensor xq, Tensor xscale, Tensor qweight, Tensor channel_scale, Tensor? group_scale, "
        "Tensor? bias, SymInt group_size, ScalarType out_dtype) -> Tensor"
    ),
    "w8a8_linear": "w8a8_linear(Tensor x, Tensor w8, Tensor scale, Tensor? bias) -> Tensor",
}
for _schema in SCHEMAS.values():
    _LIB.define(_schema)


def _register(name: str, reference, cuda=None):
    """The torch reference for every device (CPU until the C++ kernel is registered), CUDA."""
    _LIB.impl(name, reference, "CompositeExplicitAutograd")
    if cuda is not None:
        _LIB.impl(name, cuda, "CUDA")


def _cpp(x: Tensor, name: str):
    """The C++ kernel for this call if ``x`` is on CPU and the extension loads, else None.

    Reached only before the dispatcher knows the C++ kernel: loading it registers the
    kernel for every later call, and this one runs it directly.
    """
    if x.device.type != "cpu" or not cpu.ensure_cpp_kernels():
        return None
    return getattr(cpu._ext(), name)


# --------------------------------------------------------------------------- qqq::quantize_act


def _quantize_act_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8: ``x [..., K]`` -> ``(q int8 [..., K], scale float32 [..., 1])``."""
    _check_float(x)
    kernel = _cpp(x, "quantize_act")
    return tuple(kernel(x)) if kernel else cpu.quantize_act_torch(x)


_register("quantize_act", _quantize_act_ref, quantize_act_triton)


@torch.library.register_fake("qqq::quantize_act")
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_float(x)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# --------------------------------------------------------------------------- qqq::rmsnorm_quant


def _rmsnorm_quant_ref(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``x * rsqrt(mean(x^2) + eps) * weight`` in float32, then per-token int8 (q, scale)."""
    _check_norm(x, weight)
    kernel = _cpp(x, "rmsnorm_quant")
    return tuple(kernel(x, weight, float(eps))) if kernel else cpu.rmsnorm_quant_torch(x, weight, eps)


_register("rmsnorm_quant", _rmsnorm_quant_ref, rmsnorm_quant_triton)


@torch.library.register_fake("qqq::rmsnorm_quant")
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_norm(x, weight)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# --------------------------------------------------------------------------- qqq::w4a8_linear


def _w4a8_linear_ref(
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
    args = (x, qweight, channel_scale, group_scale, bias, group_size)
    kernel = _cpp(x, "w4a8_linear")
    return kernel(*args) if kernel else cpu.w4a8_linear_torch(*args)


_register("w4a8_linear", _w4a8_linear_ref, w4a8_linear_triton)


@torch.library.register_fake("qqq::w4a8_linear")
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


def _w4a8_linear_q_ref(
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
    args = (xq, xscale, qweight, channel_scale, group_scale, bias, group_size, out_dtype)
    kernel = _cpp(xq, "w4a8_linear_q")
    return kernel(*args) if kernel else cpu.w4a8_linear_q_torch(*args)


_register("w4a8_linear_q", _w4a8_linear_q_ref, w4a8_linear_q_triton)


@torch.library.register_fake("qqq::w4a8_linear_q")
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


# --------------------------------------------------------------------------- qqq::w8a8_linear


def _w8a8_linear_ref(x: Tensor, w8: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``y = x @ (w8 * scale[:, None]).T + bias`` with per-token int8 ``x`` (quantized inside),
    int32 accumulation and the epilogue ``((acc * s_tok) * scale) + bias``; ``[..., N]`` in x's dtype."""
    _check_float(x)
    check_w8_args(x.shape[-1], w8, scale, bias)
    kernel = _cpp(x, "w8a8_linear")
    return kernel(x, w8, scale, bias) if kernel else cpu.w8a8_linear_torch(x, w8, scale, bias)


def w8a8_linear_triton(x: Tensor, w8: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """W8A8 linear with Triton: per-token quantization, then the int8 GEMM (the CUDA implementation)."""
    _check_float(x)
    check_w8_args(x.shape[-1], w8, scale, bias)
    return w8a8_gemm.w8a8_linear_triton(x, w8, scale, bias)


_register("w8a8_linear", _w8a8_linear_ref, w8a8_linear_triton)


@torch.library.register_fake("qqq::w8a8_linear")
def _(x: Tensor, w8: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    _check_float(x)
    n = check_w8_args(x.shape[-1], w8, scale, bias)
    return x.new_empty((*x.shape[:-1], n))


#: The ops a W4 linear lowers to (float input; int8 rows + scales from ``rmsnorm_quant``).
W4A8_OPS = (torch.ops.qqq.w4a8_linear.default, torch.ops.qqq.w4a8_linear_q.default)
#: Every linear op of the W4A8 target: the W4 linears and the int8 head's W8A8 linear.
LINEAR_OPS = (*W4A8_OPS, torch.ops.qqq.w8a8_linear.default)

# The ops as callables (the names the package has always exported).
quantize_act = torch.ops.qqq.quantize_act
rmsnorm_quant = torch.ops.qqq.rmsnorm_quant
w4a8_linear = torch.ops.qqq.w4a8_linear
w4a8_linear_q = torch.ops.qqq.w4a8_linear_q
w8a8_linear = torch.ops.qqq.w8a8_linear

__all__ = [
    "LINEAR_OPS",
    "SCHEMAS",
    "W4A8_OPS",
    "check_w8_args",
    "quantize_act",
    "quantize_act_triton",
    "rmsnorm_quant",
    "rmsnorm_quant_triton",
    "w4a8_linear",
    "w4a8_linear_q",
    "w4a8_linear_q_triton",
    "w4a8_linear_triton",
    "w8a8_linear",
    "w8a8_linear_triton",
]
