"""CPU path for the W4A8 (QQQ) linear: per-token int8 activations x packed int4 weights.

See :mod:`qqq_compile.formats` for the packed layout. Every path computes the exact int32
accumulator ``xq @ W8.T`` and then ``((acc * s_token) * s_ch) + bias`` in fp32, cast to the
output dtype, so all paths agree bit for bit with the pure-torch reference.

Two implementations:

* a C++ extension (``csrc/w4a8_cpu.cpp``, AVX512-VNNI), compiled with
  ``torch.utils.cpp_extension.load`` on first use (about 30-60 s, cached under
  ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). For small ``M`` it runs a
  GEMV/GEMM that reads the packed int4 bytes directly; for large ``M`` it unpacks W8 to
  int8 once per call and hands the GEMM to oneDNN through ``torch._int_mm``.
* a pure-torch fallback, used (with a warning) when the CPU lacks AVX512-VNNI/VBMI, the
  compiler is missing, or ``QQQ_CPU_KERNEL=torch`` is set (also for group sizes that are
  not multiples of 32, silently). It unpacks int4 in torch at every call: 10-500x slower.

Why this design (single-thread CPU time, K=N=4096, int8 group scales, Zen 5; see
``benchmarks/cpu_linear.py`` for the full table): at M=1 the packed kernel takes 0.13 ms
(per-channel 0.10, fp16 groups 0.16) vs 0.11 ms for onnxruntime MatMulNBits and 2.7 ms for
fp32; unpack-in-torch + ``_int_mm`` takes 24-190 ms and ``aten._dyn_quant_matmul_4bit``
(a reference path on x86) 19 ms. At M=16: 0.8 ms vs 3.8 ms for C++ unpack + ``_int_mm``
(oneDNN reorders the weight on every call). At M=512, oneDNN wins (23 ms vs 27 ms) and the
C++ unpack adds only ~0.4 ms, hence the dispatch in :func:`use_packed_kernel`.

No weight-dependent state is cached: the kernels need no prepacking.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

from qqq_compile.formats import ACT_QMAX, unpack_int4

__all__ = [
    "quantize_act",
    "rmsnorm_quant",
    "w4a8_linear",
    "w4a8_linear_q",
    "int8_weight",
    "extension_available",
    "use_packed_kernel",
]


def use_packed_kernel(m: int, k: int) -> bool:
    """Whether ``m`` tokens go to the packed-int4 kernel rather than unpack + ``torch._int_mm``.

    oneDNN's int8 GEMM wins for many tokens, but each call pays for unpacking W8 and
    reordering it (cost ~ K*N), which the packed kernel never does. The measured crossover
    (2-core AVX512-VNNI Zen) grows with K: ~16 tokens at K=576, ~64 at K=2048, ~128 at K=4096.
    The C++ dispatcher applies the same rule (``use_packed`` in csrc/w4a8_cpu.cpp).
    """
    return k < 2 or m < max(16, min(k // 32, 128))


_CSRC = Path(__file__).with_name("csrc") / "w4a8_cpu.cpp"
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512vbmi", "f16c")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ext_state: dict[str, ModuleType | None] = {}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _load_extension() -> ModuleType | None:
    if os.environ.get("QQQ_CPU_KERNEL", "").lower() in ("torch", "0", "off"):
        return None
    missing = [f for f in _REQUIRED_FLAGS if f not in _cpu_flags()]
    if missing:
        warnings.warn(f"qqq_compile: CPU lacks {missing}; using the slower pure-torch W4A8 path", stacklevel=3)
        return None
    try:
        from torch.utils.cpp_extension import load

        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512vbmi", "-mf16c"]
        return load(
            name="qqq_w4a8_cpu",
            sources=[str(_CSRC)],
            # -ffp-contract=off: no FMA contraction, so the epilogue rounds like torch.
            extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", *isa],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # compiler missing, build error, ...
        warnings.warn(
            f"qqq_compile: could not build the W4A8 CPU extension ({type(e).__name__}: {e}); "
            "using the slower pure-torch path",
            stacklevel=3,
        )
        return None


def _ext() -> ModuleType | None:
    """The compiled extension, built on first use; ``None`` selects the torch fallback."""
    if "mod" not in _ext_state:
        _ext_state["mod"] = _load_extension()
    return _ext_state["mod"]


def extension_available() -> bool:
    """Whether the AVX512-VNNI extension is in use (builds it if needed)."""
    return _ext() is not None


# ---------------------------------------------------------------------------- torch reference


def _quantize_act_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / ACT_QMAX
    q = torch.clamp(torch.round(xf / s), -ACT_QMAX, ACT_QMAX).to(torch.int8)
    return q, s


def int8_weight(qweight: torch.Tensor, group_scale: torch.Tensor | None, group_size: int, k: int) -> torch.Tensor:
    """``W8`` int8 ``[N, K]`` from the packed data (same math as ``PackedW4.int8_weight``)."""
    q4 = unpack_int4(qweight, k)
    if group_scale is None:
        return q4 << 4
    gs = group_scale.repeat_interleave(group_size, dim=1)[:, :k]
    if gs.dtype == torch.int8:
        return (q4.to(torch.int16) * gs.to(torch.int16)).to(torch.int8)
    w8 = torch.round(q4.float() * gs.float())
    return w8.clamp(-ACT_QMAX, ACT_QMAX).to(torch.int8)


def _int_mm(a: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a @ w8.T``; ``torch._int_mm`` returns garbage on CPU when K == 1."""
    if a.shape[1] == 1:
        return a.int() * w8.int().t()
    return torch._int_mm(a, w8.t())


