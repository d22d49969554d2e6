"""``observe``: insert activation observers in front of every quantizable linear."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from ..graph import LinearInfo, get_weight, info, is_skipped, linear_sites
from ..pipeline import CompileContext, PassResult, QQQPass, register_pass

OBSERVER_PREFIX = "qqq_observer_"


class ActObserver(torch.nn.Module):
    """Identity module that records per-input-channel ``max |x|`` and, optionally,
    the Hessian ``H = 2/n · XᵀX`` (fp32) of the activations flowing through it."""

    def __init__(self, in_features: int, hessian: bool = False):
        super().__init__()
        self.in_features = in_features
        self.absmax = torch.zeros(in_features)
        self.n = 0
        self.hessian = torch.zeros(in_features, in_features) if hessian else None
        self.nonfinite = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(flat).all():
            self.nonfinite = True
        self.absmax = torch.maximum(self.absmax, flat.abs().amax(dim=0))
        if self.hessian is not None:
            m = flat.shape[0]
            # Running mean of 2 xᵀx, as GPTQ accumulates it.
            self.hessian.mul_(self.n / (self.n + m))
            self.hessian.addmm_(flat.t(), flat, alpha=2.0 / (self.n + m))
        self.n += flat.shape[0]
        return x


@register_pass("observe")
class InsertObservers(QQQPass):
    """Insert one :class:`ActObserver` per distinct linear input.

    Preconditions: a captured graph. Position: first, before ``calibrate``. Linears
    whose names match ``ctx.quant.skip`` get no observer and are annotated as skipped.
    Also writes a :class:`LinearInfo` into every linear node's ``meta["qqq"]``.
    """

    name = "observe"

    def __init__(self, hessian: bool = False):
        self.hessian = hessian

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        observers: dict[torch.fx.Node, torch.fx.Node] = {}
        count = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(OBSERVER_PREFIX))
        for site in linear_sites(gm):
            w = get_weight(gm, site)
            if info(site.node) is None:
                site.node.meta["qqq"] = LinearInfo(site.name, w.shape[1], w.shape[0])
            if is_skipped(site.name, ctx.quant.skip):
                info(site.node).skipped = "matches QuantConfig.skip (kept in full precision)"
                continue
            if site.x not in observers:
                name = f"{OBSERVER_PREFIX}{count}"
                count += 1
                gm.add_submodule(name, ActObserver(w.shape[1], self.hessian))
                with gm.graph.inserting_after(site.x):
                    obs = gm.graph.call_module(name, (site.x,))
                obs.meta = {k: v for k, v in site.x.meta.items() if k in ("val", "tensor_meta")}
                observers[site.x] = obs
            site.node.replace_input_with(site.x, observers[site.x])
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(observers))
