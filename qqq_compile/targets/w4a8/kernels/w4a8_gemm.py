"""Triton W4A8 GEMM: int8 activations times packed int4 weights, int32 accumulation.

``C = (s_tok[:, None] * s_ch[None, :]) * (Xq @ W8.T) + bias`` where ``Xq`` is the per-token
int8 activation, ``W8`` the int8 weight rebuilt in registers from the packed int4 data
(see :mod:`qqq_compile.targets.w4a8.formats`), and the int8 x int8 product runs on tensor cores via
``tl.dot(..., out_dtype=tl.int32)``.

Weight modes (a ``constexpr``, one compiled variant each):

* ``PER_CHANNEL``: ``W8 = q4 << 4``.
* ``GROUP_INT8``: ``W8 = q4 * gs`` with integer ``gs`` in [1, 16], exact in int8.
* ``GROUP_FP16``: ``W8 = clamp(round(q4 * gs), -127, 127)`` with float16 ``gs``; the
  product of a 4-bit integer and an fp16 value is exact in float32, so this too matches
  the reference bit for bit.

Per-group weights are scaled *before* the dot (one int32 accumulator, no per-group
partial sums), which needs every ``BLOCK_K`` tile to sit inside one group: the host
wrapper shrinks ``BLOCK_K`` to divide ``group_size``. A last, shorter group (K = 576,
group 128) and ragged M/N/K edges are handled by masking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from qqq_compile.targets.w4a8.formats import PackedW4
from qqq_compile.targets.w4a8.kernels.act_quant import launcher, round_half_even

PER_CHANNEL, GROUP_INT8, GROUP_FP16 = 0, 1, 2
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# No FMA contraction: the epilogue then rounds exactly like the torch reference.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _w4a8_gemm_kernel(
    # Pointers to matrices
    a_ptr,  # int8 activations [M, K]
    a_scale_ptr,  # float32 per-token scales [M]
    b_ptr,  # uint8 packed int4 weight [N, ceil(K / 2)], two k per byte, even k low
    ch_scale_ptr,  # float32 per-channel scales [N]
    gs_ptr,  # group scales [N, G], int8 or float16 (unused for PER_CHANNEL)
    bias_ptr,  # bias [N] in any float dtype (unused unless HAS_BIAS)
    c_ptr,  # output [M, N]: float (EPILOGUE) or int32 accumulators
    # Matrix dimensions
    M,
    N,
    K,
    group_size,  # K columns per group (a multiple of BLOCK_K); unused for PER_CHANNEL
    # Row strides. Rows are contiguous (the wrapper makes them so): a unit column
    # stride known at compile time lets Triton vectorize the loads and stores.
    stride_am,
    stride_bn,
    stride_gn,
    stride_cm,
    # Meta-parameters
    WEIGHT_MODE: tl.constexpr,  # PER_CHANNEL (0), GROUP_INT8 (1) or GROUP_FP16 (2)
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,  # False: store the raw int32 accumulator (for exactness tests)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # rows of output tiles walked together, for L2 reuse of weights
):
    # -----------------------------------------------------------
    # Map the program id to the output tile it computes, in grouped order so that
    # consecutive programs share weight tiles in L2 (as in the Triton matmul tutorial).
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # -----------------------------------------------------------
    # Pointers to the first A tile [BLOCK_M, BLOCK_K] and the first packed weight tile
    # [BLOCK_N, BLOCK_K // 2]; both advance along K in the loop.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_kb[None, :]
    k_bytes = (K + 1) // 2

    # -----------------------------------------------------------
    # Main loop: unpack a weight tile to int8 and accumulate one int8 tensor-core dot.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kt * BLOCK_K
        # Masked-out activations are 0, so the padding nibble of an odd K and the
        # columns past K contribute nothing whatever the weight bytes hold.
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0)
        packed = tl.load(b_ptrs, mask=mask_n[:, None] & (offs_kb[None, :] < k_bytes - k0 // 2), other=0)
        packed = packed.to(tl.int8, bitcast=True)
        if WEIGHT_MODE == 0:
            # q4 << 4 for both nibbles: shift the low one up, mask the high one in place.
            lo = packed << 4
            hi = packed & -16
        else:
            # Sign-extend each nibble with an arithmetic shift.
            lo = (packed << 4) >> 4
            hi = packed >> 4
            # The whole tile lies in group k0 // group_size (BLOCK_K divides group_size).
            gs = tl.load(gs_ptr + offs_n * stride_gn + k0 // group_size, mask=mask_n, other=0)
            if WEIGHT_MODE == 1:
                # q4 in [-8, 7] times gs in [1, 16] lies in [-128, 112]: exact in int8.
                lo = lo * gs[:, None]
                hi = hi * gs[:, None]
            else:
                # q4 * gs is exact in float32, so only the rounding (half to even, as
                # torch.round) and the clamp shape the result.
                gsf = gs.to(tl.float32)[:, None]
                lo = tl.minimum(tl.maximum(round_half_even(lo.to(tl.float32) * gsf), -127.0), 127.0)
                hi = tl.minimum(tl.maximum(round_half_even(hi.to(tl.float32) * gsf), -127.0), 127.0)
                lo = lo.to(tl.int8)
                hi = hi.to(tl.int8)
        # Interleave the nibbles back into k order: [BLOCK_N, BLOCK_K // 2, 2] -> [BLOCK_N, BLOCK_K].
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K // 2

    # -----------------------------------------------------------
    # Epilogue: dequantize with s_token * s_channel, add the bias, cast, store.
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE:
        s_tok = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
        s_ch = tl.load(ch_scale_ptr + offs_n, mask=mask_n, other=0.0)
        out = acc.to(tl.float32) * s_tok[:, None] * s_ch[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc, mask=c_mask)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of one compiled GEMM variant."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def for_group_size(self, group_size: int) -> GemmConfig:
        """This config with ``block_k`` shrunk (by halving) until it divides ``group_size``."""
        if group_size <= 0:
            return self
        bk = self.block_k
        while bk >= 32 and group_size % bk:
            bk //= 2
        if bk < 32:
            raise ValueError(f"group_size={group_size} must be a multiple of 32 for the Triton W4A8 GEMM")
        return GemmConfig(self.block_m, self.block_n, bk, self.group_m, self.num_warps, self.num_stages)

    def grid(self, m: int, n: int) -> tuple[int]:
        """One program per output tile."""
        return (triton.cdiv(m, self.block_m) * triton.cdiv(n, self.block_n),)

    def launch_options(self) -> dict[str, Any]:
        """The tile constexprs and launch options every GEMM kernel here takes."""
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "GROUP_M": self.group_m,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            **LAUNCH_OPTIONS,
        }


def int8_rows(xq: torch.Tensor) -> torch.Tensor:
    """``xq [..., K]`` as ``[M, K]`` with unit column stride (what the GEMM kernels read)."""
    a = xq.reshape(-1, xq.shape[-1])
    return a if a.stride(-1) == 1 else a.contiguous()


# The configurations shipped (and compiled ahead of time in the tests), keyed by the
# largest M each is picked for. Small M is weight-bandwidth bound: narrow N tiles spread
# the weight over more SMs. Large M is compute bound: big tiles reuse each loaded byte.
# All compile without register spills on sm_80 and sm_90 (checked in test_aot_ptx.py);
# BLOCK_K = 128 at M >= 64 pushed the fp16-group variant to 255 registers on sm_80.
CONFIGS: dict[int, GemmConfig] = {
    16: GemmConfig(16, 64, 128, group_m=8, num_warps=4, num_stages=4),
    64: GemmConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=3),
    1 << 62: GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3),
}


def pick_config(m: int) -> GemmConfig:
    """The shipped config for ``m`` rows of activations."""
    for max_m, cfg in CONFIGS.items():
        if m <= max_m:
            return cfg
    raise AssertionError("unreachable: the last CONFIGS key is unbounded")


# --------------------------------------------------------------------------- host wrappers


def weight_mode(group_scale: torch.Tensor | None) -> int:
    if group_scale is None:
        return PER_CHANNEL
    return GROUP_INT8 if group_scale.dtype == torch.int8 else GROUP_FP16


def check_weight_args(
    k: int,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> int:
    """Validate the packed weight tensors against ``K = k``; return ``N``.

    Integer arithmetic only, so it also runs on symbolic shapes in fake kernels.
    """
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if qweight.shape[1] != (k + 1) // 2:
        raise ValueError(f"qweight has {qweight.shape[1]} bytes per row; K={k} needs {(k + 1) // 2}")
    if channel_scale.dtype != torch.float32 or tuple(channel_scale.shape) != (n,):
        raise ValueError(
            f"channel_scale must be float32 of shape ({n},), got {channel_scale.dtype} {tuple(channel_scale.shape)}"
        )
    if (group_size > 0) != (group_scale is not None):
        raise ValueError("group_scale must be given exactly when group_size > 0")
    if group_scale is not None:
        if group_scale.dtype not in (torch.int8, torch.float16):
            raise ValueError(f"group_scale must be int8 or float16, got {group_scale.dtype}")
        g = (k + group_size - 1) // group_size
        if tuple(group_scale.shape) != (n, g):
            raise ValueError(f"group_scale must have shape ({n}, {g}), got {tuple(group_scale.shape)}")
    if bias is not None and (not bias.dtype.is_floating_point or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a float tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    return n


def check_act_args(xq: torch.Tensor, x_scale: torch.Tensor) -> None:
    if xq.dtype != torch.int8 or xq.dim() < 1:
        raise ValueError(f"xq must be an int8 tensor [..., K], got {xq.dtype} {tuple(xq.shape)}")
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (*xq.shape[:-1], 1):
        raise ValueError(
            f"xscale must be float32 of shape {(*xq.shape[:-1], 1)}, got {x_scale.dtype} {tuple(x_scale.shape)}"
        )


def _launch(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
    config: GemmConfig | None,
    epilogue: bool,
) -> torch.Tensor:
    check_act_args(xq, x_scale)
    k = xq.shape[-1]
    n = check_weight_args(k, qweight, channel_scale, group_scale, bias, group_size)
    kernel = launcher(_w4a8_gemm_kernel, xq, x_scale, qweight, channel_scale, group_scale, bias)
    a = int8_rows(xq)
    m = a.shape[0]
    c = torch.empty((m, n), dtype=out_dtype if epilogue else torch.int32, device=xq.device)
    if m and n:
        cfg = (config or pick_config(m)).for_group_size(group_size)
        mode = weight_mode(group_scale)
        gs = group_scale.contiguous() if group_scale is not None else None
        kernel[cfg.grid(m, n)](
            a,
            x_scale.reshape(-1).contiguous(),
            qweight.contiguous(),
            channel_scale.contiguous(),
            gs,
            bias.contiguous() if bias is not None else None,
            c,
            m,
            n,
            k,
            max(group_size, 1),
            a.stride(0),
            qweight.shape[1],
            gs.stride(0) if gs is not None else 0,
            c.stride(0),
            WEIGHT_MODE=mode,
            HAS_BIAS=bias is not None,
            EPILOGUE=epilogue,
            **cfg.launch_options(),
        )
    return c.view(*xq.shape[:-1], n)


def w4a8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = -1,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """W4A8 linear on pre-quantized activations: ``xq`` int8 ``[..., K]`` -> ``[..., N]``.

    ``x_scale`` is the float32 per-token scale ``[..., 1]``; ``config`` overrides the
    tile sizes picked from M (tests use large tiles to keep the interpreter fast).
    """
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    return _launch(xq, x_scale, qweight, channel_scale, group_scale, bias, group_size, out_dtype, config, True)


def w4a8_gemm_int32(
    xq: torch.Tensor,
    qweight: torch.Tensor,
    group_scale: torch.Tensor | None = None,
    group_size: int = -1,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """The kernel's raw int32 accumulator ``Xq @ W8.T`` (no epilogue), for exactness tests."""
    n = qweight.shape[0] if qweight.dim() == 2 else 0
    x_scale = torch.ones((*xq.shape[:-1], 1), dtype=torch.float32, device=xq.device)
    ch = torch.ones((n,), dtype=torch.float32, device=xq.device)
    return _launch(xq, x_scale, qweight, ch, group_scale, None, group_size, torch.int32, config, False)


