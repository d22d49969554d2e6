"""Interop exporters: a compiled model as files other runtimes load.

* :func:`export_compressed_tensors`: a Hugging Face folder in the compressed-tensors W4A8
  format (what llm-compressor writes and vLLM / transformers read).
* :func:`export_onnx`: an ONNX file for onnxruntime (``com.microsoft::MatMulNBits`` or
  opset-21 int4 ``DequantizeLinear``), with :func:`time_onnx` to time it.

Both read the lowered graph only: each ``torch.ops.qqq`` linear carries its packed
weight as ``get_attr`` operands, and every other tensor keeps its Hugging Face name.

The int8 lm_head and embedding of the ``int8_head`` pass (on by default,
``QuantConfig.int8_head``) are found here too (:func:`int8_linears`,
:func:`int8_embeddings`): the W8A8 head ``qqq.w8a8_linear(x, w8, scale, bias)`` and the
lookup ``embedding(w8, ids).float() * embedding(scale[:, None], ids)``. Each exporter
says how it writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import node_annotation
from qqq_compile.graph import get_attr, info, module_fqn
from qqq_compile.targets.w4a8.formats import PackedW4


class ExportError(ValueError):
    """The compiled graph cannot be expressed in the requested format; the message names
    the node or tensor at fault and the way out."""


# The qqq ops the exporters understand. Anything else in the ``qqq`` namespace (an online
# Hadamard, a fused attention kernel...) has no equivalent in the target formats.
QQQ_LINEAR_OPS = ("w4a8_linear", "w4a8_linear_q")
QQQ_INT8_OPS = ("w8a8_linear",)  # the int8_head pass's lm_head
QQQ_KNOWN_OPS = (*QQQ_LINEAR_OPS, *QQQ_INT8_OPS, "rmsnorm_quant", "quantize_act")


def qqq_op_name(node: Node) -> str | None:
    """``"w4a8_linear"`` for a node calling ``torch.ops.qqq.w4a8_linear.default``, else None."""
    if node.op != "call_function":
        return None
    ns = getattr(node.target, "namespace", None)
    if ns != "qqq":
        return None
    return node.target.name().split("::")[-1].split(".")[0]


def bound_args(node: Node) -> dict[str, Any]:
    """The node's operands by schema argument name (positional and keyword alike)."""
    schema = node.target._schema
    out = {a.name: a.default_value if a.has_default_value() else None for a in schema.arguments}
    for a, v in zip(schema.arguments, node.args, strict=False):
        out[a.name] = v
    out.update(node.kwargs)
    return out


@dataclass
class QLinear:
    """One ``torch.ops.qqq`` linear of the lowered graph, with its packed weight."""

    node: Node
    op: str  # "w4a8_linear" | "w4a8_linear_q"
    fqn: str  # Hugging Face module name, e.g. "model.layers.0.mlp.down_proj"
    packed: PackedW4
    bias: torch.Tensor | None
    bias_target: str | None


def _attr(gm: GraphModule, n: Any, what: str, at: Node) -> torch.Tensor | None:
    if n is None:
        return None
    if not isinstance(n, Node) or n.op != "get_attr":
        raise ExportError(f"{at.name}: operand {what} is not a stored tensor (got {n}); cannot export it")
    return get_attr(gm, n.target)


def qqq_linears(gm: GraphModule) -> list[QLinear]:
    """Every quantized linear of the graph, in graph order, with its weight unpacked from
    the ``get_attr`` operands (not from annotations, which a later pass may have dropped)."""
    out = []
    for node in gm.graph.nodes:
        op = qqq_op_name(node)
        if op not in QQQ_LINEAR_OPS:
            continue
        a = bound_args(node)
        qweight = _attr(gm, a["qweight"], "qweight", node)
        li = info(node)
        x = a["x"] if op == "w4a8_linear" else a["xq"]
        val = x.meta.get("val") if isinstance(x, Node) else None
        k = val.shape[-1] if val is not None else getattr(li, "in_features", None)
        if k is None:
            raise ExportError(f"{node.name}: the input size of this linear is unknown (no shape metadata)")
        packed = PackedW4(
            qweight,
            _attr(gm, a["channel_scale"], "channel_scale", node).float(),
            _attr(gm, a["group_scale"], "group_scale", node),
            int(k),
            int(a["group_size"]) if a["group_scale"] is not None else -1,
        )
        fqn = getattr(li, "fqn", None) or module_fqn(node)
        if not fqn:
            raise ExportError(
                f"{node.name}: no module name for this quantized linear (node.meta['qqq'] and "
                "nn_module_stack are both missing); the lowering pass must keep the linear's metadata"
            )
        b = a["bias"]
        out.append(QLinear(node, op, fqn, packed, _attr(gm, b, "bias", node), getattr(b, "target", None)))
    return out


