"""W4A8 kernels: Triton (GPU), the CPU path, and the ``torch.ops.qqq.*`` custom ops.

Importing this package defines the ops. ``qqq::*`` ops send CUDA tensors to the Triton
kernels and CPU tensors to the C++ extension of :mod:`qqq_compile.targets.w4a8.kernels.cpu`, which
registers itself with the dispatcher when loaded (lazily, on the first CPU call, or by
:func:`ensure_cpp_kernels`; call that before ``torch._inductor.aoti_load_package``).

The Triton GEMM wrapper itself is ``qqq_compile.targets.w4a8.kernels.w4a8_gemm.w4a8_gemm``; it is not
re-exported here because the name would shadow its module.
"""

from qqq_compile.targets.w4a8.kernels.act_quant import quantize_act_ref, rmsnorm_quant_ref
from qqq_compile.targets.w4a8.kernels.cpu import cpp_call_counts, cpu_kernel_source, ensure_cpp_kernels
from qqq_compile.targets.w4a8.kernels.ops import (
    quantize_act,
    quantize_act_triton,
    rmsnorm_quant,
    rmsnorm_quant_triton,
    w4a8_linear,
    w4a8_linear_q,
    w4a8_linear_q_triton,
    w4a8_linear_triton,
    w8a8_linear,
    w8a8_linear_triton,
)
from qqq_compile.targets.w4a8.kernels.w4a8_gemm import (
    CONFIGS,
    GemmConfig,
    pick_config,
    w4a8_gemm_int32,
    w4a8_gemm_int32_ref,
    w4a8_gemm_ref,
)

__all__ = [
    "CONFIGS",
    "GemmConfig",
    "cpp_call_counts",
    "cpu_kernel_source",
    "ensure_cpp_kernels",
    "pick_config",
    "quantize_act",
    "quantize_act_ref",
    "quantize_act_triton",
    "rmsnorm_quant",
    "rmsnorm_quant_ref",
    "rmsnorm_quant_triton",
    "w4a8_gemm_int32",
    "w4a8_gemm_int32_ref",
    "w4a8_gemm_ref",
    "w4a8_linear",
    "w4a8_linear_q",
    "w4a8_linear_q_triton",
    "w4a8_linear_triton",
    "w8a8_linear",
    "w8a8_linear_triton",
]
