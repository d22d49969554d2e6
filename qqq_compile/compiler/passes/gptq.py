"""``gptq``: GPTQ int4 weights (Frantar et al. 2022), block by block, as annotations.

For every decoder block (in order) the pass executes the block *node-major* over all
calibration batches (each node on every batch before the next node). When execution
reaches the first linear reading an input ``x``, every batch's ``x`` is available: the
Hessian ``H = 2/n · XᵀX`` (fp32) is accumulated, GPTQ solves all linears reading ``x``
together (same ``H``, same column order), the packed weights are recorded in
``meta["qqq"]``, and those linears run with their W4A8 behaviour (dequantized packed
weight, per-token int8 fake-quantized input) from then on. One forward per block thus
gives both the Hessians and the block's quantized outputs, which become the next
block's inputs: GPTQ's sequential recompute, including within a block ("true
sequential": ``o_proj``'s Hessian sees the quantized ``q/k/v``).

Every packed weight decodes *exactly* to the weight GPTQ fed its error back from: each
column is rounded to the nearest value the final format can represent (for the
``float16`` two-level format that grid is not uniform, so the nearest entry of a
16-value decode table is taken), never to an idealised grid that packing then changes.
With ``clip_search`` the scales are searched on that same format before the solve.

``asym`` (GPTAQ) also runs each block in float next to the quantized run (node-major
too), so every linear sees both its float-model input ``X`` and the quantized model's
``X̃``; the solve then targets ``W X`` instead of ``W X̃`` (see :mod:`qqq_compile.compiler.gptq_solve`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.compiler.block_runner import BlockRunner, Env, run_node
from qqq_compile.compiler.gptq_solve import GPTQError, GPTQResult, gptq_quantize
from qqq_compile.compiler.pipeline import (
    CompileContext,
    PassConfig,
    PassResult,
    QQQPass,
    register_pass,
    sqnr_db,
)
from qqq_compile.config import ConfigError, check_group_size
from qqq_compile.graph import LinearSite, ensure_info, get_weight, info, is_skipped, linear_sites
from qqq_compile.targets.registry import ClipSearch, check_clip

__all__ = ["GPTQ", "GPTQConfig", "GPTQError", "GPTQResult", "gptq_quantize", "quantized_override"]

aten = torch.ops.aten


# ----------------------------------------------------------------------------- the pass


def _hessian(
    xs: list[torch.Tensor],
    floats: list[torch.Tensor] | None = None,
    act_quant: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``H = 2/n · XᵀX`` (fp32) over the rows of every batch's input ``[..., K]``.

    With ``floats`` (the float model's inputs, batch by batch) also GPTAQ's
    ``D = 2/n · (X_float - X̃)ᵀ X̃``, where ``X̃ = act_quant(X)`` is the input the quantized
    linear multiplies (the target's activation quantizer), for ``H`` as well.
    """
    k = xs[0].shape[-1]
    h = torch.zeros(k, k, device=xs[0].device)
    d = None if floats is None else torch.zeros(k, k, device=xs[0].device)
    n = 0
    for i, x in enumerate(xs):
        flat = x.detach().reshape(-1, k).float()
        if d is not None:
            flat = act_quant(flat)  # rows are tokens
            d.addmm_((floats[i].detach().reshape(-1, k).float() - flat).t(), flat)
        h.addmm_(flat.t(), flat)
        n += flat.shape[0]
    scale = 2.0 / max(n, 1)
    return h.mul_(scale), None if d is None else d.mul_(scale)


def _x_index(site: LinearSite) -> int:
    return next(i for i, a in enumerate(site.node.args) if a is site.x)


def _w_arg_index(site: LinearSite) -> int:
    return 2 if site.node.target == aten.addmm.default else 1


