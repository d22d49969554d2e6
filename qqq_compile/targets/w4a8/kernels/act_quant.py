"""Triton kernels for dynamic per-token int8 activation quantization.

Two kernels, each with a pure-torch reference of the same math beside it:

* :func:`quantize_act` -- ``s = absmax(x) / 127``, ``q = clamp(round(x / s), -127, 127)``
  per row (token), exactly :func:`qqq_compile.targets.w4a8.formats.quantize_act_per_token`.
* :func:`rmsnorm_quant` -- ``y = x * rsqrt(mean(x^2) + eps) * w`` computed in float32,
  then the same per-token quantization of ``y``. Lowering fuses the quantization of a
  linear's input into the RMSNorm in front of it, so ``y`` never reaches memory.

Rounding is round-half-to-even (``torch.round``; see :func:`round_half_even`) and divisions are IEEE round-to-nearest
(``div_rn``; plain ``/`` lowers to an approximate ``div.full.f32`` on NVIDIA GPUs), so
``quantize_act`` is bit-exact against the reference. ``rmsnorm_quant`` sums ``x^2`` in a
different order than torch, so ``q`` may differ by one step at rounding ties. Rows holding
inf or nan give undefined results, as in the reference.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from qqq_compile.targets.w4a8.formats import quantize_act_per_token

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# No FMA contraction, so the float math rounds like the torch reference.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


# --------------------------------------------------------------------------- helpers


@triton.jit
def round_half_even(x):
    """``torch.round`` (ties to even) for ``|x| < 2**22``.

    libdevice's ``rint`` would do on a GPU, but the Triton interpreter, which the tests
    run every kernel in, cannot call libdevice.
    """
    f = tl.floor(x + 0.5)
    tie = (f - x) == 0.5
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(tie & odd, f - 1.0, f)


def runs_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1``."""
    return isinstance(kernel, InterpretedFunction)


def launcher(kernel: Any, *tensors: torch.Tensor | None) -> Any:
    """Check that ``kernel`` can run on the tensors' (single) device and return it.

    CUDA tensors need a compiled kernel; CPU tensors need the Triton interpreter, which
    is chosen once per process: ``TRITON_INTERPRET=1`` must be set before ``triton`` is
    first imported (Triton's own ``tl.sum``/``tl.max`` are decorated at that import).
    """
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type == "cuda" or (device.type == "cpu" and runs_interpreted(kernel)):
        return kernel
    raise ValueError(
        f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
        f"triton is imported; got {device} tensors"
    )


def aot_compile(spec: dict, capability: int) -> dict:
    """Compile one ``aot_specs()`` entry for an NVIDIA GPU of compute capability 80, 90, ...

    Needs no GPU, but must run in a process without ``TRITON_INTERPRET=1``: there even
    Triton's own ``tl.sum``/``tl.max`` are interpreter objects the compiler cannot lower.
    Returns ``name``, ``capability``, ``ptx``, ``shared`` (bytes of shared memory, from the
    kernel metadata) and, from ``cuobjdump -res-usage`` on the cubin, ``registers`` per
    thread and ``stack``/``local`` bytes (non-zero means register spills).
    """
    if runs_interpreted(spec["fn"]) or triton.knobs.runtime.interpret:
        raise RuntimeError("AOT compilation needs a process started without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"], attrs=spec.get("attrs"))
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=spec["options"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        cmd = [triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name]
        usage = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return {
        "name": spec["name"],
        "capability": capability,
        "ptx": kernel.asm["ptx"],
        "shared": kernel.metadata.shared,
        "registers": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
    }


def _rows_config(k: int, block: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(BLOCK_M rows per program, BLOCK_K columns per step, num_warps) for a row length."""
    if block is not None:
        bm, bk = block
        if bm < 1 or bk < 16 or bm & (bm - 1) or bk & (bk - 1):
            raise ValueError(f"block must be two powers of two (rows >= 1, columns >= 16), got {block}")
        return bm, bk, 4
    block_k = min(triton.next_power_of_2(max(k, 16)), 4096)
    # Several short rows per program keep small hidden sizes (576) from launching
    # thousands of tiny programs; long rows get a whole program each.
    block_m = max(1, min(16, 2048 // block_k))
    num_warps = 4 if block_m * block_k <= 4096 else 8
    return block_m, block_k, num_warps


def _flatten_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _run_rows(
    kernel: Any, x: torch.Tensor, tensors: tuple, scalars: tuple, block: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch a row kernel ``kernel(x, *tensors, q, s, M, K, stride_xm, stride_qm, *scalars)``
    over the rows of ``x`` ``[..., K]``; returns int8 ``q`` like ``x`` and float32 ``s [..., 1]``."""
    x2 = _flatten_rows(x, "x")
    run = launcher(kernel, x2, *tensors)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block_m, block_k, num_warps = _rows_config(k, block)
        run[(triton.cdiv(m, block_m),)](
            x2,
            *tensors,
            q,
            s,
            m,
            k,
            x2.stride(0),
            q.stride(0),
            *scalars,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


# --------------------------------------------------------------------------- quantize


@triton.jit
def _quantize_act_kernel(
    x_ptr,  # float input [M, K]
    q_ptr,  # int8 output [M, K]
    s_ptr,  # float32 per-token scale [M]
    M,
    K,
    stride_xm,
    stride_qm,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    row_mask = rows[:, None] < M
    # Pass 1: absmax per row. A row that fits one block makes this loop a single step
    # and the second pass re-reads it from L1/L2.
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask & (cols[None, :] + k0 < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] + k0, mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
    tl.store(s_ptr + rows, scale, mask=rows < M)
    # Pass 2: q = clamp(round(x / s)).
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask & (cols[None, :] + k0 < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] + k0, mask=mask, other=0.0)
        v = tl.math.div_rn(x.to(tl.float32), scale[:, None])
        q = tl.minimum(tl.maximum(round_half_even(v), -127.0), 127.0)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] + k0, q.to(tl.int8), mask=mask)


def quantize_act_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: int8 ``q`` like ``x`` and float32 scale ``[..., 1]``."""
    return quantize_act_per_token(x)


def quantize_act(x: torch.Tensor, *, block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of ``x`` ``[..., K]`` with the Triton kernel.

    ``block`` overrides (rows per program, columns per step), both powers of two; tests
    use large blocks because the interpreter's cost grows with the number of programs.
    """
    return _run_rows(_quantize_act_kernel, x, (), (), block)


# --------------------------------------------------------------------------- rmsnorm + quantize


@triton.jit
def _rmsnorm_quant_kernel(
    x_ptr,  # float input [M, K]
    w_ptr,  # float RMSNorm weight [K]
    q_ptr,  # int8 output [M, K]
    s_ptr,  # float32 per-token scale [M]
    M,
    K,
    stride_xm,
    stride_qm,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    row_mask = rows[:, None] < M
    # Pass 1: mean of squares in float32.
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask & (cols[None, :] + k0 < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] + k0, mask=mask, other=0.0)
        x = x.to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    # K * 1.0 rather than K.to(): Triton turns K == 1 into a Python constant.
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(sq, K * 1.0) + eps))
    # Pass 2: absmax of the normalized row y = x * rstd * w.
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask & (cols[None, :] + k0 < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] + k0, mask=mask, other=0.0)
        w = tl.load(w_ptr + cols + k0, mask=cols + k0 < K, other=0.0)
        y = x.to(tl.float32) * rstd[:, None] * w.to(tl.float32)[None, :]
        amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
    tl.store(s_ptr + rows, scale, mask=rows < M)
    # Pass 3: quantize y (recomputed: cheaper than a round trip through memory).
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask & (cols[None, :] + k0 < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] + k0, mask=mask, other=0.0)
        w = tl.load(w_ptr + cols + k0, mask=cols + k0 < K, other=0.0)
        y = x.to(tl.float32) * rstd[:, None] * w.to(tl.float32)[None, :]
        v = tl.math.div_rn(y, scale[:, None])
        q = tl.minimum(tl.maximum(round_half_even(v), -127.0), 127.0)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] + k0, q.to(tl.int8), mask=mask)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * w`` in float32 (the float value the kernel quantizes).

    Hugging Face's LlamaRMSNorm rounds to the input dtype before multiplying by the
    weight; staying in float32 is at least as accurate and the int8 step dwarfs it.
    """
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf * rstd * weight.float()


def rmsnorm_quant_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`rmsnorm_quant`."""
    return quantize_act_per_token(rmsnorm_ref(x, weight, eps))


