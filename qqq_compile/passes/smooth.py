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

from ..config import ConfigError, QuantConfig, check_group_size
from ..formats import ACT_QMAX, choose_scales, expand_groups
from ..graph import (
    ASSERT_OPS,
    LinearSite,
    NormInfo,
    downstream_linears,
    ensure_info,
    get_attr,
    get_bias,
    get_weight,
    is_skipped,
    linear_pairs,
    linear_sites,
    module_fqn,
    norm_groups,
    set_attr,
    set_weight,
)
from ..pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass
from ..runner import BlockRunner, run_nodes

METHODS = ("qqq", "smoothquant", "awq")


@dataclass
class SmoothRecord:
    """What smoothing did to one group; kept in ``node.meta["qqq_smooth"]`` of each
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


@dataclass
class SmoothGroup:
    """A set of linears whose shared input channels can be rescaled, and where the
    ``1/s`` goes: a norm's affine parameters or a producer linear's output rows."""

    name: str
    linears: list[LinearSite]
    norm: NormInfo | None = None
    producer: LinearSite | None = None
    unsafe: str | None = None


# ----------------------------------------------------------------------------- groups


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _shared_attrs(gm: GraphModule) -> dict[str, list[str]]:
    """Attribute name → other attribute names that share its storage (tied weights)."""
    by_ptr: dict[int, list[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        by_ptr.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    return {n: [m for m in names if m != n] for names in by_ptr.values() for n in names}


def _attr_shared(gm: GraphModule, attr: Node, owners: set[Node], shared: dict[str, list[str]]) -> str | None:
    """Why the tensor behind ``attr`` is used outside ``owners`` (None if it is not)."""
    if shared.get(attr.target):
        return f"{attr.target} shares storage with {shared[attr.target][0]}"
    for n in attr.graph.nodes:
        if n.op == "get_attr" and n.target == attr.target:
            for u in n.users:
                if u.op == "call_function" and u.target in ASSERT_OPS:
                    continue
                if u not in owners:
                    return f"{attr.target} is also read by {module_fqn(u) or u.name}"
    return None


def _norm_nodes(norm: NormInfo) -> set[Node]:
    """The nodes between the norm's weight and its output (Gemma's ``1 + w`` add)."""
    out, stack = set(), [norm.output]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack.extend(a for a in n.all_input_nodes if a is not norm.input and a.op != "placeholder")
    return out


def _linear_nodes(site: LinearSite) -> set[Node]:
    """The linear node and any transpose between it and its weight."""
    return {site.node} | {a for a in site.node.all_input_nodes if a is not site.x and a.op == "call_function"}


def smoothing_groups(gm: GraphModule) -> list[SmoothGroup]:
    """Every smoothing group of the graph, in graph order, with ``unsafe`` set (and the
    reason) where folding would change the model or another tensor."""
    shared = _shared_attrs(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: list[SmoothGroup] = []

    def tied(site: LinearSite) -> str | None:
        for attr in (site.weight, site.bias):
            if attr is not None and (why := _attr_shared(gm, attr, _linear_nodes(site), shared)):
                return f"{site.name}'s weight is tied: {why}"
        return None

    for g in norm_groups(gm):
        if not g.sites:
            continue
        sites = sorted(g.sites, key=lambda s: order[s.node])
        norm_name = module_fqn(g.norm.output) or g.norm.weight.target
        name = f"{norm_name}→" + ",".join(_short(s.name) for s in sites)
        unsafe = None
        if g.other_users:
            users = ", ".join(module_fqn(u) or u.name for u in g.other_users)
            unsafe = f"the norm output also feeds {users}, which is not a linear"
        for attr in (g.norm.weight, g.norm.bias):
            if unsafe is None and attr is not None:
                why = _attr_shared(gm, attr, _norm_nodes(g.norm), shared)
                unsafe = f"the norm's parameter is shared: {why}" if why else None
        for s in sites:
            unsafe = unsafe or tied(s)
        groups.append(SmoothGroup(name, sites, norm=g.norm, unsafe=unsafe))
    for p in linear_pairs(gm):
        name = f"{p.producer.name}→" + ",".join(_short(c.name) for c in p.consumers)
        unsafe = tied(p.producer)
        for c in p.consumers:
            unsafe = unsafe or tied(c)
        groups.append(SmoothGroup(name, list(p.consumers), producer=p.producer, unsafe=unsafe))
    return sorted(groups, key=lambda g: min(order[s.node] for s in g.linears))


def fold_scales(gm: GraphModule, g: SmoothGroup, s: torch.Tensor) -> None:
    """Fold ``s`` into the graph: the norm's weight/bias or the producer's rows absorb
    ``1/s``, the group's linears' input columns ``s`` (new tensors, never in place)."""
    if g.norm is not None:
        w = get_attr(gm, g.norm.weight.target)
        sw = s.to(w.dtype)
        new = (1 + w) / sw - 1 if g.norm.kind == "rmsnorm_plus_one" else w / sw
        set_attr(gm, g.norm.weight.target, new.detach().clone())
        if g.norm.bias is not None:
            b = get_attr(gm, g.norm.bias.target)
            set_attr(gm, g.norm.bias.target, (b / s.to(b.dtype)).detach().clone())
    else:
        p = g.producer
        w = get_weight(gm, p)
        set_weight(gm, p, w / s.to(w.dtype)[:, None])
        if p.bias is not None:
            b = get_bias(gm, p)
            set_attr(gm, p.bias.target, (b / s.to(b.dtype)).clone())
    for site in g.linears:
        w = get_weight(gm, site)
        set_weight(gm, site, w * s.to(w.dtype)[None, :])


# ----------------------------------------------------------------------------- fake quant


def fake_quant_weight(w: torch.Tensor, quant: QuantConfig, group_size: int | None = None) -> torch.Tensor:
    """Quantize-dequantize ``w`` ``[N, K]`` to int4 in the project's format (RTN): the
    same steps and rounding as ``choose_scales`` + ``quantize_to_int4``, computed with
    in-place ops because the scale search calls it for every candidate. (With float16
    group scales the kernel also rounds ``q4 * gs`` to int8; that is not modelled.)"""
    gs = quant.group_size if group_size is None else group_size
    wf = w.float()
    sc = choose_scales(wf, gs, quant.group_scale_dtype)
    step = expand_groups(sc.step, w.shape[1], gs) if gs > 0 else sc.step
    q = torch.div(wf, step).round_().clamp_(sc.qmin, sc.qmax)
    return q.mul_(step).to(w.dtype)


def fake_quant_act_fast(x: torch.Tensor) -> torch.Tensor:
    """:func:`~qqq_compile.formats.fake_quant_act` (per-token symmetric int8) with
    in-place ops: identical values, fewer temporaries."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-8).div_(ACT_QMAX)
    return torch.div(xf, s).round_().clamp_(-ACT_QMAX, ACT_QMAX).mul_(s).to(x.dtype)