@dataclass
class Int8Linear:
    """One ``torch.ops.qqq.w8a8_linear`` of the graph (the ``int8_head`` pass's lm_head):
    ``y = q8(x) @ (w8 * scale[:, None]).T + bias`` with per-token int8 ``q8(x)``."""

    node: Node
    fqn: str  # Hugging Face module name ("lm_head")
    weight_target: str  # int8 [N, K]
    scale_target: str  # float32 [N]
    bias: Node | None  # get_attr of a float bias, or None


@dataclass
class Int8Embedding:
    """One int8 embedding lookup of the ``int8_head`` pass: ``out`` (the float32 rows,
    ``embedding(w8, ids).float() * embedding(scale[:, None], ids)``) is what replaces the
    float lookup's value; ``fqn`` the embedding module's name."""

    out: Node
    ids: Node
    fqn: str
    weight_target: str  # int8 [V, K]
    scale_target: str  # float32 [V]


def int8_linears(gm: GraphModule) -> list[Int8Linear]:
    """Every W8A8 linear of the graph, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if qqq_op_name(node) not in QQQ_INT8_OPS:
            continue
        a = bound_args(node)
        w, s, b = a["w8"], a["scale"], a["bias"]
        for what, n in (("w8", w), ("scale", s), ("bias", b)):
            if n is not None and not (isinstance(n, Node) and n.op == "get_attr"):
                raise ExportError(f"{node.name}: operand {what} is not a stored tensor (got {n}); cannot export it")
        ann = node_annotation(node).int8_head or {}
        fqn = ann.get("fqn") or module_fqn(node)
        if not fqn:
            raise ExportError(f"{node.name}: no module name for this int8 linear (no annotation, no nn_module_stack)")
        out.append(Int8Linear(node, fqn, w.target, s.target, b))
    return out


def _is_attr(n: Any, dtype: torch.dtype | None = None) -> bool:
    if not (isinstance(n, Node) and n.op == "get_attr"):
        return False
    t = get_attr(n.graph.owning_module, n.target)
    return isinstance(t, torch.Tensor) and (dtype is None or t.dtype == dtype)


def int8_embeddings(gm: GraphModule) -> list[Int8Embedding]:
    """Every int8 embedding lookup of the graph (the pattern the ``int8_head`` pass writes)."""
    aten = torch.ops.aten
    out = []
    for rows in gm.graph.nodes:
        if not (
            rows.op == "call_function" and rows.target is aten.embedding.default and _is_attr(rows.args[0], torch.int8)
        ):
            continue
        ids = rows.args[1]
        for cast in rows.users:
            if cast.target is not aten._to_copy.default or cast.kwargs.get("dtype") != torch.float32:
                continue
            for mul in cast.users:
                if mul.target is not aten.mul.Tensor or len(mul.args) != 2:
                    continue
                s = mul.args[1] if mul.args[0] is cast else mul.args[0]
                ok = isinstance(s, Node) and s.target is aten.embedding.default and s.args[1] is ids
                col = s.args[0] if ok else None
                ok = (
                    ok
                    and col.target is aten.unsqueeze.default
                    and tuple(col.args[1:]) == (1,)
                    and _is_attr(col.args[0])
                )
                if not ok:
                    continue
                # the module name: on the lookup's output (the pass keeps the float lookup's meta
                # on its last node, a cast to the table's dtype when that is not float32)
                named = [mul, *mul.users]
                fqn = next((module_fqn(n) for n in named if module_fqn(n)), "")
                out.append(Int8Embedding(mul, ids, fqn, rows.args[0].target, col.args[0].target))
    return out


def dequantize_rows(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w8 * scale[:, None]`` in float32: the exact values the int8 rows stand for."""
    return w8.float() * scale.float()[:, None]


