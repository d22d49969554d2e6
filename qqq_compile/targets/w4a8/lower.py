"""``lower``: rewrite annotated linears to the packed W4A8 ``torch.ops.qqq`` kernels."""

from __future__ import annotations

import re

import torch
from torch.fx import GraphModule

from qqq_compile.annotations import KEY, node_annotation, set_node_annotation
from qqq_compile.compiler.pipeline import CompileContext, PassResult, QQQPass, register_pass
from qqq_compile.graph import info, linear_sites
from qqq_compile.targets.w4a8 import kernels  # noqa: F401 - registers torch.ops.qqq.*


def _buffer_name(gm: GraphModule, fqn: str, what: str) -> str:
    base = "qqq_" + re.sub(r"\W", "_", fqn) + "_" + what
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


@register_pass("lower")
class LowerW4A8(QQQPass):
    """Replace every linear site whose ``meta["qqq"].packed`` is set by
    ``torch.ops.qqq.w4a8_linear`` over packed buffers, then drop the float weights.

    Preconditions: a quantizing pass (``quantize_rtn`` or ``gptq``) annotated the
    linears. Position: last. Matches ``aten.linear``, ``mm``, ``addmm`` and ``matmul``
    (with transposed weights, as GPT-2's Conv1D produces).
    """

    name = "lower"
    replay_mode = "rerun"  # load() re-runs it: it needs no calibration data

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        g = gm.graph
        modified = False
        for site in linear_sites(gm):
            li = info(site.node)
            if li is None or li.packed is None or li.lowered:
                continue
            p = li.packed
            attrs = []
            for key, t in (
                ("qweight", p.qweight),
                ("channel_scale", p.channel_scale),
                ("group_scale", p.group_scale),
            ):
                if t is None:
                    attrs.append(None)
                    continue
                name = _buffer_name(gm, li.fqn, key)
                gm.register_buffer(name, t.contiguous())
                with g.inserting_before(site.node):
                    attrs.append(g.get_attr(name))
            with g.inserting_before(site.node):
                new = g.call_function(
                    torch.ops.qqq.w4a8_linear.default,
                    (site.x, attrs[0], attrs[1], attrs[2], site.bias, p.group_size),
                )
            new.meta.update({k: v for k, v in site.node.meta.items() if k != KEY})
            li.lowered = True
            set_node_annotation(new, node_annotation(site.node))  # the LinearInfo and the other facts
            site.node.replace_all_uses_with(new)
            g.erase_node(site.node)
            modified = True
        if modified:
            drop_unused_attrs(gm)
        return PassResult(gm, modified)


def drop_unused_attrs(gm: GraphModule) -> None:
    """Erase dead get_attr nodes and free the tensors nothing reads any more."""
    g = gm.graph
    g.eliminate_dead_code()
    used = {n.target for n in g.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used and not name.startswith("qqq_observer"):
            *path, last = name.split(".")
            mod = gm.get_submodule(".".join(path)) if path else gm
            mod._parameters.pop(last, None)
            mod._buffers.pop(last, None)