def _x_index(site: LinearSite) -> int:
    return list(site.node.args).index(site.x)


def fake_linear(
    site: LinearSite,
    w_nk: torch.Tensor,
    bias: torch.Tensor | None,
    in_scale: torch.Tensor | None = None,
    quant_act: bool = True,
    cache: dict[tuple[int, bool], torch.Tensor] | None = None,
):
    """An override for ``site``'s node: ``fq(x / in_scale) @ w_nk.T + bias``. Linears
    that share an input and a ``cache`` dict quantize that input once."""
    i = _x_index(site)

    def prep(x: torch.Tensor) -> torch.Tensor:
        if in_scale is not None:
            x = x / in_scale
        return fake_quant_act_fast(x) if quant_act else x

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
    """Run the graph with every quantizable linear in W4A8 fake quant (RTN int4 weights,
    per-token int8 activations); returns the graph's flat outputs."""
    quant = quant or QuantConfig()
    overrides = {}
    for s in linear_sites(gm):
        if not is_skipped(s.name, quant.skip):
            overrides[s.node] = fake_linear(s, fake_quant_weight(get_weight(gm, s).float(), quant), get_bias(gm, s))
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
        check_group_size(self.group_size, "Smooth")


@register_pass("smooth")
class Smooth(QQQPass):
    """Search per-channel smoothing scales for every group and fold them.

    Preconditions: a captured float graph; calibration data in ``ctx.calib``.
    Position: after ``rotate`` (if any), before ``observe``/``calibrate``/``gptq``.

    ``method``: ``"qqq"`` (threshold search ``s = max(1, max|X| / t)``),
    ``"smoothquant"`` (``s = max|X|^α / max|W|^(1-α)``) or ``"awq"``
    (``s = mean|X|^α``, normalised). ``n_grid`` candidates are scored by the relative MSE
    of the sub-block's output (through attention / the gated MLP, up to the next
    linear) with W4A8 fake quant on the smoothed linears; ``s = 1`` is always a
    candidate, so the calibration loss never gets worse. ``n_grid <= 1`` uses ``alpha``
    alone (classic SmoothQuant). ``patience``: stop walking the grid (t falling, α
    rising) after that many candidates in a row that do not improve on the best one
    (None: score the whole grid). The search runs on about ``max_tokens`` tokens (at
    least two windows) from the first ``max_batches`` calibration batches: SmolLM2-135M
    takes about 50 s on 2 cores with the defaults. ``group_size`` None: ``ctx.quant``'s.

    Annotations: ``LinearInfo.smooth_group``/``smooth_scale_range`` on every linear whose
    input columns were scaled, and a :class:`SmoothRecord` in ``meta["qqq_smooth"]``
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

    def _windows(self, calib: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """About ``max_tokens`` tokens in at least two windows: rows taken round-robin
        from the first ``max_batches`` batches (so they differ), cut to a common prefix
        length when whole rows would exceed the budget, regrouped by length."""
        batches = calib[: self.max_batches]
        rows: list[dict[str, torch.Tensor]] = []
        depth = max(b["input_ids"].shape[0] for b in batches)
        for r in range(depth):
            rows += [{k: v[r : r + 1] for k, v in b.items()} for b in batches if r < b["input_ids"].shape[0]]
        lengths = [row["input_ids"].shape[-1] for row in rows]
        n = min(len(rows), max(2, math.ceil(self.max_tokens / max(lengths))))
        cut = max(2, self.max_tokens // n)
        by_len: dict[int, list[dict[str, torch.Tensor]]] = {}
        for row in rows[:n]:
            t = min(row["input_ids"].shape[-1], cut)
            by_len.setdefault(t, []).append({k: v[:, :t] if v.dim() > 1 else v for k, v in row.items()})
        return [{k: torch.cat([x[k] for x in same]) for k in same[0]} for same in by_len.values()]

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
        if self.method == "smoothquant":
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

        def loss(s: torch.Tensor) -> float:
            ov, cache = {}, {}
            for site in g.linears:
                w, b = ws[site.node]
                if is_skipped(site.name, quant.skip):
                    ov[site.node] = fake_linear(site, w * s, b, s, quant_act=False, cache=cache)
                else:
                    ov[site.node] = fake_linear(site, fake_quant_weight(w * s, quant, gsize), b, s, cache=cache)
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
        groups = smoothing_groups(gm)
        runner = BlockRunner(gm, self._windows(calib), progress=ctx.progress, desc="smooth")
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

    def _annotate(self, gm: GraphModule, g: SmoothGroup, rec: SmoothRecord) -> None:
        for site in g.linears:
            li = ensure_info(gm, site)
            site.node.meta["qqq_smooth"] = rec
            if rec.skipped is None and rec.param is not None:
                li.smooth_group = g.name
                li.smooth_scale_range = (float(rec.scales.min()), float(rec.scales.max()))


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
]
