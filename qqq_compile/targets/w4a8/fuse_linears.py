"""``fuse_linears``: W4A8 linears that read the same input become one kernel call.

q/k/v read the same normed activation, and so do gate/up. The kernel quantizes its input
per token, which gives the same int8 rows and scales for every reader, and each output
channel depends only on its own packed row and scales. Concatenating the packed weights
along the output dimension and slicing the result is therefore *bit-identical* to the
separate calls, with one activation quantization and one kernel call instead of two or
three. At decode (one token) those per-call costs are a large share of a small GEMV; the
wider call is also split across threads where a narrow one ran on one.

The generation runtime applies it to the decode step it builds (``runtime.build_step``).
It is deliberately not a registered pipeline pass: artifacts and exports map each
projection node (and its ``LinearInfo``) to a checkpoint name, so the compiled model's own
graph keeps one node per projection and only the step graph is fused.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from qqq_compile.compiler.pipeline import CompileContext, PassResult, QQQPass
from qqq_compile.graph import get_attr
from qqq_compile.targets.w4a8 import kernels  # noqa: F401 - registers torch.ops.qqq.*

aten = torch.ops.aten
W4A8 = torch.ops.qqq.w4a8_linear.default
W4A8_Q = torch.ops.qqq.w4a8_linear_q.default
# Position of qweight in each op's arguments: everything before it is the activation input
# (x; or the int8 rows and scales), everything from it on is (qweight, channel_scale,
# group_scale, bias, group_size[, out_dtype]).
_WEIGHT_ARG = {W4A8: 1, W4A8_Q: 2}


def _attr(gm: GraphModule, a: object) -> torch.Tensor | None:
    return get_attr(gm, a.target) if isinstance(a, Node) and a.op == "get_attr" else None


def _key(gm: GraphModule, n: Node) -> tuple | None:
    """Nodes with equal keys can share one call; None: this node cannot be fused."""
    i = _WEIGHT_ARG[n.target]
    qw, cs, gs, bias, group_size, *rest = n.args[i:]
    tensors = [_attr(gm, a) for a in (qw, cs)]
    if any(t is None for t in tensors) or (gs is not None and _attr(gm, gs) is None):
        return None  # weights computed in the graph, not constants: leave alone
    if bias is not None and _attr(gm, bias) is None:
        return None
    gdt = None if gs is None else _attr(gm, gs).dtype
    return (n.target, tuple(n.args[:i]), group_size, gdt, bias is not None, tuple(rest), tuple(n.kwargs.items()))


class FuseLinears(QQQPass):
    """Merge lowered W4A8 linears with the same input and format into one call whose
    outputs are sliced back apart (exact; see the module docstring).

    Preconditions: ``lower`` ran (``qqq::w4a8_linear`` or ``w4a8_linear_q`` nodes with
    constant weights). Position: on the decode-step graph (after the KV-cache rewrite),
    never inside a compile pipeline (not registered; see the module docstring).
    """

    name = "fuse_linears"
    requires = ("lower",)
    replay_mode = "rerun"  # deterministic, needs no data

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm, g = graph_module, graph_module.graph
        groups: dict[tuple, list[Node]] = defaultdict(list)
        for n in g.nodes:
            if n.op == "call_function" and n.target in _WEIGHT_ARG and (k := _key(gm, n)) is not None:
                groups[k].append(n)
        fused = 0
        for nodes in groups.values():
            if len(nodes) < 2:
                continue
            self._fuse(gm, nodes, fused)
            fused += 1
        if fused:
            g.eliminate_dead_code()
            ctx.note(self.name, f"{fused} groups of W4A8 linears reading one input now share one call each")
        return PassResult(gm, bool(fused))

    @staticmethod
    def _fuse(gm: GraphModule, nodes: list[Node], index: int) -> None:
        g = gm.graph
        first = nodes[0]
        i = _WEIGHT_ARG[first.target]
        cols = list(zip(*(n.args[i : i + 4] for n in nodes), strict=True))  # qweight, cs, gs, bias
        attrs = []
        for j, what in enumerate(("qweight", "channel_scale", "group_scale", "bias")):
            if cols[j][0] is None:
                attrs.append(None)
                continue
            name = f"qqq_fused{index}_{what}"
            gm.register_buffer(name, torch.cat([_attr(gm, a) for a in cols[j]], dim=0).contiguous())
            # Which tensors it concatenates: the decode step makes them views of it (one copy).
            gm.meta.setdefault("qqq_fused_sources", {})[name] = [a.target for a in cols[j]]
            with g.inserting_before(first):
                attrs.append(g.get_attr(name))
        widths = [_attr(gm, n.args[i]).shape[0] for n in nodes]
        with g.inserting_before(first):
            call = g.call_function(first.target, (*first.args[:i], *attrs, *first.args[i + 4 :]), dict(first.kwargs))
        call.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
        start = 0
        for n, w in zip(nodes, widths, strict=True):
            with g.inserting_before(n):
                part = g.call_function(aten.slice.Tensor, (call, -1, start, start + w))
                # Contiguous again: readers may view the output in ways a slice's strides forbid.
                out = g.call_function(aten.clone.default, (part,), {"memory_format": torch.contiguous_format})
            out.meta.update({k: v for k, v in n.meta.items() if k in ("nn_module_stack", "val")})
            n.replace_all_uses_with(out)
            start += w
