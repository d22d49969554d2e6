"""Interop exporters: a compiled model as files other runtimes load.

* :func:`export_compressed_tensors`: a Hugging Face folder in the compressed-tensors W4A8
  format (what llm-compressor writes and vLLM / transformers read).
* :func:`export_onnx`: an ONNX file for onnxruntime (``com.microsoft::MatMulNBits`` or
  opset-21 int4 ``DequantizeLinear``), with :func:`time_onnx` to time it.

Both read the lowered graph only: each ``torch.ops.qqq`` linear carries its packed
weight as ``get_attr`` operands, and every other tensor keeps its Hugging Face name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..formats import PackedW4
from ..graph import get_attr, info, module_fqn


class ExportError(ValueError):
    """The compiled graph cannot be expressed in the requested format; the message names
    the node or tensor at fault and the way out."""


# The qqq ops the exporters understand. Anything else in the ``qqq`` namespace (an online
# Hadamard, a fused attention kernel...) has no equivalent in the target formats.
QQQ_LINEAR_OPS = ("w4a8_linear", "w4a8_linear_q")
QQQ_KNOWN_OPS = (*QQQ_LINEAR_OPS, "rmsnorm_quant", "quantize_act")


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


from .compressed_tensors import export_compressed_tensors  # noqa: E402
from .onnx import export_onnx, time_onnx  # noqa: E402

__all__ = [
    "ExportError",
    "QLinear",
    "export_compressed_tensors",
    "export_onnx",
    "qqq_linears",
    "time_onnx",
]
