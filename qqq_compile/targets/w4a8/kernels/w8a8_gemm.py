"""Triton W8A8 GEMM (the CUDA kernel of ``qqq::w8a8_linear``): int8 activations x int8 weights.

``C = ((Xq @ W8.T) * s_tok[:, None]) * s_ch[None, :] + bias`` with ``Xq`` the per-token int8
activation, ``W8`` int8 ``[N, K]`` with a per-output-channel fp32 scale (the int8 lm_head of
:mod:`qqq_compile.targets.w4a8.int8_head`), one int32 ``tl.dot`` per tile, fp32 epilogue in the
same op order as the CPU kernels and the torch reference, so all agree bit for bit. Tiles
come from :func:`qqq_compile.targets.w4a8.kernels.w4a8_gemm.pick_config` (no group constraint on K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qqq_compile.targets.w4a8.kernels import act_quant
from qqq_compile.targets.w4a8.kernels.act_quant import launcher
from qqq_compile.targets.w4a8.kernels.w4a8_gemm import (
    LAUNCH_OPTIONS,
    OUT_DTYPES,
    GemmConfig,
    check_act_args,
    int8_rows,
    pick_config,
)


@triton.jit
def _w8a8_gemm_kernel(
    a_ptr,  # int8 activations [M, K]
    a_scale_ptr,  # float32 per-token scales [M]
    b_ptr,  # int8 weight [N, K]
    ch_scale_ptr,  # float32 per-channel scales [N]
    bias_ptr,  # bias [N] in any float dtype (unused unless HAS_BIAS)
    c_ptr,  # output [M, N]
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order, as in the W4A8 kernel: consecutive programs share weight tiles in L2.
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        # Masked entries are 0 on both sides, so the K tail adds nothing.
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
        w = tl.load(b_ptrs, mask=mask_n[:, None] & (offs_k[None, :] < k_left), other=0)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    s_tok = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    s_ch = tl.load(ch_scale_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * s_tok[:, None] * s_ch[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def check_w8_args(k: int, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Validate the W8A8 weight tensors against ``K = k``; return ``N`` (symbolic-safe).

    The C++ kernel (csrc/ops_cpu.cpp) raises the same messages."""
    if w8.dtype != torch.int8 or w8.dim() != 2 or w8.shape[1] != k:
        raise ValueError(f"w8 must be a 2-D int8 tensor of shape (N, {k}), got {w8.dtype} {tuple(w8.shape)}")
    n = w8.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
        raise ValueError(f"scale must be float32 of shape ({n},), got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (not bias.dtype.is_floating_point or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a float tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    return n


def w8a8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w8: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """W8A8 linear on pre-quantized activations: ``xq`` int8 ``[..., K]`` -> ``[..., N]``.

    ``config`` overrides the tile sizes picked from M (tests use large tiles to keep the
    interpreter fast)."""
    check_act_args(xq, x_scale)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    k = xq.shape[-1]
    n = check_w8_args(k, w8, scale, bias)
    kernel = launcher(_w8a8_gemm_kernel, xq, x_scale, w8, scale, bias)
    a = int8_rows(xq)
    m = a.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m and n:
        cfg = config or pick_config(m)
        w = w8.contiguous()
        kernel[cfg.grid(m, n)](
            a,
            x_scale.reshape(-1).contiguous(),
            w,
            scale.contiguous(),
            bias.contiguous() if bias is not None else None,
            c,
            m,
            n,
            k,
            a.stride(0),
            w.stride(0),
            c.stride(0),
            HAS_BIAS=bias is not None,
            **cfg.launch_options(),
        )
    return c.view(*xq.shape[:-1], n)


def w8a8_linear_triton(
    x: torch.Tensor,
    w8: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """W8A8 linear on float ``x`` (the CUDA implementation): Triton quantization, then the GEMM."""
    xq, xs = act_quant.quantize_act(x)
    return w8a8_gemm(xq, xs, w8, scale, bias, x.dtype, config=config)


# --------------------------------------------------------------------------- ahead-of-time specs

_TL_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def aot_spec(cfg: GemmConfig, out_dtype: torch.dtype, has_bias: bool = True) -> dict:
    """``triton.compile`` inputs for one variant (see :func:`.act_quant.aot_compile`)."""
    const = {
        "HAS_BIAS": has_bias,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
    }
    sig = {
        "a_ptr": "*i8",
        "a_scale_ptr": "*fp32",
        "b_ptr": "*i8",
        "ch_scale_ptr": "*fp32",
        "bias_ptr": _TL_PTR[out_dtype] if has_bias else "*fp32",
        "c_ptr": _TL_PTR[out_dtype],
    }
    sig |= {name: "i32" for name in ("M", "N", "K", "stride_am", "stride_bn", "stride_cm")}
    sig |= {name: "constexpr" for name in const}
    # As the JIT specializes an lm_head: 16-byte aligned pointers, N, K and row strides.
    aligned = [n for n in sig if n.endswith("_ptr")] + ["N", "K", "stride_am", "stride_bn", "stride_cm"]
    return {
        "name": f"w8a8_gemm[{out_dtype}, bias={has_bias}, {cfg.block_m}x{cfg.block_n}x{cfg.block_k}]",
        "fn": _w8a8_gemm_kernel,
        "signature": sig,
        "constexprs": const,
        "attrs": {(list(sig).index(n),): [["tt.divisibility", 16]] for n in aligned},
        "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **LAUNCH_OPTIONS},
    }


def aot_specs() -> list[dict]:
    """Every shipped tile config with fp16 output and bias, plus bf16 without bias once."""
    from qqq_compile.targets.w4a8.kernels.w4a8_gemm import CONFIGS

    return [aot_spec(cfg, torch.float16) for cfg in CONFIGS.values()] + [aot_spec(CONFIGS[16], torch.bfloat16, False)]
