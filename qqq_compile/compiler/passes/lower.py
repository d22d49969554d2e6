"""``lower``: rewrite every annotated linear to its target's kernel op."""

from __future__ import annotations

import dataclasses

from torch.fx import GraphModule, Node

from qqq_compile.annotations import KEY, node_annotation, set_node_annotation
from qqq_compile.compiler.pipeline import CompileContext, PassResult, QQQPass, register_pass
from qqq_compile.graph import info, linear_sites


@register_pass("lower")
class Lower(QQQPass):
    """Replace every linear site whose ``LinearInfo.packed`` is set by the op of the
    context's target (:meth:`~qqq_compile.targets.registry.Target.lower_linear`: for W4A8,
    ``torch.ops.qqq.w4a8_linear`` over the packed buffers), then drop the float weights
    nothing reads any more.

    Preconditions: a quantizing pass (``quantize_rtn`` or ``gptq``) annotated the
    linears. Position: last. Matches ``aten.linear``, ``mm``, ``addmm`` and ``matmul``
    (with transposed weights, as GPT-2's Conv1D produces).
    """

    name = "lower"
    replay_mode = "rerun"  # load() re-runs it: it needs no calibration data

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        modified = False
        replaced: dict[Node, Node] = {}  # a linear's input may be an earlier linear, rewritten here
        for site in linear_sites(gm):
            li = info(site.node)
            if li is None or li.packed is None or li.lowered:
                continue
            site = dataclasses.replace(site, x=replaced.get(site.x, site.x))
            new = ctx.target.lower_linear(gm, site, li)
            replaced[site.node] = new
            new.meta.update({k: v for k, v in site.node.meta.items() if k != KEY})
            li.lowered = True
            set_node_annotation(new, node_annotation(site.node))  # the LinearInfo and the other facts
            site.node.replace_all_uses_with(new)
            gm.graph.erase_node(site.node)
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
