"""W4A8 lowering: one annotated linear becomes ``torch.ops.qqq.w4a8_linear`` over packed buffers."""

from __future__ import annotations

import re

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import LinearInfo
from qqq_compile.targets.w4a8 import kernels  # noqa: F401 - registers torch.ops.qqq.*


def buffer_name(gm: GraphModule, fqn: str, what: str) -> str:
    """A free attribute name for a tensor of linear ``fqn`` (``qqq_<fqn>_<what>``)."""
    base = "qqq_" + re.sub(r"\W", "_", fqn) + "_" + what
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def lower_linear(gm: GraphModule, site, li: LinearInfo) -> Node:  # noqa: ANN001 - a graph.LinearSite
    """Register ``li.packed``'s tensors as buffers and insert the ``w4a8_linear`` call
    before ``site.node``; returns the new node."""
    p = li.packed
    g = gm.graph
    attrs = []
    for key, t in (("qweight", p.qweight), ("channel_scale", p.channel_scale), ("group_scale", p.group_scale)):
        if t is None:
            attrs.append(None)
            continue
        name = buffer_name(gm, li.fqn, key)
        gm.register_buffer(name, t.contiguous())
        with g.inserting_before(site.node):
            attrs.append(g.get_attr(name))
    with g.inserting_before(site.node):
        return g.call_function(
            torch.ops.qqq.w4a8_linear.default, (site.x, attrs[0], attrs[1], attrs[2], site.bias, p.group_size)
        )