def quantized_override(
    site: LinearSite, w_deq: torch.Tensor, act_quant: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[..., Any]:
    """Replacement for ``site.node`` computing the quantized behaviour: the input through
    the target's activation quantizer ``act_quant`` times the dequantized weight (same op,
    same argument layout)."""
    xi, wi = _x_index(site), _w_arg_index(site)
    # aten.linear takes W as [N, K]; mm/addmm/matmul take W.T.
    w_arg = w_deq if site.node.target == aten.linear.default else w_deq.t()
    target = site.node.target

    def run(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        x = args[xi]
        args[xi] = act_quant(x)
        args[wi] = w_arg.to(x.dtype)
        return target(*args, **kwargs)

    return run


@dataclass(frozen=True)
class GPTQConfig(PassConfig):
    """Options of :class:`GPTQ` (see its docstring)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    sequential: bool = True
    group_size: int | None = None
    max_batches: int | None = None
    clip_search: bool = False
    clip_grid: int = 11
    clip_min: float = 0.6
    clip_weighted: bool = True
    asym: bool = False
    asym_alpha: float = 0.25

    def __post_init__(self) -> None:
        if not self.damp >= 0:
            raise ConfigError(f"damp must be >= 0 (a fraction of mean diag(H), e.g. 0.01), got {self.damp}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        check_group_size(self.group_size, "GPTQ(group_size)", allow_none=True)
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"max_batches must be None or >= 1, got {self.max_batches}")
        check_clip(self.clip_grid, self.clip_min, "GPTQ")
        if not self.asym_alpha >= 0:
            raise ConfigError(
                f"asym_alpha must be >= 0 (GPTAQ's scale of the asymmetry term, e.g. 0.25), got {self.asym_alpha}"
            )


@register_pass("gptq")
class GPTQ(QQQPass):
    """GPTQ W4 weights for every linear inside the decoder blocks.

    * ``damp``: diagonal damping as a fraction of mean ``diag(H)``; a failing Cholesky
      is retried with 10x more (up to 4 times), noted, and recorded in
      ``LinearInfo.gptq["damp"]``.
    * ``block_size``: GPTQ's lazy-update column block.
    * ``act_order``: process columns by descending ``diag(H)``.
    * ``static_groups``: group scales from the whole weight in original column order
      (required with group formats: the two-level scales need every group up front).
    * ``sequential``: each Hessian comes from inputs computed with the linears
      quantized so far (W4A8 fake-quant), across and within blocks; False: from the
      float model.
    * ``group_size``: ``None`` → ``ctx.quant.group_size``; the group scale dtype is
      ``ctx.quant.group_scale_dtype``.
    * ``max_batches``: use only the first calibration batches.
    * ``clip_search``: choose each row's / group's scale by a search over ``clip_grid``
      shrink ratios from 1.0 down to ``clip_min`` on the exact final format (before the
      solve), minimising the rounding error weighted by ``diag(H)`` (``clip_weighted``)
      or plain. Weighted measured better on SmolLM2 (g128 perplexity 31.6 vs 34.2),
      plain on the tiny random test model (20.5 vs 20.2 dB logits SQNR).
    * ``asym``: GPTAQ's asymmetric calibration: match the float model's output
      ``W X`` (``X``: the float model's input) instead of ``W X̃``; ``asym_alpha`` scales
      the correction term (0.25 as published). Runs a float forward of every block next
      to the quantized one.

    Preconditions: captured graph, calibration data; smoothing/rotation (which change
    weights) must run before. Position: after ``smooth``/``rotate``, before
    ``quantize_rtn`` (which then only handles what GPTQ left, e.g. linears outside the
    blocks) and ``lower``. Annotation only: the float weights are untouched and the
    graph still computes in float until ``lower``; ``modified`` is False. Linears
    matching ``ctx.quant.skip`` stay float; linears already carrying a packed weight are
    left alone (and simulated with it).
    """

    name = "gptq"
    config_class = GPTQConfig
    requires = ("calib",)
    replay_mode = "tensors"  # annotation only: the packed weights are saved tensors

    def __init__(
        self,
        damp: float = 0.01,
        block_size: int = 128,
        act_order: bool = True,
        static_groups: bool = True,
        sequential: bool = True,
        group_size: int | None = None,
        max_batches: int | None = None,
        clip_search: bool = False,
        clip_grid: int = 11,
        clip_min: float = 0.6,
        clip_weighted: bool = True,
        asym: bool = False,
        asym_alpha: float = 0.25,
    ):
        super().__init__(
            GPTQConfig(
                damp,
                block_size,
                act_order,
                static_groups,
                sequential,
                group_size,
                max_batches,
                clip_search,
                clip_grid,
                clip_min,
                clip_weighted,
                asym,
                asym_alpha,
            )
        )

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        group_size = ctx.quant.group_size if self.group_size is None else self.group_size
        if group_size > 0 and not self.static_groups:
            raise ValueError(
                "GPTQ(static_groups=False) cannot produce the two-level group format: its per-channel "
                "scale needs every group's scale before the first column is quantized. "
                "Use static_groups=True (the default) or group_size=-1."
            )
        batches = ctx.require_calib(self.name)
        if self.max_batches is not None:
            batches = batches[: self.max_batches]
        sites = linear_sites(gm)
        todo: set[Node] = set()
        for site in sites:
            li = ensure_info(gm, site)
            if is_skipped(site.name, ctx.quant.skip):
                li.skipped = li.skipped or "matches QuantConfig.skip (kept in full precision)"
            elif li.packed is None:
                todo.add(site.node)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        last_use = {n: max((order[u] for u in n.users), default=-1) for n in gm.graph.nodes}
        runner = BlockRunner(gm, batches, progress=ctx.progress, desc="gptq")
        done: set[Node] = set()
        fenvs: list[Env] | None = None  # asym: the float model's values, run alongside
        for st in runner.blocks():
            if self.asym and fenvs is None:
                fenvs = [dict(env) for env in st.envs]  # nothing is quantized before block 0
            self._run_block(gm, ctx, st.block.nodes, st.envs, sites, todo, group_size, order, last_use, fenvs)
            done.update(st.block.nodes)
            # The block's outputs are already in the envs (computed node-major above, with
            # the quantized behaviour): an empty node list makes the runner's advance a
            # no-op. The overrides make a runner that re-ran the block still correct.
            st.overrides = self._overrides(ctx, sites, set(st.block.nodes))
            st.block.nodes = []
        # Linears after the last block (lm_head is skipped by default; others are not).
        suffix = runner.suffix_state()
        tail = [s for s in sites if s.node in todo and s.node in set(suffix.block.nodes)]
        if tail:
            last = max(suffix.block.nodes.index(s.node) for s in tail)
            nodes = suffix.block.nodes[: last + 1]
            self._run_block(gm, ctx, nodes, suffix.envs, tail, todo, group_size, order, last_use, fenvs)
            done.update(suffix.block.nodes)
        left = [s.name for s in sites if s.node in todo and s.node not in done]
        if left:
            ctx.note(
                self.name,
                f"{len(left)} linear(s) before the first block were not GPTQ-quantized "
                f"(left to quantize_rtn): {', '.join(left)}",
            )
        return PassResult(gm, False)

    def _overrides(
        self, ctx: CompileContext, sites: list[LinearSite], nodes: set[Node]
    ) -> dict[Node, Callable[..., Any]]:
        """Quantized behaviour of every packed linear among ``nodes`` (float otherwise)."""
        if not self.sequential:
            return {}
        return {
            s.node: quantized_override(s, info(s.node).packed.dequantize(), ctx.target.fake_quant_act)
            for s in sites
            if s.node in nodes and info(s.node).packed is not None
        }

    def _run_block(
        self,
        gm: GraphModule,
        ctx: CompileContext,
        nodes: list[Node],
        envs: list[dict[Node, Any]],
        sites: list[LinearSite],
        todo: set[Node],
        group_size: int,
        order: dict[Node, int],
        last_use: dict[Node, int],
        fenvs: list[Env] | None = None,
    ) -> None:
        """Execute ``nodes`` node-major (each node on every batch before the next node).

        When execution reaches the first linear of an input ``x``, every batch's ``x`` is
        there: the Hessian is accumulated, GPTQ solves all linears reading ``x``, and they
        run quantized from then on. So one forward per block yields both the Hessians and
        the quantized block outputs, and each Hessian sees the quantized linears before it
        in the block too (GPTQ's "true sequential"). Values are freed after their last use.
        ``fenvs`` (asym): the same nodes run in float on the float model's values.
        """
        node_set = set(nodes)
        by_x: dict[Node, list[LinearSite]] = {}
        for s in sites:
            if s.node in node_set and s.node in todo:
                by_x.setdefault(s.x, []).append(s)
        first = {group[0].node: x for x, group in by_x.items()}
        overrides = self._overrides(ctx, sites, node_set)
        for n in nodes:
            if n in first:
                group = by_x[first[n]]
                x = first[n]
                floats = None if fenvs is None else [f[x] for f in fenvs]
                h, dxx = _hessian([env[x] for env in envs], floats, ctx.target.fake_quant_act)
                self._solve(gm, ctx, group, h, dxx, group_size)
                del h, dxx  # memory stays bounded by one Hessian at a time
                todo.difference_update(s.node for s in group)
                overrides.update(self._overrides(ctx, group, {s.node for s in group}))
            with torch.no_grad():
                for env in envs:
                    env[n] = run_node(gm, n, env, overrides.get(n))
                for fenv in fenvs or ():
                    fenv[n] = run_node(gm, n, fenv)
            for a in (*n.all_input_nodes, n):
                if last_use[a] <= order[n]:
                    for env in (*envs, *(fenvs or ())):
                        env.pop(a, None)

    def _solve(
        self,
        gm: GraphModule,
        ctx: CompileContext,
        group: list[LinearSite],
        h: torch.Tensor,
        dxx: torch.Tensor | None,
        group_size: int,
    ) -> None:
        weights = [get_weight(gm, s).float() for s in group]
        w = torch.cat(weights) if len(weights) > 1 else weights[0]
        clip = ClipSearch(self.clip_grid, self.clip_min) if self.clip_search else None
        col_weight = torch.diag(h) if self.clip_weighted else None
        grid = ctx.target.grid(w, ctx.quant, group_size, clip=clip, col_weight=col_weight)
        names = ", ".join(s.name for s in group)
        try:
            res = gptq_quantize(
                w,
                h,
                grid,
                damp=self.damp,
                block_size=self.block_size,
                act_order=self.act_order,
                dxx=dxx,
                alpha=self.asym_alpha,
            )
        except GPTQError as e:
            raise GPTQError(f"{names}: {e}. Check the calibration data, or raise GPTQ(damp=...)") from e
        if res.retries:
            ctx.note(
                self.name,
                f"Cholesky of H failed {res.retries}x; used damping {res.damp:g} x mean diag(H)",
                target=names,
                level="warning",
            )
        if res.dead:
            ctx.note(self.name, f"{res.dead} input channel(s) never active: weight columns zeroed", target=names)
        row = 0
        for s, wt in zip(group, weights, strict=True):
            rows = slice(row, row + wt.shape[0])
            row += wt.shape[0]
            li = info(s.node)
            li.packed = grid.pack(res.q4[rows], rows)
            li.method = "gptq"
            li.weight_sqnr_db = sqnr_db(wt, res.deq[rows])
            li.gptq = {
                "damp": res.damp,
                "retries": res.retries,
                "loss": float(res.row_loss[rows].sum()),
                "act_order": self.act_order,
                "dead_inputs": res.dead,
            }
