"""The W4A8 target's kernels for calibration nodes other than linears (``Target.calib_ops``).

GPTQ runs every decoder block twice per calibration batch (the quantized run and GPTAQ's
float run). Their attention is a masked SDPA like the deployed model's prefill, and
torch's CPU SDPA computes every tile of it, the ones a causal mask hides included (1.3 s of
an 11 s SmolLM2 block at 128 windows). ``qqq_cpu::attention_f32kv`` runs several query
tokens through ``attention_prefill`` (csrc/attention_prefill_cpu.cpp), which skips them:
the same math in fp32, the prefill step's own kernel.

The rotate pass's online Hadamard before each ``down_proj`` is a chain of an ``mm`` and
``bmm``s (the graph keeps it: exports read it); here its ``mm`` computes the whole transform
with ``qqq_cpu::kron_transform`` (the decode step's kernel, :mod:`.fuse_hadamard`) and each
``bmm`` passes its input through. The views between them only reshape, so the chain's output
is the kernel's: 34 ms against 4 ms per 4096 rows of 1536.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import node_annotation
from qqq_compile.graph.attention import SDPA, sdpa_arg
from qqq_compile.targets.w4a8.fuse_hadamard import chain, kron_factors
from qqq_compile.targets.w4a8.kernels import ensure_cpp_kernels

aten = torch.ops.aten

__all__ = ["calib_ops", "hadamard_overrides", "sdpa_override"]


def sdpa_override(node: Node) -> Callable[..., Any] | None:
    """A replacement for an SDPA node with a mask, no dropout and no ``is_causal`` flag
    (what a captured Hugging Face decoder has): ``qqq_cpu::attention_f32kv`` on fp32 CPU
    tensors with a bool mask, the node's own SDPA call otherwise. None for other nodes."""
    if node.op != "call_function" or node.target is not SDPA:
        return None
    if not isinstance(sdpa_arg(node, 3, "attn_mask", None), Node):
        return None
    if sdpa_arg(node, 4, "dropout_p", 0.0) or sdpa_arg(node, 5, "is_causal", False):
        return None

    def run(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
        if (
            q.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.float32
            and isinstance(attn_mask, torch.Tensor)
            and attn_mask.dtype == torch.bool
            and q.dim() == 4
            and q.shape[2] > 1
            and (enable_gqa or k.shape[1] == q.shape[1])
        ):
            return torch.ops.qqq_cpu.attention_f32kv(
                q, k, v, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale
            )
        return SDPA(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    return run


def _pass_through(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x  # the chain's mm already applied this factor (see hadamard_overrides)


def hadamard_overrides(gm: GraphModule, y: Node) -> dict[Node, Callable[..., Any]]:
    """For an online Hadamard chain ending in ``y``: its ``mm`` runs the whole transform on
    ``qqq_cpu::kron_transform`` (in fp32, the result in the input's dtype), its ``bmm``s
    return their input. Empty when ``y`` ends no chain of the rotate pass's shape."""
    found = chain(gm, y)
    if found is None:
        return {}
    _, mats, ops = found
    flat, sizes = kron_factors(mats)
    k = math.prod(sizes)
    factors: dict[torch.device, torch.Tensor] = {}

    def transform(rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        # rows: the chain input viewed [-1, last factor's order]; the result keeps mm's shape.
        f = factors.setdefault(rows.device, flat.to(rows.device))
        x = rows.reshape(-1, k).float()
        out = torch.ops.qqq_cpu.kron_transform(x, f, sizes)
        return out.to(rows.dtype).view(rows.shape[0], last.shape[1])

    mm, bmms = ops[-1], ops[:-1]
    return {mm: transform, **{b: _pass_through for b in bmms}}


def calib_ops(gm: GraphModule, nodes: Sequence[Node]) -> dict[Node, Callable[..., Any]]:
    """Overrides for the attention nodes and online Hadamard chains among ``nodes`` when
    the C++ kernels load (none otherwise, e.g. a CPU without AVX512-VNNI)."""
    if not ensure_cpp_kernels():
        return {}
    out = {n: f for n in nodes if (f := sdpa_override(n)) is not None}
    for y in nodes:
        if y.op == "call_function" and node_annotation(y).online_hadamard and y.meta.get("val") is not None:
            if y.meta["val"].device.type == "cpu":
                out.update(hadamard_overrides(gm, y))
    return out