# --------------------------------------------------------------------------- references


def int8_weight_ref(qweight: torch.Tensor, group_scale: torch.Tensor | None, group_size: int, k: int) -> torch.Tensor:
    """``W8`` ``[N, K]`` from the packed tensors, via :meth:`PackedW4.int8_weight`."""
    n = qweight.shape[0]
    ch = torch.ones(n, dtype=torch.float32, device=qweight.device)
    return PackedW4(qweight, ch, group_scale, k, group_size if group_scale is not None else -1).int8_weight()


def w4a8_gemm_int32_ref(
    xq: torch.Tensor, qweight: torch.Tensor, group_scale: torch.Tensor | None = None, group_size: int = -1
) -> torch.Tensor:
    """Pure-torch int32 accumulator ``Xq @ W8.T`` (``torch._int_mm``)."""
    k = xq.shape[-1]
    w8 = int8_weight_ref(qweight, group_scale, group_size, k)
    a = int8_rows(xq)
    if a.device.type == "cpu" or (a.shape[0] > 16 and k % 8 == 0 and w8.shape[0] % 8 == 0):
        acc = torch._int_mm(a, w8.t())
    else:  # CUDA's _int_mm wants M > 16 and multiples of 8; int64 matmul is exact too.
        acc = (a.long() @ w8.t().long()).to(torch.int32)
    return acc.view(*xq.shape[:-1], w8.shape[0])


