"""``smooth``: QQQ adaptive smoothing, searched per group on live block inputs and
folded into the weights (float-equivalent: the graph's structure does not change).

Smoothing groups are read off the graph, never named per model:

* a norm (RMSNorm, ``(1 + w)`` RMSNorm, LayerNorm with bias) whose output feeds only
  linears (q/k/v, gate/up): the norm weight (and bias) absorbs ``1/s``;
* a producer linear whose output reaches the consumer only through ops linear in it
  (:func:`~qqq_compile.graph.linear_pairs`: up→down through the gated activation, v→o
  with multi-head attention): the producer's output rows absorb ``1/s``.

The consumers' input columns absorb ``s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from qqq_compile.annotations import annotate
from qqq_compile.compiler.block_runner import BlockRunner, run_nodes
from qqq_compile.compiler.calibration import batch_tokens
from qqq_compile.compiler.pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass
from qqq_compile.config import ConfigError, QuantConfig, check_group_size
from qqq_compile.graph import (
    LinearSite,
    downstream_linears,
    ensure_info,
    get_bias,
    get_weight,
    is_skipped,
    linear_sites,
    static_size,
)
from qqq_compile.graph.smooth_groups import SmoothGroup, fold_scales, smoothing_groups, unsmoothable
from qqq_compile.targets.registry import get_target

METHODS = ("qqq", "smoothquant", "awq", "qoq_down")


@dataclass
class SmoothRecord:
    """What smoothing did to one group; kept in the ``smooth`` annotation of each
    linear whose input columns were scaled (for the inspect/report plots)."""

    group: str
    method: str
    scales: torch.Tensor | None = None  # [K], input columns were multiplied by it
    act_absmax_before: torch.Tensor | None = None  # [K] max |x| per channel
    act_absmax_after: torch.Tensor | None = None
    loss_before: float | None = None  # relative W4A8 fake-quant MSE with s = 1
    loss_after: float | None = None
    param: float | None = None  # threshold t (qqq) or alpha (smoothquant, awq); None: s = 1 won
    skipped: str | None = None  # why the group was not smoothed
    n_tried: int = 0  # candidates scored besides s = 1


# ----------------------------------------------------------------------------- fake quant


def fake_quant_weight(w: torch.Tensor, quant: QuantConfig, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w`` in ``quant``'s target format
    (:meth:`Target.fake_quant_weight`; ``group_size`` None: ``quant``'s, resolved by the target)."""
    target = get_target(quant.target)
    quant = target.resolve(quant)
    gs = quant.group_size if group_size is None else group_size
    return target.fake_quant_weight(w, quant, gs)


def _x_index(site: LinearSite) -> int:
    return list(site.node.args).index(site.x)


def fake_linear(
    site: LinearSite,
    w_nk: torch.Tensor,
    bias: torch.Tensor | None,
    in_scale: torch.Tensor | None = None,
    quant_act: bool = True,
    cache: dict[tuple[int, bool], torch.Tensor] | None = None,
    *,
    act_quant: Any,
):
    """An override for ``site``'s node: ``fq(x / in_scale) @ w_nk.T + bias``, with ``fq``
    the target's activation quantizer ``act_quant``. Linears that share an input and a
    ``cache`` dict quantize that input once."""
    i = _x_index(site)

    def prep(x: torch.Tensor) -> torch.Tensor:
        if in_scale is not None:
            x = x / in_scale
        return act_quant(x) if quant_act else x

    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        x = args[i]
        if cache is None:
            xq = prep(x)
        else:
            key = (id(x), quant_act)
            if key not in cache:
                cache[key] = prep(x)
            xq = cache[key]
        # The search holds weights in fp32 whatever the model's dtype (fp16/bf16 models
        # too): compute in fp32 and hand the graph back its own dtype.
        b = None if bias is None else bias.float()
        return F.linear(xq.float(), w_nk.float(), b).to(x.dtype)

    return run


def run_w4a8_fake(gm: GraphModule, inputs: dict[str, torch.Tensor], quant: QuantConfig | None = None) -> Any:
    """Run the graph with every quantizable linear in fake quant of ``quant``'s target (RTN
    weights; W4A8 by default: int4 weights, per-token int8 activations); returns the graph's
    flat outputs."""
    quant = quant or QuantConfig()
    target = get_target(quant.target)
    quant, act = target.resolve(quant), target.fake_quant_act
    overrides = {}
    for s in linear_sites(gm):
        if not is_skipped(s.name, quant.skip):
            w = fake_quant_weight(get_weight(gm, s).float(), quant)
            overrides[s.node] = fake_linear(s, w, get_bias(gm, s), act_quant=act)
    env: dict[Node, Any] = {n: inputs[n.target] for n in gm.graph.nodes if n.op == "placeholder"}
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    with torch.no_grad():
        run_nodes(gm, nodes, env, overrides)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return torch.fx.node.map_arg(out, lambda n: env[n])


