"""``fuse_norm_quant``: let an RMSNorm emit int8 + per-token scale for its W4A8 consumers."""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from qqq_compile.compiler.pipeline import CompileContext, PassResult, QQQPass, register_pass
from qqq_compile.graph import consumers, find_norm, get_attr, through_transparent
from qqq_compile.targets.w4a8 import kernels  # noqa: F401 - registers torch.ops.qqq.*

W4A8 = torch.ops.qqq.w4a8_linear.default
W4A8_Q = torch.ops.qqq.w4a8_linear_q.default
RMSNORM_QUANT = torch.ops.qqq.rmsnorm_quant.default


def _val_dtype(n: Node, default: torch.dtype) -> torch.dtype:
    val = n.meta.get("val")
    return getattr(val, "dtype", default)


@register_pass("fuse_norm_quant")
class FuseNormQuant(QQQPass):
    """Replace ``RMSNorm → w4a8_linear×k`` by ``rmsnorm_quant → w4a8_linear_q×k``.

    Each consumer used to quantize the same normalised activations again; after the
    rewrite the norm quantizes once (the smoothing scale is already folded into its
    weight) and the consumers read int8 directly. Applies only when *every* consumer
    of the norm is a lowered W4A8 linear reading it unchanged; RMSNorm and Gemma's
    ``(1 + w)`` RMSNorm are fused (the latter with a precomputed ``1 + w`` buffer);
    LayerNorm is left as is. Preconditions: ``lower`` ran. Position: after ``lower``.
    """

    name = "fuse_norm_quant"
    requires = ("lower",)
    replay_mode = "rerun"  # load() re-runs it: it needs no calibration data

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        g = gm.graph
        done: set[Node] = set()
        modified = False
        for node in list(g.nodes):
            if node.target != W4A8 or node in done:
                continue
            src = through_transparent(node.args[0])
            norm = find_norm(gm, src)
            if norm is None or norm.kind == "layernorm" or norm.input is None or norm.eps is None:
                continue
            users = consumers(norm.output)
            if not users or any(u.target != W4A8 or through_transparent(u.args[0]) is not norm.output for u in users):
                continue  # someone else reads the float output: keep the norm
            weight = norm.weight
            if norm.kind == "rmsnorm_plus_one":
                name = f"qqq_{str(norm.weight.target).replace('.', '_')}_plus_one"
                gm.register_buffer(name, (get_attr(gm, norm.weight.target).float() + 1.0).contiguous())
                with g.inserting_before(norm.output):
                    weight = g.get_attr(name)
            with g.inserting_after(norm.output):
                fused = g.call_function(RMSNORM_QUANT, (norm.input, weight, float(norm.eps)))
            with g.inserting_after(fused):
                q = g.call_function(operator.getitem, (fused, 0))
            with g.inserting_after(q):
                s = g.call_function(operator.getitem, (fused, 1))
            fused.meta["nn_module_stack"] = norm.output.meta.get("nn_module_stack", {})
            for u in users:
                _, qw, cs, gsc, bias, group_size = u.args
                with g.inserting_before(u):
                    new = g.call_function(W4A8_Q, (q, s, qw, cs, gsc, bias, group_size, _val_dtype(u, torch.float32)))
                new.meta.update(u.meta)
                u.replace_all_uses_with(new)
                g.erase_node(u)
                done.add(u)
            modified = True
        if modified:
            g.eliminate_dead_code()
        return PassResult(gm, modified)
