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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..config import ConfigError, check_group_size
from ..formats import (
    ACT_QMAX,
    GROUP_QMAX,
    GroupScaleDtype,
    PackedW4,
    build_w8,
    choose_scales,
    fake_quant_act,
    pack_int4,
)
from ..graph import LinearSite, ensure_info, get_weight, info, is_skipped, linear_sites
from ..pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass, sqnr_db
from ..runner import BlockRunner, run_node

aten = torch.ops.aten
MAX_RETRIES = 4  # damping grows 10x per retry: 1% → 10% → 100% → 1000% → 10000% of mean diag


class GPTQError(RuntimeError):
    """GPTQ could not quantize a linear (non-finite Hessian, Cholesky never succeeded)."""


# ----------------------------------------------------------------------------- format grid


class Grid:
    """The values a packed W4 format can represent, per row and group.

    Built from static scales of the whole weight (original column order), so act-order
    never scrambles groups. ``quantize(col, g)`` returns the int4 codes and their exact
    decoded values (bit-identical to ``PackedW4.dequantize``).
    """

    def __init__(self, w: torch.Tensor, group_size: int, dtype: GroupScaleDtype):
        n, k = w.shape
        self.k, self.group_size, self.dtype = k, group_size, dtype
        scales = choose_scales(w, group_size, dtype)
        self.qmin, self.qmax = scales.qmin, scales.qmax
        self.step = scales.step  # [N, G]
        if group_size <= 0 or dtype == "int8":
            # Scales of these formats do not depend on the codes: read them off a packing.
            ref = PackedW4.from_int4(torch.zeros(n, k, dtype=torch.int8), scales, dtype)
            self.s_ch, self.gs = ref.channel_scale, ref.group_scale
        else:
            # QQQ's fp16 two-level format: one int8 quantizer per row over the group-
            # dequantized weight. Fixed up front (±7 steps of the widest group map to
            # ±127) so that every code's decoded value is known while GPTQ runs.
            self.s_ch = (scales.step.amax(dim=1) * GROUP_QMAX / ACT_QMAX).float().clamp_min(1e-12)
            self.gs = (scales.step / self.s_ch[:, None]).to(torch.float16)
        self.table: torch.Tensor | None = None
        if self.gs is not None and dtype == "float16":
            codes = torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)
            w8 = torch.round(codes[None, None, :] * self.gs.float().t()[:, :, None])
            # Codes whose q4 * gs would need clamping to ±127 (q4 = -8 in the widest groups)
            # are never chosen: clamping only duplicates -7's value, and a kernel that got
            # the clamp wrong would then still decode every weight right.
            self.table = torch.where(w8.abs() <= ACT_QMAX, self.s_ch[None, :, None] * w8, math.inf)  # [G, N, 16]

    def col_group(self) -> torch.Tensor:
        idx = torch.arange(self.k)
        return idx // self.group_size if self.group_size > 0 else torch.zeros_like(idx)

    def quantize(self, col: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (float, integral) and decoded values of one column ``[N]`` in group ``g``."""
        if self.table is not None:
            t = self.table[g]
            idx = (col[:, None] - t).abs().argmin(dim=1, keepdim=True)
            return (idx[:, 0] + self.qmin).float(), t.gather(1, idx)[:, 0]
        q = torch.clamp(torch.round(col / self.step[:, g]), self.qmin, self.qmax)
        w8 = build_w8(q, None if self.gs is None else self.gs[:, g])  # exact small integers
        return q, self.s_ch * w8

    def pack(self, q4: torch.Tensor, rows: slice = slice(None)) -> PackedW4:
        gs = None if self.gs is None else self.gs[rows].contiguous()
        return PackedW4(pack_int4(q4), self.s_ch[rows].contiguous(), gs, self.k, self.group_size)


# ----------------------------------------------------------------------------- GPTQ core


@dataclass
class GPTQResult:
    q4: torch.Tensor  # int8 [N, K], original column order
    deq: torch.Tensor  # float32 [N, K]: exactly what the packed weight decodes to
    row_loss: torch.Tensor  # [N] GPTQ's loss sum (w - q)^2 / (2 [H^-1]_ii^2) per row
    damp: float  # relative damping that worked (fraction of mean diag(H))
    retries: int
    dead: int  # input channels with H_ii = 0 (weights zeroed)


def _upper_inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of ``(H + λI)^-1``, raising λ 10x per failure."""
    mean_diag = torch.diag(h).mean().item()
    for attempt in range(retries + 1):
        rel = damp * 10**attempt
        hd = h.clone()
        hd.diagonal().add_(rel * mean_diag)
        lower, err = torch.linalg.cholesky_ex(hd)
        if int(err) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, err = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(err) == 0 and torch.isfinite(upper).all():
                return upper, rel, attempt
    raise GPTQError(f"Cholesky failed even with damping {rel:g} x mean diag(H)")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    max_retries: int = MAX_RETRIES,
) -> GPTQResult:
    """Quantize ``w`` ``[N, K]`` against Hessian ``h`` ``[K, K]`` onto ``grid``.

    ``w`` and ``h`` are not modified. Dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a
    zero weight column, as in the reference implementation.
    """
    if not torch.isfinite(h).all():
        raise GPTQError("the Hessian contains NaN/Inf (non-finite calibration activations)")
    threads = torch.get_num_threads()
    # The column loop runs thousands of small ops: with more than one thread their
    # synchronisation costs far more than the arithmetic (100x on a busy 2-core box).
    torch.set_num_threads(1)
    try:
        return _gptq(w, h, grid, damp, block_size, act_order, max_retries)
    finally:
        torch.set_num_threads(threads)


