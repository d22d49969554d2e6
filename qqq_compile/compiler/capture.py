"""Capture: the only module that knows about ``torch.export`` and Hugging Face quirks.

``capture(model, example_inputs)`` returns a :class:`Captured` holding an FX
``GraphModule`` whose linears are ``aten.linear`` nodes (not decomposed to ``mm``) and
whose nodes carry the ``nn_module_stack`` of the module that produced them.

``example_inputs`` is a call, as ``torch.export`` takes one: a tensor (the first
positional argument), a tuple of positional arguments, a dict of keyword arguments, or
``(args, kwargs)``. Every input is bound to its ``forward`` parameter name and exported
as a keyword argument, so the graph's inputs have names (``input_ids``, ``pixel_values``,
``input``) whatever the call looked like, and calibration batches are dicts keyed by them.

Dynamic dims, unless ``dynamic_shapes`` (torch.export's own format) says otherwise:

* Hugging Face causal LMs (``model.can_generate()``) and plain modules called with
  integer ``input_ids``: batch and sequence (``Dim("batch")``, ``Dim("seq", min=2)``) on
  every input, as generation needs (a model that cannot keep them dynamic fails export,
  and ``compile`` then falls back to quantizing it block by block);
* other Hugging Face models fed token ids (BERT): dims 0 and 1 as ``Dim.AUTO``, so export
  keeps them dynamic where the model allows (BERT's position table caps the sequence);
* every other module: dim 0 of every tensor input as ``Dim.AUTO`` (dynamic where the model
  allows it, static otherwise, never an error). :attr:`Captured.dynamic` says what came out.

Size-1 example dims that should stay dynamic are widened to 2 by repetition first:
``torch.export`` specialises a dim whose example size is 0 or 1.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves, tree_map

from qqq_compile.compiler.calibration import is_hf as _is_hf
from qqq_compile.compiler.calibration import is_token_model
from qqq_compile.compiler.calibration import split_call as _split_call
from qqq_compile.compiler.capture_replicate import EXPORTED_BLOCKS, replicable_stack, replicate, truncated
from qqq_compile.errors import CaptureError  # noqa: F401 - defined in errors, re-exported here
from qqq_compile.graph import static_size
from qqq_compile.graph.blocks import BlockStack


@dataclass
class Captured:
    """A captured model: the graph and how to call it.

    * ``input_names``: the graph's inputs, as ``forward`` parameter names in signature order.
    * ``positional_names``: the ``forward`` parameters a caller may pass positionally, in
      order (``graph_inputs`` maps position ``i`` of a calibration call to the i-th).
    * ``dynamic``: which input dims are dynamic, in words (for the report).
    * ``replicated``: how the decoder blocks were captured, in words, when only the first
      few were exported and the last of them copied for the rest
      (:mod:`qqq_compile.compiler.capture_replicate`); empty when the whole model was.
    """

    graph_module: GraphModule
    input_names: list[str]
    output_kind: str  # "hf" (ModelOutput with .logits), "tensor", or "other"
    model_config: dict[str, Any] | None = None
    model_class: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    positional_names: list[str] = field(default_factory=list)
    dynamic: str = ""
    replicated: str = ""

    @property
    def device(self) -> torch.device:
        """Where the captured weights live (CPU for a weightless graph): passes compute there."""
        gm = self.graph_module
        return next((t.device for t in [*gm.parameters(), *gm.buffers()]), torch.device("cpu"))

    def graph_inputs(self, call: Mapping[str | int, Any]) -> dict[str, Any]:
        """One call's inputs, keyed by name or by position, as placeholder values keyed by
        placeholder target (what :class:`~qqq_compile.compiler.block_runner.BlockRunner` reads)."""
        named: dict[str, Any] = {}
        for k, v in call.items():
            if isinstance(k, int):
                if not 0 <= k < len(self.positional_names):
                    raise ValueError(
                        f"calibration call has positional input #{k}, but forward takes {len(self.positional_names)} "
                        f"positional argument(s) {self.positional_names}"
                    )
                k = self.positional_names[k]
            named[k] = v
        unknown = [k for k in named if k not in self.input_names]
        missing = [k for k in self.input_names if k not in named]
        if unknown or missing:
            raise ValueError(
                f"calibration call has inputs {sorted(named)} but the model was captured with {self.input_names}: "
                + (f"{unknown} not captured (pass example_inputs=... that include them)" if unknown else "")
                + ("; " if unknown and missing else "")
                + (f"{missing} missing" if missing else "")
            )
        gm = self.graph_module
        flat = fx_pytree.tree_flatten_spec(((), named), gm._in_spec)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for p, v in zip(placeholders, flat, strict=True):
            want = p.meta.get("val")
            if isinstance(want, torch.Tensor) and isinstance(v, torch.Tensor):
                sizes = [static_size(s) for s in want.shape]
                if v.dim() != want.dim() or any(s is not None and v.shape[d] != s for d, s in enumerate(sizes)):
                    shape = ["*" if s is None else s for s in sizes]
                    raise ValueError(
                        f"calibration input '{p.target}' has shape {list(v.shape)}, but the graph takes {shape} "
                        f"('*' = dynamic; {self.dynamic}). Give calibration calls shaped like example_inputs, or "
                        "pass dynamic_shapes=... (torch.export's format) to make those dims dynamic"
                    )
        return {p.target: v for p, v in zip(placeholders, flat, strict=True)}


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A Hugging Face model that generates text (``can_generate()``): a decoder LM."""
    can = getattr(model, "can_generate", None)
    return _is_hf(model) and callable(can) and bool(can())