# ----------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class SmoothConfig(PassConfig):
    """Options of :class:`Smooth` (see its docstring)."""

    method: str = "qqq"
    alpha: float = 0.5
    n_grid: int = 20
    max_batches: int = 4
    group_size: int | None = None
    max_tokens: int = 1024
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"Smooth(method={self.method!r}) is not known; use one of {METHODS}")
        if self.n_grid < 0 or self.max_batches < 1 or self.max_tokens < 1:
            raise ConfigError("Smooth needs n_grid >= 0, max_batches >= 1 and max_tokens >= 1")
        check_group_size(self.group_size, "Smooth(group_size)", allow_none=True)


@register_pass("smooth")
class Smooth(QQQPass):
    """Search per-channel smoothing scales for every group and fold them.

    Preconditions: a captured float graph; calibration data in ``ctx.calib``.
    Position: after ``rotate`` (if any), before ``observe``/``calibrate``/``gptq``.

    ``method``: ``"qqq"`` (threshold search ``s = max(1, max|X| / t)``),
    ``"smoothquant"`` (``s = max|X|^α / max|W|^(1-α)``), ``"awq"``
    (``s = mean|X|^α``, normalised) or ``"qoq_down"`` (QServe's output-module smoothing
    after rotation: SmoothQuant's ``s`` with α searched, applied to the MLP output
    projections only, folded into the up projection's rows; every other group is left
    alone, the rotation already flattened those inputs; an online Hadamard before
    ``down_proj`` leaves it nothing to smooth). ``n_grid`` candidates are scored by the relative MSE
    of the sub-block's output (through attention / the gated MLP, up to the next
    linear) with W4A8 fake quant on the smoothed linears; ``s = 1`` is always a
    candidate, so the calibration loss never gets worse. ``n_grid <= 1`` uses ``alpha``
    alone (classic SmoothQuant). ``patience``: stop walking the grid (t falling, α
    rising) after that many candidates in a row that do not improve on the best one
    (None: score the whole grid). The search runs on about ``max_tokens`` tokens (at
    least two windows) from the first ``max_batches`` calibration batches: SmolLM2-135M
    takes about 50 s on 2 cores with the defaults. ``group_size`` None: ``ctx.quant``'s.

    Annotations: ``LinearInfo.smooth_group``/``smooth_scale_range`` on every linear whose
    input columns were scaled, and a :class:`SmoothRecord` as their ``smooth`` annotation
    (also for skipped groups, with the reason; the same note goes to ``ctx.notes``).
    """

    name = "smooth"
    config_class = SmoothConfig
    requires = ("calib",)
    replay_mode = "tensors"  # folds scales into weights (saved tensors); the graph keeps its shape

    def __init__(
        self,
        method: str = "qqq",
        alpha: float = 0.5,
        n_grid: int = 20,
        max_batches: int = 4,
        group_size: int | None = None,
        max_tokens: int = 1024,
        patience: int | None = None,
    ):
        super().__init__(SmoothConfig(method, alpha, n_grid, max_batches, group_size, max_tokens, patience))

    # -- data

    def _windows(self, gm: GraphModule, calib: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """About ``max_tokens`` tokens in at least two windows: rows taken round-robin
        from the first ``max_batches`` batches (so they differ), cut to a common prefix
        length when whole token rows would exceed the budget, regrouped by shape.

        Rows are split along dim 0 only when every graph input's dim 0 is dynamic (a
        static graph runs only its own batch size: its batches are used whole). A row of
        a token batch holds ``T`` tokens; of any other input, ``numel / last dim`` of its
        first tensor (``[B, D]``: 1, ``[B, T, D]``: T) stands in for its token count."""
        batches = calib[: self.max_batches]
        if not _batch_dim_dynamic(gm):
            return batches
        tokens = all(isinstance(b.get("input_ids"), torch.Tensor) and b["input_ids"].dim() == 2 for b in batches)
        rows: list[dict[str, Any]] = []
        depth = max(_rows(b) for b in batches)
        for r in range(depth):
            rows += [{k: _row(v, r) for k, v in b.items()} for b in batches if r < _rows(b)]
        per_row = max(batch_tokens(row) for row in rows)
        n = min(len(rows), max(2, math.ceil(self.max_tokens / per_row)))
        cut = max(2, self.max_tokens // n) if tokens else None
        by_shape: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows[:n]:
            if cut is not None:
                t = min(row["input_ids"].shape[-1], cut)
                row = {k: v[:, :t] if isinstance(v, torch.Tensor) and v.dim() > 1 else v for k, v in row.items()}
            key = tuple((k, tuple(v.shape)) for k, v in row.items() if isinstance(v, torch.Tensor))
            by_shape.setdefault(key, []).append(row)
        return [{k: _cat([x[k] for x in same]) for k in same[0]} for same in by_shape.values()]

    # -- candidates

    def _candidates(self, g: SmoothGroup, gm: GraphModule, a: torch.Tensor, mean: torch.Tensor):
        """(parameter, scales) pairs to try, besides s = 1."""
        a = a.clamp_min(1e-5)
        out = []
        if self.method == "qqq":
            # Thresholds spaced geometrically from the largest channel max down to the
            # median one, so the outliers' scale grows smoothly from 1 to max/median
            # (quantile steps would jump straight from "none" to "all outliers flattened").
            n = max(self.n_grid, 1)
            hi, lo = float(a.max()), float(torch.quantile(a, 0.5))
            for k in range(1, n + 1):
                t = hi * (lo / hi) ** (k / n)
                out.append((t, (a / t).clamp_min(1.0)))
            return out
        alphas = [self.alpha] if self.n_grid <= 1 else torch.linspace(0, 1, self.n_grid).tolist()
        if self.method in ("smoothquant", "qoq_down"):
            w = torch.stack([get_weight(gm, s).float().abs().amax(0) for s in g.linears]).amax(0).clamp_min(1e-5)
            for al in alphas:
                out.append((al, (a.pow(al) / w.pow(1 - al)).clamp(1e-4, 1e4)))
        else:  # awq
            m = mean.clamp_min(1e-5)
            for al in alphas:
                s = m.pow(al)
                out.append((al, (s / (s.max() * s.min()).sqrt()).clamp(1e-4, 1e4)))
        return out

    # -- search

    def _search(self, gm: GraphModule, st, g: SmoothGroup, quant: QuantConfig, gsize: int):
        nodes = st.block.nodes
        pos = {n: i for i, n in enumerate(nodes)}
        lin_nodes = {s.node for s in g.linears}
        if g.producer is not None:
            loss_nodes = list(lin_nodes)
        else:
            nxt = set()
            for s in g.linears:
                nxt |= {x.node for x in downstream_linears(gm, s.node)}
            loss_nodes = [n for n in nxt - lin_nodes if n in pos] or list(lin_nodes)
        last = max(pos[n] for n in loss_nodes)
        base = [run_nodes(gm, nodes[: last + 1], dict(env)) for env in st.envs]
        # Re-run only what the candidate changes: the smoothed linears and what lies
        # between them and the loss nodes (attention, the gated activation).
        anc = _ancestors(loss_nodes)
        changed: set[Node] = set(lin_nodes)
        rerun = []
        for n in nodes[: last + 1]:
            if n in changed or any(a in changed for a in n.all_input_nodes):
                changed.add(n)
                if n in anc:
                    rerun.append(n)
        x_node = g.linears[0].x
        xs = [e[x_node].reshape(-1, e[x_node].shape[-1]).float() for e in base]
        a = torch.stack([x.abs().amax(0) for x in xs]).amax(0)
        mean = torch.cat(xs).abs().mean(0)
        refs = [[e[n] for n in loss_nodes] for e in base]
        energy = [sum(r.float().pow(2).sum().item() for r in rs) + 1e-30 for rs in refs]
        ws = {s.node: (get_weight(gm, s).float(), get_bias(gm, s)) for s in g.linears}
        act = get_target(quant.target).fake_quant_act

        def loss(s: torch.Tensor) -> float:
            ov, cache = {}, {}
            for site in g.linears:
                w, b = ws[site.node]
                if is_skipped(site.name, quant.skip):
                    ov[site.node] = fake_linear(site, w * s, b, s, quant_act=False, cache=cache, act_quant=act)
                else:
                    wq = fake_quant_weight(w * s, quant, gsize)
                    ov[site.node] = fake_linear(site, wq, b, s, cache=cache, act_quant=act)
            total = 0.0
            for env, rs, en in zip(base, refs, energy, strict=True):
                cache.clear()  # one entry per shared input and window (q/k/v read one tensor)
                out = run_nodes(gm, rerun, dict(env), ov)
                err = sum((out[n].float() - r.float()).pow(2).sum().item() for n, r in zip(loss_nodes, rs, strict=True))
                total += err / en
            return total / len(base)

        ones = torch.ones_like(a)
        best = (loss(ones), None, ones)
        loss_before, path_best, worse, tried = best[0], math.inf, 0, 0
        for param, s in self._candidates(g, gm, a, mean):
            if not torch.isfinite(s).all() or torch.equal(s, ones):
                continue
            val = loss(s)
            tried += 1
            worse = 0 if val < path_best else worse + 1
            path_best = min(path_best, val)
            if val < best[0]:
                best = (val, param, s)
            # Each grid moves monotonically (t falls, alpha rises) and the loss is nearly
            # always unimodal along it: stop once it has risen for a while.
            if self.patience and worse >= self.patience:
                break
        return best, loss_before, a, tried

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        calib = ctx.require_calib(self.name)
        gsize = ctx.quant.group_size if self.group_size is None else self.group_size
        every = groups = smoothing_groups(gm)
        if self.method == "qoq_down":
            groups = self._down_only(groups, ctx)
        runner = BlockRunner(gm, self._windows(gm, calib), progress=ctx.progress, desc="smooth")
        by_block: dict[str, list[SmoothGroup]] = {}
        block_of = {n: b.name for b in runner.part.blocks for n in b.nodes}
        for g in groups:
            owners = {block_of.get(n) for n in [s.node for s in g.linears] + ([g.producer.node] if g.producer else [])}
            if all(is_skipped(s.name, ctx.quant.skip) for s in g.linears):
                g.unsafe = g.unsafe or "its linears stay in full precision (QuantConfig.skip)"
            if g.unsafe is None and len(owners) == 1 and None not in owners:
                by_block.setdefault(owners.pop(), []).append(g)
            else:
                g.unsafe = g.unsafe or "its linears are not inside one decoder block"
                self._annotate(gm, g, SmoothRecord(g.name, self.method, skipped=g.unsafe))
                ctx.note(self.name, f"not smoothing {g.name}: {g.unsafe}", g.name)
        why_not = unsmoothable(gm, every, ctx.quant.skip)
        if why_not:
            parts = [f"{', '.join(n[:4])}{', ...' if len(n) > 4 else ''}: {why}" for why, n in why_not.items()]
            count = sum(map(len, why_not.values()))
            ctx.note(self.name, f"inputs of {count} linear(s) have no smoothing pattern: " + "; ".join(parts))
        modified = False
        with torch.no_grad():
            for st in runner.blocks():
                for g in by_block.get(st.block.name, []):
                    (val, param, s), before, a, tried = self._search(gm, st, g, ctx.quant, gsize)
                    rec = SmoothRecord(g.name, self.method, s, a, a / s, before, val, param, n_tried=tried)
                    if param is not None:
                        fold_scales(gm, g, s)
                        modified = True
                    self._annotate(gm, g, rec)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)

    def _down_only(self, groups: list[SmoothGroup], ctx: CompileContext) -> list[SmoothGroup]:
        """The MLP output projections' groups (producer up→down through the gating)."""
        keep = [g for g in groups if g.kind == "mlp"]
        if keep:
            msg = f"qoq_down: smoothing the inputs of {len(keep)} MLP output projection(s) only"
            ctx.note(self.name, msg + f" ({len(groups) - len(keep)} other group(s) left alone)")
        else:
            ctx.note(
                self.name,
                "qoq_down found no MLP output projection to smooth (no up→down pair: a nonlinearity or an "
                "online Hadamard, Rotate(online_down_proj=True), sits between them)",
                level="warning",
            )
        return keep

    def _annotate(self, gm: GraphModule, g: SmoothGroup, rec: SmoothRecord) -> None:
        for site in g.linears:
            li = ensure_info(gm, site)
            annotate(site.node, smooth=rec)
            if rec.skipped is None and rec.param is not None:
                li.smooth_group = g.name
                li.smooth_scale_range = (float(rec.scales.min()), float(rec.scales.max()))


def _batch_dim_dynamic(gm: GraphModule) -> bool:
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [v for v in vals if isinstance(v, torch.Tensor) and v.dim() >= 1]
    return bool(tensors) and all(static_size(v.shape[0]) is None for v in tensors)


def _rows(batch: dict[str, Any]) -> int:
    return max((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), default=1)


def _row(v: Any, r: int) -> Any:
    return v[r : r + 1] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v


def _cat(vs: list[Any]) -> Any:
    return torch.cat(vs) if isinstance(vs[0], torch.Tensor) and vs[0].dim() >= 1 else vs[0]


def _ancestors(nodes: list[Node]) -> set[Node]:
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


__all__ = [
    "METHODS",
    "Smooth",
    "SmoothGroup",
    "SmoothRecord",
    "fake_linear",
    "fake_quant_weight",
    "fold_scales",
    "run_w4a8_fake",
    "smoothing_groups",
    "unsmoothable",
]