def _gptq(
    w: torch.Tensor, h: torch.Tensor, grid: Grid, damp: float, block_size: int, act_order: bool, max_retries: int
) -> GPTQResult:
    w = w.float().clone()
    h = h.float().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k)
    w = w[:, perm].contiguous()
    h = h[perm][:, perm]
    groups = grid.col_group()[perm].tolist()
    hinv, used, retries = _upper_inverse_cholesky(h, damp, max_retries)
    del h
    q_out = torch.empty(n, k)
    deq = torch.empty(n, k)
    row_loss = torch.zeros(n)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2]  # a view: updates land in w
        hinv1 = hinv[i1:i2, i1:i2]
        err1 = torch.empty(n, i2 - i1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q, dq = grid.quantize(col, groups[i1 + i])
            q_out[:, i1 + i] = q
            deq[:, i1 + i] = dq
            e = (col - dq) / hinv1[i, i]
            # Spread this column's error over the block's later columns.
            w1[:, i + 1 :].addr_(e, hinv1[i, i + 1 :], alpha=-1.0)
            err1[:, i] = e
        row_loss += err1.pow(2).sum(dim=1) / 2
        # ... and, lazily (GPTQ's batched update), over all columns after the block.
        if i2 < k:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return GPTQResult(
        q_out[:, inv].to(torch.int8).contiguous(),
        deq[:, inv].contiguous(),
        row_loss,
        used,
        retries,
        int(dead.sum()),
    )


# ----------------------------------------------------------------------------- the pass


def _hessian(xs: list[torch.Tensor]) -> torch.Tensor:
    """``H = 2/n · XᵀX`` (fp32) over the rows of every batch's input ``[..., K]``."""
    k = xs[0].shape[-1]
    h = torch.zeros(k, k)
    n = 0
    for x in xs:
        flat = x.detach().reshape(-1, k).float()
        h.addmm_(flat.t(), flat)
        n += flat.shape[0]
    return h.mul_(2.0 / max(n, 1))


def _x_index(site: LinearSite) -> int:
    return next(i for i, a in enumerate(site.node.args) if a is site.x)


def _w_arg_index(site: LinearSite) -> int:
    return 2 if site.node.target == aten.addmm.default else 1


def quantized_override(site: LinearSite, w_deq: torch.Tensor) -> Callable[..., Any]:
    """Replacement for ``site.node`` computing the W4A8 behaviour: fake-quantized
    per-token int8 input times the dequantized weight (same op, same argument layout)."""
    xi, wi = _x_index(site), _w_arg_index(site)
    # aten.linear takes W as [N, K]; mm/addmm/matmul take W.T.
    w_arg = w_deq if site.node.target == aten.linear.default else w_deq.t()
    target = site.node.target

    def run(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        x = args[xi]
        args[xi] = fake_quant_act(x)
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

    def __post_init__(self) -> None:
        if not self.damp >= 0:
            raise ConfigError(f"damp must be >= 0 (a fraction of mean diag(H), e.g. 0.01), got {self.damp}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        check_group_size(self.group_size, "GPTQ(group_size)", allow_none=True)
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"max_batches must be None or >= 1, got {self.max_batches}")


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
    ):
        super().__init__(GPTQConfig(damp, block_size, act_order, static_groups, sequential, group_size, max_batches))

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        group_size = ctx.quant.group_size if self.group_size is None else self.group_size
        if group_size > 0 and not self.static_groups:
            raise ValueError(
                "GPTQ(static_groups=False) cannot produce the two-level group format: its per-channel "
                "scale needs every group's scale before the first column is quantized. "
                "Use static_groups=True (the default) or group_size=-1."
            )
        fmt = (group_size, ctx.quant.group_scale_dtype)
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
        for st in runner.blocks():
            self._run_block(gm, ctx, st.block.nodes, st.envs, sites, todo, fmt, order, last_use)
            done.update(st.block.nodes)
            # The block's outputs are already in the envs (computed node-major above, with
            # the quantized behaviour): an empty node list makes the runner's advance a
            # no-op. The overrides make a runner that re-ran the block still correct.
            st.overrides = self._overrides(sites, set(st.block.nodes))
            st.block.nodes = []
        # Linears after the last block (lm_head is skipped by default; others are not).
        suffix = runner.suffix_state()
        tail = [s for s in sites if s.node in todo and s.node in set(suffix.block.nodes)]
        if tail:
            last = max(suffix.block.nodes.index(s.node) for s in tail)
            self._run_block(gm, ctx, suffix.block.nodes[: last + 1], suffix.envs, tail, todo, fmt, order, last_use)
            done.update(suffix.block.nodes)
        left = [s.name for s in sites if s.node in todo and s.node not in done]
        if left:
            ctx.note(
                self.name,
                f"{len(left)} linear(s) before the first block were not GPTQ-quantized "
                f"(left to quantize_rtn): {', '.join(left)}",
            )
        return PassResult(gm, False)

    def _overrides(self, sites: list[LinearSite], nodes: set[Node]) -> dict[Node, Callable[..., Any]]:
        """W4A8 behaviour of every packed linear among ``nodes`` (float otherwise)."""
        if not self.sequential:
            return {}
        return {
            s.node: quantized_override(s, info(s.node).packed.dequantize())
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
        fmt: tuple[int, GroupScaleDtype],
        order: dict[Node, int],
        last_use: dict[Node, int],
    ) -> None:
        """Execute ``nodes`` node-major (each node on every batch before the next node).

        When execution reaches the first linear of an input ``x``, every batch's ``x`` is
        there: the Hessian is accumulated, GPTQ solves all linears reading ``x``, and they
        run quantized from then on. So one forward per block yields both the Hessians and
        the quantized block outputs, and each Hessian sees the quantized linears before it
        in the block too (GPTQ's "true sequential"). Values are freed after their last use.
        """
        node_set = set(nodes)
        by_x: dict[Node, list[LinearSite]] = {}
        for s in sites:
            if s.node in node_set and s.node in todo:
                by_x.setdefault(s.x, []).append(s)
        first = {group[0].node: x for x, group in by_x.items()}
        overrides = self._overrides(sites, node_set)
        for n in nodes:
            if n in first:
                group = by_x[first[n]]
                h = _hessian([env[first[n]] for env in envs])
                self._solve(gm, ctx, group, h, *fmt)
                del h  # memory stays bounded by one Hessian at a time
                todo.difference_update(s.node for s in group)
                overrides.update(self._overrides(group, {s.node for s in group}))
            with torch.no_grad():
                for env in envs:
                    env[n] = run_node(gm, n, env, overrides.get(n))
            for a in (*n.all_input_nodes, n):
                if last_use[a] <= order[n]:
                    for env in envs:
                        env.pop(a, None)

    def _solve(
        self,
        gm: GraphModule,
        ctx: CompileContext,
        group: list[LinearSite],
        h: torch.Tensor,
        group_size: int,
        dtype: GroupScaleDtype,
    ) -> None:
        weights = [get_weight(gm, s).float() for s in group]
        w = torch.cat(weights) if len(weights) > 1 else weights[0]
        grid = Grid(w, group_size, dtype)
        names = ", ".join(s.name for s in group)
        try:
            res = gptq_quantize(w, h, grid, damp=self.damp, block_size=self.block_size, act_order=self.act_order)
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
