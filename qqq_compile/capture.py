"""Capture: the only module that knows about ``torch.export`` and Hugging Face quirks.

``capture(model, example_inputs)`` returns a :class:`Captured` holding an FX
``GraphModule`` whose batch and sequence dimensions are dynamic, whose linears are
``aten.linear`` nodes (not decomposed to ``mm``) and whose nodes carry the
``nn_module_stack`` of the module that produced them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim
from torch.fx import GraphModule

from .errors import CaptureError  # noqa: F401 - defined in errors, re-exported here


@dataclass
class Captured:
    graph_module: GraphModule
    input_names: list[str]
    output_kind: str  # "hf" (ModelOutput with .logits), "tensor", or "other"
    model_config: dict[str, Any] | None = None
    model_class: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _is_hf(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "to_dict")


def _example_inputs(model: torch.nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    if example_inputs is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            raise CaptureError("example_inputs is required for models without a Hugging Face config")
        return {"input_ids": torch.randint(0, vocab, (2, 8))}
    if isinstance(example_inputs, torch.Tensor):
        return {"input_ids": example_inputs}
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    raise CaptureError(
        "example_inputs must be a tensor of token ids or a dict of keyword tensors, "
        f"got {type(example_inputs).__name__}"
    )


def _widen(inputs: dict[str, Any]) -> dict[str, Any]:
    """Grow size-1 batch and sequence dims of the example to 2 by repetition.

    torch.export specialises a dim whose example size is 0 or 1 (and then reports the
    dynamic dim as violated), so a ``(1, seq)`` example would fail. Repeating rows or
    tokens changes nothing about the traced program, only the example's sizes.
    """
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            if v.dim() >= 2 and v.shape[0] == 1:
                v = v.repeat(2, *([1] * (v.dim() - 1)))
            seq_dim = 1 if v.dim() >= 2 else 0
            if v.shape[seq_dim] == 1:
                reps = [1] * v.dim()
                reps[seq_dim] = 2
                v = v.repeat(*reps)
        out[k] = v
    return out


def _explain(e: BaseException) -> str:
    msg = str(e).split("\n")[0][:400]
    name = type(e).__name__
    if "DynamicCache" in msg or "Cache" in name:
        hint = "pass use_cache=False (set model.config.use_cache = False)"
    elif "data-dependent" in str(e).lower() or "GuardOnDataDependent" in name:
        # Checked before the shape case: its message also says "guard".
        hint = (
            "the model branches on tensor values (data-dependent control flow); rewrite it with "
            "torch.cond/torch.where or quantize it block by block (qqq_compile.compile(..., fallback='blockwise'))"
        )
    elif "Constraints violated" in str(e) or "specialized" in str(e) or "guard" in msg.lower():
        hint = (
            "the model specialises on the batch or sequence length (a Python branch on a shape); "
            "use dynamic=False or make the branch shape-independent"
        )
    elif "Unsupported" in name or "not supported" in msg:
        hint = "an op or Python construct is not traceable; try strict=False or file the op name with us"
    else:
        hint = "see the chained exception above for the operation that failed"
    return f"torch.export could not capture the model: {name}: {msg}\n  way out: {hint}"


def capture(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    dynamic: bool = True,
    strict: bool = False,
) -> Captured:
    """Export ``model`` with dynamic batch and sequence dims, keeping ``aten.linear``.

    Hugging Face causal LMs are exported with ``use_cache=False`` and return their
    usual output object (``.logits``). The user's model is not modified.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    inputs = _example_inputs(model, example_inputs)
    kwargs: dict[str, Any] = _widen(inputs) if dynamic else dict(inputs)
    hf = _is_hf(model)
    dyn: dict[str, Any] | None = None
    if dynamic:
        batch, seq = Dim("batch", min=1), Dim("seq", min=2)
        dyn = {}
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor) and v.dim() >= 2:
                dyn[k] = {0: batch, 1: seq}
            elif isinstance(v, torch.Tensor) and v.dim() == 1:
                dyn[k] = {0: seq}
            else:
                dyn[k] = None
    was_training = model.training
    # use_cache=False through the config, not a kwarg, so the captured signature holds
    # only tensors; restored afterwards so the user's model is left as it was.
    old_cache = getattr(model.config, "use_cache", None) if hf else None
    model.eval()
    try:
        if hf:
            model.config.use_cache = False
        gm = export_graph(model, (), kwargs, dyn, strict=strict)
    except Exception as e:  # noqa: BLE001 - re-raised with an explanation
        raise CaptureError(_explain(e)) from e
    finally:
        model.train(was_training)
        if hf:
            model.config.use_cache = old_cache
    out = model_output_kind(model)
    cfg = model.config.to_dict() if hf else None
    return Captured(gm, list(inputs), out, cfg, type(model).__name__)


def export_graph(
    module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], dynamic_shapes: Any, strict: bool = False
) -> GraphModule:
    """``torch.export`` + decomposition to ATen, keeping ``linear`` and SDPA whole."""
    with torch.no_grad():
        ep = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
        table = torch.export.default_decompositions()
        # Passes match linears, and SDPA is faster than its decomposition.
        for op in (torch.ops.aten.linear.default, torch.ops.aten.scaled_dot_product_attention.default):
            table.pop(op, None)
        ep = ep.run_decompositions(table)
    gm = ep.module()
    _drop_guards(gm)
    return gm


def _drop_guards(gm: GraphModule) -> None:
    # The unlifted module checks export-time input guards in a submodule; our own
    # runner executes graphs node by node, so keep the graph free of it.
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def model_output_kind(model: torch.nn.Module) -> str:
    return "hf" if _is_hf(model) else "tensor"
