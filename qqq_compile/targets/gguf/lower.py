"""GGUF lowering: one annotated linear becomes ``torch.ops.qqq.q4_0_linear`` (or
``q8_0_linear`` for a Q8_0 weight) over its block tensors, registered as buffers."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from qqq_compile.annotations import LinearInfo
from qqq_compile.errors import ConfigError
from qqq_compile.targets.gguf.formats import PackedQ4_0, PackedQ8_0
from qqq_compile.targets.gguf.ops import Q4_0_LINEAR, Q8_0_LINEAR
from qqq_compile.targets.w4a8.lower import buffer_name

_OPS = {PackedQ4_0: Q4_0_LINEAR, PackedQ8_0: Q8_0_LINEAR}


def lower_linear(gm: GraphModule, site, li: LinearInfo) -> Node:  # noqa: ANN001 - a graph.LinearSite
    """Register ``li.packed``'s ``qs`` and ``d`` as buffers and insert the block-format linear
    before ``site.node``; returns the new node."""
    p = li.packed
    op = _OPS.get(type(p))
    if op is None:
        raise ConfigError(
            f"{li.fqn}: a '{getattr(p, 'format', type(p).__name__)}' weight cannot be lowered for target 'gguf' "
            f"(it lowers {', '.join(c.format for c in _OPS)}); quantize the model with --target gguf"
        )
    g = gm.graph
    attrs = []
    for key in ("qs", "d"):
        name = buffer_name(gm, li.fqn, key)
        gm.register_buffer(name, getattr(p, key).contiguous())
        with g.inserting_before(site.node):
            attrs.append(g.get_attr(name))
    with g.inserting_before(site.node):
        return g.call_function(op, (site.x, attrs[0], attrs[1], site.bias))


__all__ = ["lower_linear"]