def float_int8_head(gm: GraphModule) -> tuple[GraphModule, dict[str, str]]:
    """A copy of ``gm`` (sharing its tensors) whose int8 lm_head and embeddings are float
    again: ``aten.linear`` / ``aten.embedding`` over the dequantized rows (float32, one
    tensor per int8 table, so a tied head and embedding stay one tensor). Returns the copy
    and the names of the float tensors it added, each mapped to the int8 table it dequantizes.
    The head loses only its per-token int8 activations."""
    import copy

    aten = torch.ops.aten
    heads, embeddings = int8_linears(gm), int8_embeddings(gm)
    if not heads and not embeddings:
        return gm, {}
    new = GraphModule(gm, copy.deepcopy(gm.graph))
    g = new.graph
    by_table: dict[str, str] = {}

    def table(w_target: str, s_target: str) -> str:
        if w_target not in by_table:
            base = re.sub(r"\W", "_", w_target) + "_dequantized"
            name, i = base, 1
            while hasattr(new, name):
                name, i = f"{base}_{i}", i + 1
            new.register_buffer(name, dequantize_rows(get_attr(new, w_target), get_attr(new, s_target)))
            by_table[w_target] = name
        return by_table[w_target]

    def replace(old: Node, target: Any, args: tuple[Any, ...], stack_from: Node) -> None:
        with g.inserting_before(old):
            rep = g.call_function(target, args)
        rep.meta.update({k: v for k, v in old.meta.items() if k in ("val", "stack_trace")})
        if "nn_module_stack" in stack_from.meta:
            rep.meta["nn_module_stack"] = stack_from.meta["nn_module_stack"]
        old.replace_all_uses_with(rep)
        g.erase_node(old)

    nodes = {n.name: n for n in g.nodes}
    for h in heads:
        node = nodes[h.node.name]
        with g.inserting_before(node):
            wn = g.get_attr(table(h.weight_target, h.scale_target))
        bias = nodes[h.bias.name] if h.bias is not None else None
        replace(node, aten.linear.default, (bound_args(node)["x"], wn, bias), node)
    for e in embeddings:
        out = nodes[e.out.name]
        with g.inserting_before(out):
            wn = g.get_attr(table(e.weight_target, e.scale_target))
        # the pass kept the float lookup's module stack on its last node (a cast to the
        # table's dtype when that is not float32)
        named = next((n for n in (out, *out.users) if module_fqn(n)), out)
        replace(out, aten.embedding.default, (wn, nodes[e.ids.name]), named)
    g.eliminate_dead_code()
    g.lint()
    new.recompile()
    return new, {name: w for w, name in by_table.items()}


def whole_graph(compiled: Any) -> GraphModule:
    """The lowered graph of a model compiled whole (what the exporters read)."""
    gm = getattr(compiled, "graph_module", None)
    if not isinstance(gm, GraphModule):
        raise ExportError(
            f"{type(compiled).__name__} has no whole-model graph: the exporters read the graph that "
            "qqq_compile.compile() returns when torch.export captures the whole model (a model quantized "
            "block by block through the blockwise fallback cannot be exported yet)"
        )
    return gm


def check_qqq_ops(gm: GraphModule, fmt: str) -> None:
    """Refuse graphs with ``torch.ops.qqq`` ops that ``fmt`` cannot express."""
    for node in gm.graph.nodes:
        op = qqq_op_name(node)
        if op is not None and op not in QQQ_KNOWN_OPS:
            raise ExportError(
                f"node {node.name} calls torch.ops.qqq.{op}, which {fmt} cannot express "
                f"(the exporter knows {', '.join('qqq.' + o for o in QQQ_KNOWN_OPS)}); "
                "compile without the pass that introduces it to export this model"
            )


from qqq_compile.targets.w4a8.export.compressed_tensors import export_compressed_tensors  # noqa: E402
from qqq_compile.targets.w4a8.export.onnx import export_onnx, time_onnx  # noqa: E402

__all__ = [
    "ExportError",
    "Int8Embedding",
    "Int8Linear",
    "QLinear",
    "export_compressed_tensors",
    "export_onnx",
    "float_int8_head",
    "int8_embeddings",
    "int8_linears",
    "qqq_linears",
    "time_onnx",
]