def _check_norm_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be a float tensor, got {weight.dtype}")


def rmsnorm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, block: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RMSNorm + per-token int8 quantization with the Triton kernel.

    Returns int8 ``q`` shaped like ``x`` and the float32 scale ``[..., 1]``; ``block`` as
    in :func:`quantize_act`.
    """
    _flatten_rows(x, "x")  # x is checked before the weight, as everywhere
    _check_norm_weight(x, weight)
    return _run_rows(_rmsnorm_quant_kernel, x, (weight.contiguous(),), (float(eps),), block)


# --------------------------------------------------------------------------- AOT specs

_TL_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def aot_specs() -> list[dict]:
    """Every shipped configuration as ``triton.compile`` inputs (used by the AOT tests).

    Each entry: ``name``, ``fn``, ``signature``, ``constexprs``, ``attrs`` and ``options``.
    The row configs of hidden sizes 576, 1536 and 4096 (4096 also covers 11008) with
    float16 input, plus float32 and bfloat16 input for the first.
    """
    variants = [(torch.float16, k) for k in (576, 1536, 4096)]
    variants += [(torch.float32, 576), (torch.bfloat16, 576)]
    specs = []
    for dtype, k in variants:
        block_m, block_k, num_warps = _rows_config(k)
        const = {"BLOCK_M": block_m, "BLOCK_K": block_k}
        ptr = _TL_PTR[dtype]
        common = {"M": "i32", "K": "i32", "stride_xm": "i32", "stride_qm": "i32"}
        for name, fn, sig in (
            ("quantize_act", _quantize_act_kernel, {"x_ptr": ptr, "q_ptr": "*i8", "s_ptr": "*fp32"} | common),
            (
                "rmsnorm_quant",
                _rmsnorm_quant_kernel,
                {"x_ptr": ptr, "w_ptr": ptr, "q_ptr": "*i8", "s_ptr": "*fp32"} | common | {"eps": "fp32"},
            ),
        ):
            # Divisibility hints the JIT would derive for aligned tensors and K % 16 == 0.
            aligned = [n for n in sig if n.endswith("_ptr")] + ["K", "stride_xm", "stride_qm"]
            sig = sig | {c: "constexpr" for c in const}
            specs.append(
                {
                    "name": f"{name}[{dtype}, K={k}, {block_m}x{block_k}]",
                    "fn": fn,
                    "signature": sig,
                    "constexprs": const,
                    "attrs": {(list(sig).index(n),): [["tt.divisibility", 16]] for n in aligned},
                    "options": {"num_warps": num_warps, **LAUNCH_OPTIONS},
                }
            )
    return specs


__all__ = [
    "aot_compile",
    "aot_specs",
    "quantize_act",
    "quantize_act_ref",
    "rmsnorm_quant",
    "rmsnorm_quant_ref",
    "rmsnorm_ref",
]
