"""``observe``: insert activation observers in front of every quantizable linear."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from qqq_compile.annotations import annotate
from qqq_compile.compiler.observers import OBSERVER_PREFIX, ActObserver
from qqq_compile.compiler.pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass
from qqq_compile.graph import LinearInfo, get_weight, info, is_skipped, linear_sites

__all__ = ["OBSERVER_PREFIX", "ActObserver", "InsertObservers", "ObserveConfig"]


@dataclass(frozen=True)
class ObserveConfig(PassConfig):
    """``hessian``: also accumulate each input's Hessian ``2/n · XᵀX`` (fp32, ``[K, K]``)."""

    hessian: bool = False


@register_pass("observe")
class InsertObservers(QQQPass):
    """Insert one :class:`ActObserver` per distinct linear input.

    Preconditions: a captured graph. Position: first, before ``calibrate``. Linears
    whose names match ``ctx.quant.skip`` get no observer and are annotated as skipped.
    Also writes a :class:`LinearInfo` into every linear node's annotation (``meta["qqq"]``).
    """

    name = "observe"
    config_class = ObserveConfig
    replay_mode = "tensors"  # calibrate removes the observers again; ranges come from the tensors

    def __init__(self, hessian: bool = False):
        super().__init__(ObserveConfig(hessian))

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        observers: dict[torch.fx.Node, torch.fx.Node] = {}
        count = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(OBSERVER_PREFIX))
        for site in linear_sites(gm):
            w = get_weight(gm, site)
            if info(site.node) is None:
                annotate(site.node, linear=LinearInfo(site.name, w.shape[1], w.shape[0]))
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
        return PassResult(gm, bool(observers))