def split_call(example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """:func:`qqq_compile.compiler.calibration.split_call`, refusing with a :class:`CaptureError`."""
    try:
        return _split_call(example_inputs)
    except TypeError as e:
        raise CaptureError(f"example_inputs {e}") from None


def _signature(model: torch.nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)


def bind_names(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's inputs keyed by ``forward`` parameter name, in signature order."""
    sig = _signature(model)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(
            f"example_inputs do not match {type(model).__name__}.forward{sig}: {e}. Pass a tuple of positional "
            "arguments and/or a dict of keyword arguments (example_inputs=((x,), {'mask': m}))"
        ) from e
    out: dict[str, Any] = {}
    for name, v in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out.update(v)
        elif kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            raise CaptureError(
                f"{type(model).__name__}.forward{sig} takes '{name}' positionally only; capture names every input. "
                "way out: wrap the module in one whose forward takes named arguments"
            )
        else:
            out[name] = v
    return out


def positional_names(model: torch.nn.Module) -> list[str]:
    ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
    return [n for n, p in _signature(model).parameters.items() if p.kind in ok]


def _default_example(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise CaptureError(
            "example_inputs is required for models without a Hugging Face vocabulary: pass the call torch.export "
            "should trace, e.g. example_inputs=(torch.randn(2, 512),)"
        )
    return {"input_ids": torch.randint(0, vocab, (2, 8))}


# ----------------------------------------------------------------------------- dynamic dims


def _repeat_dims(v: Any, dims: tuple[int, ...]) -> Any:
    """``v`` with each of ``dims`` that has size 1 repeated to size 2."""
    if not isinstance(v, torch.Tensor):
        return v
    reps = [1] * v.dim()
    for d in dims:
        if d < v.dim() and v.shape[d] == 1:
            reps[d] = 2
    return v.repeat(*reps) if any(r > 1 for r in reps) else v


def _lm_shapes(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Causal LMs: batch and sequence dynamic on every tensor (the original rule)."""
    batch, seq = Dim("batch", min=1), Dim("seq", min=2)
    widened, dyn = {}, {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            widened[k], dyn[k] = _repeat_dims(v, (0, 1)), {0: batch, 1: seq}
        elif isinstance(v, torch.Tensor) and v.dim() == 1:
            widened[k], dyn[k] = _repeat_dims(v, (0,)), {0: seq}
        else:
            widened[k], dyn[k] = v, None
    return widened, dyn


def _auto_shapes(inputs: dict[str, Any], dims: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``Dim.AUTO`` on ``dims`` of every tensor leaf (dynamic where export allows it)."""

    def spec(v: Any) -> Any:
        return {d: Dim.AUTO for d in dims if d < v.dim()} or None if isinstance(v, torch.Tensor) else None

    widened = {k: tree_map(lambda v: _repeat_dims(v, dims), v) for k, v in inputs.items()}
    dyn = {k: tree_map(spec, v) if isinstance(v, (tuple, list, dict)) else spec(v) for k, v in inputs.items()}
    return widened, dyn


def _user_shapes(dynamic_shapes: Any, names: list[str]) -> Any:
    """torch.export's ``dynamic_shapes`` for the named (keyword) export: a dict keyed by
    parameter name passes through; a tuple/list follows the inputs in signature order."""
    if dynamic_shapes is None or isinstance(dynamic_shapes, Mapping):
        return dynamic_shapes
    if isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != len(names):
            raise CaptureError(
                f"dynamic_shapes has {len(dynamic_shapes)} entries but the call has {len(names)} inputs {names}; "
                "give one entry per input (or a dict keyed by parameter name)"
            )
        return dict(zip(names, dynamic_shapes, strict=True))
    raise CaptureError(
        f"dynamic_shapes must be a dict, tuple or list, as torch.export takes it; got {type(dynamic_shapes)}"
    )


def describe_dims(gm: GraphModule) -> str:
    """Which placeholder dims are dynamic, e.g. ``input_ids [batch, seq]`` / ``input [s0, 512]``."""
    parts, any_dyn = [], False
    for n in gm.graph.nodes:
        v = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(v, torch.Tensor):
            sizes = [static_size(d) for d in v.shape]
            dims = [str(d) if s is None else str(s) for d, s in zip(v.shape, sizes, strict=True)]
            any_dyn |= None in sizes
            parts.append(f"{n.target} [{', '.join(dims)}]")
    kind = "dynamic dims" if any_dyn else "static shapes (only inputs of exactly these shapes run)"
    return f"{kind}: {'; '.join(parts)}"


def _has_dynamic(gm: GraphModule) -> bool:
    return any(
        isinstance(v := n.meta.get("val"), torch.Tensor) and any(static_size(d) is None for d in v.shape)
        for n in gm.graph.nodes
        if n.op == "placeholder"
    )


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
    dynamic_shapes: Any = None,
    strict: bool = False,
    replicate_blocks: bool = True,
) -> Captured:
    """Export ``model`` at ``example_inputs``, keeping ``aten.linear`` (see the module
    docstring for the call forms and the default dynamic dims).

    ``replicate_blocks``: a deep decoder whose blocks are all alike is exported with its first
    three blocks and the third copied for the rest, where the exported blocks show that gives
    the same graph (:mod:`qqq_compile.compiler.capture_replicate`: ~7x faster on a 30-block
    model); ``False`` always exports the whole model.

    ``dynamic_shapes``: torch.export's own format, for the call as given (a dict keyed by
    ``forward`` parameter name, or a tuple with one entry per input in signature order);
    used as is, with no widening. ``dynamic=False``: static shapes. Hugging Face models
    are exported with ``use_cache=False`` and return their usual output object. The
    user's model is not modified.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_call(_default_example(model) if example_inputs is None else example_inputs)
    inputs = bind_names(model, args, kwargs)
    hf = _is_hf(model)
    tries: list[tuple[dict[str, Any], Any]] = []
    if dynamic_shapes is not None:
        tries.append((inputs, _user_shapes(dynamic_shapes, list(inputs))))
    elif not dynamic:
        tries.append((inputs, None))
    elif is_causal_lm(model) or (not hf and _integer(inputs.get("input_ids"))):
        tries.append(_lm_shapes(inputs))
    else:
        dims = (0, 1) if is_token_model(model) and _integer(inputs.get("input_ids")) else (0,)
        tries.append(_auto_shapes(inputs, dims))
        # A widened size-1 dim that export made static would then accept only size 2:
        # export again at the example's own sizes.
        tries.append((inputs, tries[0][1]))
    was_training = model.training
    # use_cache=False through the config, not a kwarg, so the captured signature holds
    # only tensors; restored afterwards so the user's model is left as it was.
    old_cache = getattr(model.config, "use_cache", None) if hf else None
    model.eval()
    try:
        if hf:
            model.config.use_cache = False
        stack = replicable_stack(model) if replicate_blocks else None
        for call, dyn in tries:
            gm, replicated = _export_model(model, call, dyn, strict, stack)
            if _has_dynamic(gm) or not _widened(call, inputs):
                break
    except Exception as e:  # noqa: BLE001 - re-raised with an explanation
        raise CaptureError(_explain(e)) from e
    finally:
        model.train(was_training)
        if hf:
            model.config.use_cache = old_cache
    out = model_output_kind(model)
    cfg = model.config.to_dict() if hf else None
    names = positional_names(model)
    return Captured(
        gm,
        list(inputs),
        out,
        cfg,
        type(model).__name__,
        positional_names=names,
        dynamic=describe_dims(gm),
        replicated=replicated,
    )


def _export_model(
    model: torch.nn.Module, call: dict[str, Any], dyn: Any, strict: bool, stack: BlockStack | None
) -> tuple[GraphModule, str]:
    """Export ``model``: its first blocks and copies of the last of them where
    :func:`~qqq_compile.compiler.capture_replicate.replicate` can show that is the same graph,
    else the whole model. Returns the graph and the report's words for how it was made."""
    if stack is not None:
        try:
            with truncated(model, stack):
                gm = export_graph(model, (), call, dyn, strict=strict)
        except Exception:  # noqa: BLE001 - the whole model's export below says what is wrong
            gm = None
        if gm is not None and replicate(gm, model, stack):
            n, k = len(stack.names), EXPORTED_BLOCKS
            return gm, f"blocks 0-{k - 1} of {n} exported, {k}-{n - 1} copied from block {k - 1}"
    return export_graph(model, (), call, dyn, strict=strict), ""


def _widened(call: dict[str, Any], inputs: dict[str, Any]) -> bool:
    return any(a is not b for a, b in zip(tree_leaves(call), tree_leaves(inputs), strict=True))


def _integer(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex()


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