def w4a8_gemm_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    channel_scale: torch.Tensor,
    group_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = -1,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Pure-torch reference of :func:`w4a8_gemm`, with the kernel's epilogue order."""
    acc = w4a8_gemm_int32_ref(xq, qweight, group_scale, group_size)
    out = acc.float() * x_scale * channel_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# --------------------------------------------------------------------------- AOT specs

_TL_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32"}


def aot_spec(mode: int, cfg: GemmConfig, out_dtype: torch.dtype, has_bias: bool = True) -> dict:
    """``triton.compile`` inputs for one variant: ``name``, ``fn``, ``signature``, ``constexprs``, ``options``.

    ``out_dtype=torch.int32`` is the accumulator-only variant.
    """
    epilogue = out_dtype != torch.int32
    has_bias = has_bias and epilogue
    cfg = cfg.for_group_size(128 if mode != PER_CHANNEL else -1)
    const = {
        "WEIGHT_MODE": mode,
        "HAS_BIAS": has_bias,
        "EPILOGUE": epilogue,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
    }
    sig = {
        "a_ptr": "*i8",
        "a_scale_ptr": "*fp32",
        "b_ptr": "*u8",
        "ch_scale_ptr": "*fp32",
        "gs_ptr": {PER_CHANNEL: "*i8", GROUP_INT8: "*i8", GROUP_FP16: "*fp16"}[mode],
        "bias_ptr": _TL_PTR[out_dtype] if has_bias else "*fp32",
        "c_ptr": _TL_PTR[out_dtype],
    }
    ints = ("M", "N", "K", "group_size", "stride_am", "stride_bn", "stride_gn", "stride_cm")
    sig |= {name: "i32" for name in ints}
    sig |= {name: "constexpr" for name in const}
    # What the JIT would specialize for an LLM layer (N, K multiples of 32, 16-byte
    # aligned tensors): divisibility by 16 of every pointer and of N, K and the row
    # strides. M and the group-scale stride (ceil(K / 128)) are left general.
    aligned = [n for n in sig if n.endswith("_ptr")] + ["N", "K", "group_size", "stride_am", "stride_bn", "stride_cm"]
    if mode == PER_CHANNEL:
        aligned.remove("group_size")
    mode_name = {PER_CHANNEL: "per_channel", GROUP_INT8: "group_int8", GROUP_FP16: "group_fp16"}[mode]
    name = f"w4a8_gemm[{mode_name}, {out_dtype}, bias={has_bias}, {cfg.block_m}x{cfg.block_n}x{cfg.block_k}]"
    return {
        "name": name,
        "fn": _w4a8_gemm_kernel,
        "signature": sig,
        "constexprs": const,
        "attrs": {(list(sig).index(n),): [["tt.divisibility", 16]] for n in aligned},
        "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **LAUNCH_OPTIONS},
    }


def aot_specs() -> list[dict]:
    """Every shipped configuration: each config x weight mode with fp16 output and bias,
    and each other output dtype (bf16, fp32, the int32 accumulator) once, at M <= 16 tiles."""
    specs = [
        aot_spec(mode, cfg, torch.float16) for mode in (PER_CHANNEL, GROUP_INT8, GROUP_FP16) for cfg in CONFIGS.values()
    ]
    for mode, dt in ((PER_CHANNEL, torch.bfloat16), (GROUP_INT8, torch.float32), (GROUP_FP16, torch.int32)):
        specs.append(aot_spec(mode, CONFIGS[16], dt, has_bias=False))
    return specs
