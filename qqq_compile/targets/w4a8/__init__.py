"""The W4A8 target: QQQ's packed int4 weights (per channel or two-level groups) with dynamic
per-token int8 activations, run by the C++ (CPU) and Triton (GPU) kernels."""
