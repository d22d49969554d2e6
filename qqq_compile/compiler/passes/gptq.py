"""``gptq``: GPTQ int4 weights (Frantar et al. 2022), block by block, as annotations.

For every decoder block (in order) the pass runs the block over all calibration batches,
cut into *segments* at the first linear of every input ``x`` (q/k/v share one input, so
four segments per LLaMA block). Within a segment the batches run one after the other
(batch-major: a batch's intermediates die before the next batch starts, so memory holds
one batch's intermediates, not every batch's), and each batch's ``x`` is added to the
Hessian ``H = 2/n · XᵀX`` (:class:`~qqq_compile.compiler.gptq_solve.HessianAccumulator`,
bf16 GEMMs with fp32 sums by default) as soon as the segment has produced it. At the cut
every batch has been seen: GPTQ solves all linears reading ``x`` together (same ``H``,
same column order), the packed weights are recorded in ``meta["qqq"]``, and those linears
run from then on as the deployed model runs them: the target's ``calib_linear`` (W4A8:
``torch.ops.qqq.w4a8_linear`` on the packed weight, per-token int8 input, exact int32
accumulation). ``x`` itself is kept between the cut and its linears as the target's
``QuantizedInput`` (W4A8: int8 codes and scales) when nothing else reads it.
One forward per block thus gives both the Hessians and the block's quantized outputs,
which become the next block's inputs: GPTQ's sequential recompute, including
within a block ("true sequential": ``o_proj``'s Hessian sees the quantized ``q/k/v``).

Every packed weight decodes *exactly* to the weight GPTQ fed its error back from: each
column is rounded to the nearest value the final format can represent (for the
``float16`` two-level format that grid is not uniform, so the nearest entry of a
16-value decode table is taken), never to an idealised grid that packing then changes.
With ``clip_search`` the scales are searched on that same format before the solve.

``asym`` (GPTAQ) also runs each block in float next to the quantized run (batch by batch,
node by node; a node whose inputs are the same objects in both runs and that is not a
quantized linear is computed once), so every linear sees both its float-model input
``X`` and the quantized model's ``X̃``; the solve then targets ``W X`` instead of ``W X̃``
(see :mod:`qqq_compile.compiler.gptq_solve`). The float run takes every n-th batch, as many
as ``asym_tokens`` asks for; the other batches add to ``H`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.compiler.block_runner import BlockRunner, BlockState, Env, Override, run_node
from qqq_compile.compiler.calibration import batch_tokens
from qqq_compile.compiler.gptq_forward import (
    FLOAT_RUN_BUDGET,
    bf16_override,
    float_run_bytes,
    silu_mul_overrides,
    stash_float_run,
)
from qqq_compile.compiler.gptq_solve import (
    HESSIAN_DTYPES,
    ChunkPool,
    GPTQError,
    GPTQResult,
    HessianAccumulator,
    PermutedD,
    gptq_quantize,
)
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

__all__ = ["GPTQ", "GPTQConfig", "GPTQError", "GPTQResult", "gptq_quantize"]

# ----------------------------------------------------------------------------- the pass


@dataclass
class _Call:
    """The state of one :meth:`GPTQ.call`: the graph, the format, the linears still to
    quantize, node order and last uses, GPTAQ's float run (``fenvs``) and the staging buffers
    its Hessians hand on from block to block (``pool``)."""

    gm: GraphModule
    ctx: CompileContext
    group_size: int
    todo: set[Node]
    order: dict[Node, int]
    last_use: dict[Node, int]
    fenvs: list[Env | None] | None = None
    pool: ChunkPool = field(default_factory=ChunkPool)


@dataclass
class _Cut:
    """The end of a segment: the input ``x`` whose linears are solved there (None for a
    block's last segment), its Hessian, and how ``x`` is held after it."""

    x: Node | None = None
    acc: _LazyAccumulator | None = None
    compact: bool = False  # quantized run: int8 codes and scales
    fcompact: bool = False  # float run: bf16


class _LazyAccumulator:
    """A :class:`HessianAccumulator` made at the first batch (when ``K`` is known)."""

    def __init__(self, asym: bool, dtype: str, act_order: bool, pool: ChunkPool):
        self.asym, self.dtype, self.pool = asym, dtype, pool
        # GPTAQ's D is then summed in the solve's column order, only where the solve reads it.
        self.solve_order = "act" if act_order else "natural"
        self.acc: HessianAccumulator | None = None

    def add(self, x: torch.Tensor | None = None, x_float: torch.Tensor | None = None, **codes: torch.Tensor) -> None:
        if self.acc is None:
            k = (x if x is not None else codes["q"]).shape[-1]
            self.acc = HessianAccumulator(
                k, asym=self.asym, dtype=self.dtype, solve_order=self.solve_order, pool=self.pool
            )
        self.acc.add(x, x_float, **codes)

    def result(self) -> tuple[torch.Tensor, torch.Tensor | PermutedD | None]:
        if self.acc is None:
            raise GPTQError("no calibration batch reached this linear")
        return self.acc.result()


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
    hessian_dtype: str = "bfloat16"
    asym_dtype: str = "bfloat16"
    asym_tokens: int | None = 32768

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
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise ConfigError(
                f"hessian_dtype must be one of {HESSIAN_DTYPES} (bf16 GEMMs with fp32 sums, or all fp32), "
                f"got {self.hessian_dtype!r}"
            )
        if self.asym_tokens is not None and not (isinstance(self.asym_tokens, int) and self.asym_tokens >= 1):
            raise ConfigError(
                f"asym_tokens must be None (GPTAQ's float run on every batch) or an integer >= 1 "
                f"(the calibration tokens it needs at least, e.g. 32768), got {self.asym_tokens!r}"
            )
        if self.asym_dtype not in HESSIAN_DTYPES:
            raise ConfigError(
                f"asym_dtype must be one of {HESSIAN_DTYPES} (GPTAQ's float run with bf16 or fp32 linears), "
                f"got {self.asym_dtype!r}"
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
      quantized so far (as the target runs them), across and within blocks; False: from the
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
    * ``hessian_dtype``: ``"bfloat16"`` (default) computes ``XᵀX`` and GPTAQ's term with
      bf16 GEMMs summed in fp32 (2-4x faster; effect on the solve measured in
      ``tests/compiler/passes/test_gptq_fast.py``); ``"float32"``: all in fp32. The
      Cholesky and the column solve are fp32 either way.
    * ``asym_dtype``: the linears of GPTAQ's float run as ``"bfloat16"`` GEMMs (default;
      every other op of that run stays fp32) or ``"float32"``. Its rounding (2⁻⁹) is far
      below the difference ``X - X̃`` it measures (effect in ``test_gptq_fast.py``).
    * ``asym_tokens``: GPTAQ's float run, and its term ``D``, on every n-th calibration
      batch, ``n = calibration tokens // asym_tokens`` (at least 1), so ``D`` still comes
      from at least ``asym_tokens`` tokens; ``H`` always sees every batch. The float run and
      ``D`` were ~40% of a SmolLM2 block's time; at 128 windows of 512 tokens (n = 2) the
      default preset's perplexity did not get worse (docs/RESULTS.md, round 10). None: every
      batch. A batch's tokens: :func:`~qqq_compile.compiler.calibration.batch_tokens`.

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
        hessian_dtype: str = "bfloat16",
        asym_dtype: str = "bfloat16",
        asym_tokens: int | None = 32768,
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
                hessian_dtype,
                asym_dtype,
                asym_tokens,
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
        # A value only the output node reads (the logits) is not kept in the envs.
        last_use = {n: max((order[u] for u in n.users if u.op != "output"), default=-1) for n in gm.graph.nodes}
        c = _Call(gm, ctx, group_size, todo, order, last_use)
        runner = BlockRunner(gm, batches, progress=ctx.progress, desc="gptq")
        done: set[Node] = set()
        for st in runner.blocks():
            if self.asym and c.fenvs is None:
                # Nothing is quantized before block 0; batches without a float run add to H only.
                every = self._asym_every(batches)
                c.fenvs = [dict(env) if i % every == 0 else None for i, env in enumerate(st.envs)]
            self._run_block(c, st.block.nodes, st.envs, sites, st)
            done.update(st.block.nodes)
            # The block's outputs are already in the envs (computed above, with the
            # quantized behaviour): an empty node list makes the runner's advance a
            # no-op. The overrides make a runner that re-ran the block still correct.
            st.overrides = self._overrides(ctx, sites, set(st.block.nodes))
            st.block.nodes = []
        # Linears after the last block (lm_head is skipped by default; others are not).
        suffix = runner.suffix_state()
        tail = [s for s in sites if s.node in todo and s.node in set(suffix.block.nodes)]
        if tail:
            last = max(suffix.block.nodes.index(s.node) for s in tail)
            nodes = suffix.block.nodes[: last + 1]
            self._run_block(c, nodes, suffix.envs, tail)
            done.update(suffix.block.nodes)
        left = [s.name for s in sites if s.node in todo and s.node not in done]
        if left:
            ctx.note(
                self.name,
                f"{len(left)} linear(s) before the first block were not GPTQ-quantized "
                f"(left to quantize_rtn): {', '.join(left)}",
            )
        return PassResult(gm, False)

    def _asym_every(self, batches: list[dict[str, torch.Tensor]]) -> int:
        """GPTAQ's float run takes every n-th batch: as many as ``asym_tokens`` needs."""
        if self.asym_tokens is None:
            return 1
        return max(1, sum(batch_tokens(b) for b in batches) // self.asym_tokens)

    def _overrides(
        self, ctx: CompileContext, sites: list[LinearSite], nodes: set[Node]
    ) -> dict[Node, Callable[..., Any]]:
        """The deployed behaviour (the target's ``calib_linear``) of every packed linear among
        ``nodes`` (float otherwise)."""
        if not self.sequential:
            return {}
        return {
            s.node: ctx.target.calib_linear(s, info(s.node).packed)
            for s in sites
            if s.node in nodes and info(s.node).packed is not None
        }

    def _run_block(
        self, c: _Call, nodes: list[Node], envs: list[Env], sites: list[LinearSite], state: BlockState | None = None
    ) -> None:
        """Execute ``nodes`` segment by segment, solving each input's linears at its cut.

        The cuts are the first linear of every input ``x`` still to quantize. Each segment
        runs batch after batch; at its end every batch's ``x`` has gone into the Hessian,
        GPTQ solves that input's linears, and they run quantized from then on (GPTQ's
        "true sequential"). Values are freed after their last use. With GPTAQ
        (``c.fenvs``) the same nodes also run in float on the float model's values.
        """
        node_set = set(nodes)
        by_x: dict[Node, list[LinearSite]] = {}
        for s in sites:
            if s.node in node_set and s.node in c.todo:
                by_x.setdefault(s.x, []).append(s)
        first = {group[0].node: x for x, group in by_x.items()}
        overrides = self._overrides(c.ctx, sites, node_set)
        foverrides = {}
        if c.fenvs is not None and self.asym_dtype == "bfloat16":
            foverrides = {s.node: bf16_override(c.gm, s) for s in sites if s.node in node_set}
        # Fused and target kernels for other nodes (the gated MLP's silu·up; W4A8: attention,
        # the online Hadamard), in both runs alike.
        ops = {**silu_mul_overrides(nodes), **c.ctx.target.calib_ops(c.gm, nodes)}
        stash = c.fenvs is not None and float_run_bytes(c.fenvs, envs) > FLOAT_RUN_BUDGET
        start = 0
        for end in [i for i, n in enumerate(nodes) if n in first] + [len(nodes)]:
            cut = _Cut()
            if end < len(nodes):
                cut.x = first[nodes[end]]
                group = by_x[cut.x]
                cut.acc = _LazyAccumulator(c.fenvs is not None, self.hessian_dtype, self.act_order, c.pool)
                # x is held as int8 codes (quantized run) or in bf16 (the float run's bf16
                # linears) between the cut and its linears when only they read it.
                cut.compact = self.sequential and set(cut.x.users) <= {s.node for s in group}
                cut.fcompact = bool(foverrides) and set(cut.x.users) <= set(foverrides)
            self._run_segment(c, nodes[start:end], envs, (overrides, foverrides, ops), cut, stash)
            if cut.x is not None:
                if state is not None:
                    state.status(", ".join(s.name.rsplit(".", 1)[-1] for s in group))
                h, dxx = cut.acc.result()
                self._solve(c.gm, c.ctx, group, h, dxx, c.group_size)
                del h, dxx  # memory stays bounded by one Hessian at a time
                c.todo.difference_update(s.node for s in group)
                overrides.update(self._overrides(c.ctx, group, {s.node for s in group}))
            start = end

    def _run_segment(
        self,
        c: _Call,
        seg: list[Node],
        envs: list[Env],
        runs: tuple[dict[Node, Override], dict[Node, Override], dict[Node, Override]],
        cut: _Cut,
        stash: bool,
    ) -> None:
        """Run ``seg`` on every batch in turn (the quantized run with its overrides, and
        GPTAQ's float run with its own; ``ops``: what both runs use, the fused gated MLP and the
        target's kernels), then
        add the batch's ``cut.x`` to the Hessian. ``stash``: the float run's values wait for
        the next segment in bf16."""
        overrides, foverrides, ops = runs
        with torch.no_grad():
            for i, env in enumerate(envs):
                fenv = None if c.fenvs is None else c.fenvs[i]
                if fenv is not None:
                    stash_float_run(fenv, env, False)
                for n in seg:
                    if n.op == "get_attr":
                        continue
                    env[n] = run_node(c.gm, n, env, overrides.get(n) or ops.get(n))
                    if fenv is not None:
                        if n not in overrides and all(
                            a.op == "get_attr" or fenv[a] is env[a] for a in n.all_input_nodes
                        ):
                            fenv[n] = env[n]  # the same inputs: the same value
                        else:
                            fenv[n] = run_node(c.gm, n, fenv, foverrides.get(n) or ops.get(n))
                    for a in (*n.all_input_nodes, n):
                        if c.last_use[a] <= c.order[n]:
                            env.pop(a, None)
                            if fenv is not None:
                                fenv.pop(a, None)
                if cut.x is not None:
                    self._at_cut(c.ctx, cut, env, fenv)
                if stash and fenv is not None:
                    stash_float_run(fenv, env, True)

    def _at_cut(self, ctx: CompileContext, cut: _Cut, env: Env, fenv: Env | None) -> None:
        """One batch reached the cut: its ``x`` goes into the Hessian, then is held compact
        (when the target has a compact form of its kernels' input)."""
        x = cut.x
        xv = env[x]
        asym = cut.acc.asym
        xq = ctx.target.quantize_input(xv) if (cut.compact or asym) else None
        if asym:  # GPTAQ: H of the quantized input X̃, D against the float one (where it ran)
            xf = None if fenv is None else fenv[x]
            if xq is not None:
                cut.acc.add(x_float=xf, q=xq.q, scale=xq.scale)
            else:
                cut.acc.add(ctx.target.fake_quant_act(xv), x_float=xf)
        else:  # plain GPTQ: H of the raw input
            cut.acc.add(xv)
        if cut.compact and xq is not None:
            env[x] = xq
        if cut.fcompact and fenv is not None:
            fenv[x] = fenv[x].to(torch.bfloat16)

    def _solve(
        self,
        gm: GraphModule,
        ctx: CompileContext,
        group: list[LinearSite],
        h: torch.Tensor,
        dxx: torch.Tensor | PermutedD | None,
        group_size: int,
    ) -> None:
        weights = [get_weight(gm, s).float() for s in group]
        w = torch.cat(weights) if len(weights) > 1 else weights[0]
        clip = ClipSearch(self.clip_grid, self.clip_min) if self.clip_search else None
        col_weight = torch.diag(h) if self.clip_weighted else None
        # The clip search runs on torch's threads: its passes cover row chunks of ~1 M
        # weights (w4a8.grid.SEARCH_CHUNK), large enough to share (fused gate/up of
        # Qwen2.5-0.5B: 252 ms on one thread, 155 ms on two; SmolLM2's q_proj 9.7 / 6.3 ms).
        grid = ctx.target.grid(w, ctx.quant, group_size, clip=clip, col_weight=col_weight)
        names = ", ".join(s.name for s in group)
        try:
            # Threads as it needs them: its column loop in C++ runs rows in parallel beside
            # large GEMMs; the torch fallback loop runs on one thread.
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
