"""``calibrate``: run calibration data block by block and harvest observer statistics."""

from __future__ import annotations

from torch.fx import GraphModule

from qqq_compile.compiler.block_runner import BlockRunner
from qqq_compile.compiler.observers import OBSERVER_PREFIX, ActObserver
from qqq_compile.compiler.pipeline import CompileContext, PassResult, QQQPass, register_pass
from qqq_compile.errors import CalibrationDataError
from qqq_compile.graph import info, linear_sites

__all__ = ["Calibrate", "CalibrationDataError"]


@register_pass("calibrate")
class Calibrate(QQQPass):
    """Feed ``ctx.calib`` through the graph one block at a time, then move each
    observer's statistics into the ``LinearInfo`` of the linears it watched and remove
    the observers.

    Preconditions: ``observe`` ran. Position: right after ``observe``. Raises
    :class:`CalibrationDataError` naming the first linear whose input is not finite.
    """

    name = "calibrate"
    requires = ("calib", "observe")
    replay_mode = "tensors"  # its net effect on the graph is none; the statistics are saved tensors

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        obs_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(OBSERVER_PREFIX)]
        if not obs_nodes:
            return PassResult(gm, False)
        runner = BlockRunner(gm, ctx.require_calib(self.name), progress=ctx.progress, desc="calibrate")
        for _ in runner.blocks():
            pass
        runner._advance(runner.part.suffix)
        by_obs = {}
        for site in linear_sites(gm):
            if site.x in obs_nodes:
                by_obs.setdefault(site.x, []).append(site)
        for n in obs_nodes:
            obs: ActObserver = gm.get_submodule(n.target)
            sites = by_obs.get(n, [])
            if obs.nonfinite:
                names = ", ".join(s.name for s in sites)
                raise CalibrationDataError(
                    f"the input of {names} contains NaN or Inf during calibration; check the calibration "
                    "data (and the model's dtype: fp16 overflows are common) before quantizing"
                )
            for s in sites:
                li = info(s.node)
                li.act_absmax, li.act_samples, li.hessian = obs.absmax, obs.n, obs.hessian
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            gm.delete_submodule(n.target)
        return PassResult(gm, True)
