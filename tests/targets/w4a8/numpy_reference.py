"""Independent references of the W4A8 numeric rules, written from the rules in NumPy.

The package's own torch functions (``formats.quantize_act_per_token``, the kernels'
torch fallbacks) must agree with these; comparing them with each other would compare a
function with itself.

Per-token symmetric int8 (the rule): in float32, ``s = max(max_k |x_k|, 1e-8) / 127``
(one IEEE float32 division), ``q = clamp(round_half_even(x / s), -127, 127)``.
"""

from __future__ import annotations

import numpy as np
import torch


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [..., K], s float32 [..., 1])`` by the per-token rule, in NumPy."""
    a = x.detach().float().numpy()
    amax = np.abs(a).max(axis=-1, keepdims=True) if a.shape[-1] else np.zeros((*a.shape[:-1], 1), np.float32)
    s = np.maximum(amax, np.float32(1e-8)).astype(np.float32) / np.float32(127)
    q = np.clip(np.rint(a / s), -127, 127).astype(np.int8)  # rint: round half to even
    return torch.from_numpy(q), torch.from_numpy(s.astype(np.float32))


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``x · (mean(x²) + eps)^-½ · w`` in float64 (compared with a tolerance: the kernels
    sum in float32 in their own order)."""
    a = x.detach().double().numpy()
    r = 1.0 / np.sqrt((a * a).mean(axis=-1, keepdims=True) + eps)
    return torch.from_numpy(a * r * w.detach().double().numpy())
