"""How ``gptq`` runs a block's linears while it calibrates.

* A linear GPTQ has quantized runs as the lowered model runs it: the target's
  ``calib_linear`` (W4A8: ``torch.ops.qqq.w4a8_linear`` on the packed weight, i.e.
  per-token int8 input and exact int32 accumulation), so every later Hessian sees the
  deployed numerics. Its input may be held as the target's ``QuantizedInput`` (the int8
  codes and scales the kernel computes anyway: a quarter of the float bytes).
* GPTAQ's float run computes its linears as bf16 GEMMs (:func:`bf16_override`), and
  waits between segments in bf16 once it holds more than :data:`FLOAT_RUN_BUDGET`
  (:func:`stash_float_run`).
* Both runs compute a gated MLP's ``silu(gate) * up`` (captured as ``sigmoid``, ``mul``,
  ``mul``) as one ``silu`` and one in-place ``mul_`` (:func:`silu_mul_overrides`).

The activation quantizer and the kernel call belong to the target
(``Target.quantize_input``, ``Target.calib_linear``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.compiler.block_runner import Env
from qqq_compile.graph import LinearSite, get_weight

__all__ = [
    "FLOAT_RUN_BUDGET",
    "bf16_override",
    "float_run_bytes",
    "silu_mul_overrides",
    "stash_float_run",
]

aten = torch.ops.aten


def bf16_override(gm: GraphModule, site: LinearSite) -> Callable[..., Any]:
    """Replacement for ``site.node`` in GPTAQ's float run: the same linear as a bf16 GEMM
    (input and weight rounded to bf16, fp32 accumulation inside, the result in the input's
    dtype; the bias added in that dtype)."""
    xi, cache = site.x_index(), {}

    def run(*args: Any, **kwargs: Any) -> Any:
        x, bias = args[xi], site.bias_value(args, kwargs)
        if "w" not in cache:  # read when the block runs (weights may be streamed)
            w = get_weight(gm, site)
            cache["w"], cache["dtype"] = w.to(torch.bfloat16), w.dtype
        y = torch.nn.functional.linear(x.to(torch.bfloat16), cache["w"]).to(cache["dtype"])
        return y if bias is None else y.add_(bias)

    return run


#: GPTAQ's float run keeps its values between segments in bf16 once they exceed this
#: (fp32 bytes over all batches: 128 x 512 tokens at hidden 2048 is 512 MiB); below it
#: (SmolLM2 at 128 windows: 151 MiB) nothing is rounded. The quantized run stays fp32.
FLOAT_RUN_BUDGET = 512 << 20


@dataclass
class _Stashed:
    """A float-run value kept in bf16 between segments, restored to ``dtype`` on use."""

    value: torch.Tensor
    dtype: torch.dtype


def float_run_bytes(fenvs: list[Env | None], envs: list[Env]) -> int:
    """fp32-equivalent bytes of the float run's own values (those not shared with the
    quantized run; None: a batch the float run skips)."""
    total = 0
    for fenv, env in zip(fenvs, envs, strict=True):
        for k, v in (fenv or {}).items():
            if isinstance(v, _Stashed):
                total += v.value.numel() * v.dtype.itemsize
            elif isinstance(v, torch.Tensor) and v is not env.get(k):
                total += v.numel() * v.element_size()
    return total


def stash_float_run(fenv: Env, env: Env, on: bool) -> None:
    """Round the float run's own fp32 values to bf16 (``on``), or restore them (``not on``)."""
    for k, v in fenv.items():
        if not on and isinstance(v, _Stashed):
            fenv[k] = v.value.to(v.dtype)
        elif on and isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v is not env.get(k):
            fenv[k] = _Stashed(v.to(torch.bfloat16), v.dtype)


def _gate_of(m1: Node, s: Node) -> Node | None:
    """The ``g`` of ``m1 = g * sigmoid(g)`` (either order), else None."""
    if m1.op != "call_function" or m1.target is not aten.mul.Tensor or len(m1.args) != 2 or m1.kwargs:
        return None
    a, b = m1.args
    g = s.args[0]
    return g if {a, b} == {g, s} and a is not b else None


def silu_mul_overrides(nodes: Sequence[Node]) -> dict[Node, Callable[..., Any]]:
    """Overrides computing each ``(g * sigmoid(g)) * u`` among ``nodes`` as
    ``silu(g).mul_(u)``: the ``sigmoid`` and the first ``mul`` pass ``g`` through and the
    second ``mul`` does the work. Why: at SmolLM2's calibration batches of 16 windows (8192
    tokens x 1536) each of the three ops wrote a fresh 50 MB tensor, past the 32 MB that
    glibc's default mmap threshold stops at, so each paid its page faults: 1.8 s of an 11 s
    GPTQ block for the quantized and float runs together. The fused pair writes one tensor.
    Only where nothing else reads the sigmoid or the first product (the pass-through values
    are then never seen)."""
    out: dict[Node, Callable[..., Any]] = {}
    for s in nodes:
        if s.op != "call_function" or s.target is not aten.sigmoid.default or len(s.users) != 1:
            continue
        (m1,) = s.users
        g = _gate_of(m1, s)
        if g is None or len(m1.users) != 1:
            continue
        (m2,) = m1.users
        if m2.op != "call_function" or m2.target is not aten.mul.Tensor or len(m2.args) != 2 or m2.kwargs:
            continue
        if m2.args[0] is m2.args[1]:
            continue
        pos = 0 if m2.args[0] is m1 else 1

        def gated(*args: Any, pos: int = pos) -> Any:
            gate, up = args[pos], args[1 - pos]
            act = torch.nn.functional.silu(gate)
            if isinstance(up, torch.Tensor) and up.shape == act.shape and up.dtype == act.dtype:
                return act.mul_(up)  # act is this call's own tensor: nothing else holds it
            return torch.mul(act, up)

        out[s] = _arg_at(0)
        out[m1] = _arg_at(m1.args.index(g))
        out[m2] = gated
    return out


def _arg_at(i: int) -> Callable[..., Any]:
    """An override returning its ``i``-th argument (a pass-through)."""
    return lambda *args: args[i]
