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

Each op is declared once (:class:`OpDecl`: schema, checks, fake outputs, and its torch,
Triton and C++ implementations) and :func:`declare` registers all of it. The ``*_triton``
functions are the CUDA implementations as plain functions. With ``TRITON_INTERPRET=1``
they also accept CPU tensors and run in the Triton interpreter, which is how the tests
check the Triton path on a machine without a GPU; the ops themselves always send CPU
tensors to :mod:`.cpu`.

Inputs are validated in every implementation, with the same messages (the C++ kernels raise
``c10::ValueError``), and errors are ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def _check_norm(x: Tensor, weight: Tensor, eps: float = 0.0) -> None:
    _check_float(x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"weight must be a float tensor of shape ({x.shape[-1]},), got {weight.dtype} {tuple(weight.shape)}"
        )


def _check_w4a8(x: Tensor, qweight: Tensor, channel_scale: Tensor, group_scale, bias, group_size: int) -> None:
    _check_float(x)
    check_weight_args(x.shape[-1], qweight, channel_scale, group_scale, bias, group_size)


def _check_w4a8_q(xq, xscale, qweight, channel_scale, group_scale, bias, group_size: int, out_dtype) -> None:
    check_act_args(xq, xscale)
    check_weight_args(xq.shape[-1], qweight, channel_scale, group_scale, bias, group_size)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _check_w8a8(x: Tensor, w8: Tensor, scale: Tensor, bias: Tensor | None) -> None:
    _check_float(x)
    check_w8_args(x.shape[-1], w8, scale, bias)


# --------------------------------------------------------------------------- the declaration

# Kept alive for the life of the process: dropping a Library deregisters what it defined.
_LIB = torch.library.Library("qqq", "DEF")


@dataclass(frozen=True)
class OpDecl:
    """One ``qqq::`` op, declared once: its schema, the argument checks every
    implementation shares (same messages everywhere, symbolic-shape safe), the empty
    outputs a fake kernel returns, and one implementation per backend: the pure-torch
    reference (any device; CPU until the C++ kernel is registered), the Triton kernel
    (CUDA) and the name of the C++ kernel (``torch.ops.qqq_cpu.<cpp>``, which registers
    itself for CPU when :func:`~qqq_compile.targets.w4a8.kernels.cpu.ensure_cpp_kernels` loads it)."""

    name: str
    signature: str  # "(Tensor x, ...) -> Tensor"
    check: Callable[..., None]
    outputs: Callable[..., Any]
    torch: Callable[..., Any]
    triton: Callable[..., Any]
    cpp: str

    def run_torch(self, *args: Any) -> Any:
        """The reference registered for every device: the C++ kernel when the extension
        loads for a CPU call (the first such call loads it: eager users never need to call
        ``ensure_cpp_kernels``), else the torch implementation."""
        self.check(*args)
        x = args[0]
        if x.device.type == "cpu" and cpu.ensure_cpp_kernels():
            out = getattr(cpu._ext(), self.cpp)(*args)
            return tuple(out) if isinstance(out, list) else out
        return self.torch(*args)

    def run_triton(self, *args: Any) -> Any:
        """The Triton implementation (CUDA; CPU tensors under ``TRITON_INTERPRET=1``)."""
        self.check(*args)
        return self.triton(*args)

    def run_fake(self, *args: Any) -> Any:
        self.check(*args)
        return self.outputs(*args)


def declare(op: OpDecl) -> Any:
    """Define ``qqq::<name>`` from its declaration and register every implementation;
    returns the op (``torch.ops.qqq.<name>``)."""
    _LIB.define(op.name + op.signature)
    _LIB.impl(op.name, op.run_torch, "CompositeExplicitAutograd")
    _LIB.impl(op.name, op.run_triton, "CUDA")
    torch.library.register_fake(f"qqq::{op.name}", op.run_fake, lib=_LIB)
    DECLARED[op.name] = op
    return getattr(torch.ops.qqq, op.name)


DECLARED: dict[str, OpDecl] = {}