def _linear_q_torch(
    a: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    w8 = int8_weight(qweight, group_scale, group_size, a.shape[1])
    acc = _int_mm(a, w8)
    y = acc.float() * xscale.reshape(-1, 1).float() * channel_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---------------------------------------------------------------------------- public API


def _fast(t: torch.Tensor, group_scale: torch.Tensor | None, group_size: int) -> ModuleType | None:
    """The extension if it can take this call, else None (torch fallback)."""
    ext = _ext()
    if ext is None or t.device.type != "cpu" or t.numel() == 0:
        return None
    # Each 128-bit LUT lane covers 32 consecutive k, so groups must be multiples of 32.
    if group_scale is not None and (group_size <= 0 or group_size % 32):
        return None
    return ext


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: returns ``(q int8 [..., K], s float32 [..., 1])``."""
    ext = _fast(x, None, -1)
    if ext is None or x.dtype not in _FLOAT_DTYPES:
        return _quantize_act_torch(x)
    k = x.shape[-1]
    q, s, _ = ext.quantize(x.reshape(-1, k), False)
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in fp32 (``x * rsqrt(mean(x^2) + eps) * weight``) followed by per-token int8.

    The fused kernel sums ``x^2`` in a different order than torch, so ``s`` may differ from
    the torch composition by an ulp and ``q`` by one step where a value sits on a rounding tie.
    """
    ext = _fast(x, None, -1)
    if ext is None or x.dtype not in _FLOAT_DTYPES:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
        return _quantize_act_torch(y)
    k = x.shape[-1]
    q, s = ext.rmsnorm_quant(x.reshape(-1, k), weight, float(eps))
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


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
    """``(xq @ W8.T) * xscale * channel_scale + bias`` for int8 ``xq [..., K]``, ``xscale [..., 1]``."""
    ext = _fast(xq, group_scale, group_size)
    if ext is not None and xq.dtype == torch.int8 and out_dtype in _FLOAT_DTYPES:
        return ext.linear_q(xq, xscale, qweight, channel_scale, group_scale, bias, group_size, out_dtype)
    k = xq.shape[-1]
    y = _linear_q_torch(
        xq.reshape(-1, k).contiguous(),
        xscale.reshape(-1),
        qweight,
        channel_scale,
        group_scale,
        bias,
        group_size,
        out_dtype,
    )
    return y.reshape(*xq.shape[:-1], qweight.shape[0])


def w4a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """W4A8 linear on float ``x [..., K]``: per-token int8 quantization inside; output in x's dtype."""
    ext = _fast(x, group_scale, group_size)
    if ext is not None and x.dtype in _FLOAT_DTYPES:
        # One C++ call: quantize (straight into the kernel's permuted layout) + GEMM + epilogue.
        return ext.linear(x, qweight, channel_scale, group_scale, bias, group_size)
    k = x.shape[-1]
    q, s = _quantize_act_torch(x.reshape(-1, k))
    y = _linear_q_torch(q, s, qweight, channel_scale, group_scale, bias, group_size, x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])