def _act_outputs(x: Tensor, *_: Any) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _w4a8_triton(x, qweight, channel_scale, group_scale, bias, group_size):
    xq, xscale = act_quant.quantize_act(x)
    return w4a8_gemm.w4a8_gemm(xq, xscale, qweight, channel_scale, group_scale, bias, group_size, x.dtype)


# --------------------------------------------------------------------------- the ops

quantize_act = declare(
    OpDecl(
        "quantize_act",
        "(Tensor x) -> (Tensor, Tensor)",
        check=_check_float,
        outputs=_act_outputs,
        torch=cpu.quantize_act_torch,
        triton=act_quant.quantize_act,
        cpp="quantize_act",
    )
)
rmsnorm_quant = declare(
    OpDecl(
        "rmsnorm_quant",
        "(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
        check=_check_norm,
        outputs=_act_outputs,
        torch=cpu.rmsnorm_quant_torch,
        triton=act_quant.rmsnorm_quant,
        cpp="rmsnorm_quant",
    )
)
w4a8_linear = declare(
    OpDecl(
        "w4a8_linear",
        "(Tensor x, Tensor qweight, Tensor channel_scale, Tensor? group_scale, Tensor? bias, SymInt group_size)"
        " -> Tensor",
        check=_check_w4a8,
        outputs=lambda x, qweight, *_: x.new_empty((*x.shape[:-1], qweight.shape[0])),
        torch=cpu.w4a8_linear_torch,
        triton=_w4a8_triton,
        cpp="w4a8_linear",
    )
)
w4a8_linear_q = declare(
    OpDecl(
        "w4a8_linear_q",
        "(Tensor xq, Tensor xscale, Tensor qweight, Tensor channel_scale, Tensor? group_scale, Tensor? bias, "
        "SymInt group_size, ScalarType out_dtype) -> Tensor",
        check=_check_w4a8_q,
        outputs=lambda xq, xscale, qweight, *rest: xq.new_empty((*xq.shape[:-1], qweight.shape[0]), dtype=rest[-1]),
        torch=cpu.w4a8_linear_q_torch,
        triton=w4a8_gemm.w4a8_gemm,
        cpp="w4a8_linear_q",
    )
)
w8a8_linear = declare(
    OpDecl(
        "w8a8_linear",
        "(Tensor x, Tensor w8, Tensor scale, Tensor? bias) -> Tensor",
        check=_check_w8a8,
        outputs=lambda x, w8, *_: x.new_empty((*x.shape[:-1], w8.shape[0])),
        torch=cpu.w8a8_linear_torch,
        triton=w8a8_gemm.w8a8_linear_triton,
        cpp="w8a8_linear",
    )
)

#: The schemas as torch.library holds them (name -> "name(args) -> outputs").
SCHEMAS = {name: name + op.signature for name, op in DECLARED.items()}

# The Triton implementations as plain functions (checks included): with TRITON_INTERPRET=1
# they also take CPU tensors, which is how the tests check the Triton path without a GPU
# (the ops themselves always send CPU tensors to the C++ kernels or the reference).
quantize_act_triton = DECLARED["quantize_act"].run_triton
rmsnorm_quant_triton = DECLARED["rmsnorm_quant"].run_triton
w4a8_linear_triton = DECLARED["w4a8_linear"].run_triton
w4a8_linear_q_triton = DECLARED["w4a8_linear_q"].run_triton
w8a8_linear_triton = DECLARED["w8a8_linear"].run_triton

#: The ops a W4 linear lowers to (float input; int8 rows + scales from ``rmsnorm_quant``).
W4A8_OPS = (w4a8_linear.default, w4a8_linear_q.default)
#: Every linear op of the W4A8 target: the W4 linears and the int8 head's W8A8 linear.
LINEAR_OPS = (*W4A8_OPS, w8a8_linear.default)

__all__ = [
    "DECLARED",
    "LINEAR_OPS",
    "SCHEMAS",
    "W4A8_OPS",
    "OpDecl",
    "check_w8_args",
    "declare",
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
