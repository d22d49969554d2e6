"""``int8_head``: the lm_head (and optionally the embedding) stored in int8 and run as W8A8."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import annotate
from qqq_compile.compiler.pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass
from qqq_compile.config import ConfigError
from qqq_compile.graph import LinearSite, get_attr, get_bias, get_weight
from qqq_compile.graph.head import embedding_table, find_lm_head, token_embeddings
from qqq_compile.targets.w4a8 import kernels  # noqa: F401 - registers torch.ops.qqq.*
from qqq_compile.targets.w4a8.formats import quantize_int8_per_row

aten = torch.ops.aten
_EMBEDDING = aten.embedding.default
_W8A8 = torch.ops.qqq.w8a8_linear.default


@dataclass(frozen=True)
class Int8HeadConfig(PassConfig):
    """``embedding``: also store the embedding table (tied or not) as int8 rows."""

    embedding: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.embedding, bool):
            raise ConfigError(f"Int8Head(embedding=...) must be a bool, got {self.embedding!r}")


@register_pass("int8_head")
class Int8Head(QQQPass):
    """Replace the lm_head linear with ``torch.ops.qqq.w8a8_linear`` over int8 weights.

    The lm_head stays in float in QQQ (it is not W4-friendly), and at decode it is the
    largest read of a small model: SmolLM2-135M reads 113 MB of fp32 lm_head per token
    against ~56 MB for all its W4 linears. Here it becomes int8 ``[N, K]`` with an fp32
    per-output-channel scale (symmetric round-to-nearest,
    :func:`qqq_compile.targets.w4a8.formats.quantize_int8_per_row`), and its input is quantized per token
    to int8 inside the op: a quarter of the bytes, int32 accumulation.

    ``embedding=True`` also stores the token embedding table as int8 rows + an fp32 per-row
    scale and replaces the lookup with ``embedding(int8 rows) * embedding(scales)`` (plain
    aten ops). The token embedding is a float table with one row per output of the float
    lm_head; other tables (position embeddings, an encoder's embeddings without an lm_head,
    those of a model whose head was quantized to W4A8) stay as they are.
    When the lm_head is tied to the embedding both read the one int8 table (a row of the
    table is an output channel of the head). With ``embedding=False`` a tied table stays in
    float for the lookup and the head gets an int8 copy: memory grows by a quarter of the
    table, the per-token read still drops to a quarter.

    The lm_head is the float linear whose output reaches the graph output through view/copy
    ops only (else the last linear of the graph, if it is still float); nothing is done when
    there is none. Preconditions: run after ``lower`` (lowered linears are never touched).
    ``cast_float`` may run before (the cast weights are quantized) or after (only what is
    left in float is cast). Each rewritten node records what it replaced in its annotation
    (``NodeAnnotation.int8_head``, :mod:`qqq_compile.annotations`). Replay on load
    (:meth:`replay`) re-runs it with the saved options; the saved int8 tensors then replace
    what it computes from the skeleton's weights. The exporters write the head and the
    table as their dequantized float values (compressed-tensors) or as int8 initializers
    with ``DequantizeLinear`` (ONNX); see :mod:`qqq_compile.targets.w4a8.export`.
    """

    name = "int8_head"
    config_class = Int8HeadConfig
    replay_mode = "rerun"  # deterministic given the graph and the config; saved tensors then win
    whole_model = True  # the head and the embedding: never on a decoder block alone

    def __init__(self, embedding: bool = False):
        super().__init__(Int8HeadConfig(embedding))

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        before = tensor_bytes(gm)
        site = find_lm_head(gm)
        embeddings = token_embeddings(gm, site) if self.embedding else []
        if site is None and not embeddings:
            return PassResult(gm, False)
        done: list[str] = []
        # One int8 table per float weight attribute: a tied head and embedding share it.
        tables: dict[str, tuple[str, str]] = {}
        if site is not None:
            w_target = site.weight.target
            tables[w_target] = _store(gm, _name(site.name), get_weight(gm, site))
            _rewrite_head(gm, site, *tables[w_target])
            done.append(f"{site.name} {get_attr(gm, tables[w_target][0]).shape[0]}x{_k(gm, tables[w_target][0])}")
        for n in embeddings:
            w_target = n.args[0].target
            if w_target not in tables:
                tables[w_target] = _store(gm, _name(w_target), get_attr(gm, w_target))
            _rewrite_embedding(gm, n, *tables[w_target])
            done.append(f"embedding {w_target}")
        _drop_unused(gm, list(tables))
        gm.graph.lint()
        gm.recompile()
        after = tensor_bytes(gm)
        ctx.note(
            self.name,
            f"int8 W8A8 for {', '.join(done)}; stored tensors {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
            f"({(before - after) / 1e6:+.1f} MB saved)",
        )
        return PassResult(gm, True)


# ----------------------------------------------------------------------------- rewriting


def _name(fqn: str) -> str:
    return "qqq_" + re.sub(r"\W", "_", re.sub(r"\.weight$", "", fqn)) + "_int8"


def _k(gm: GraphModule, target: str) -> int:
    return get_attr(gm, target).shape[1]


def _store(gm: GraphModule, base: str, w: torch.Tensor) -> tuple[str, str]:
    """Register int8 rows + fp32 row scales of ``w`` [N, K]; returns their attribute names."""
    q, s = quantize_int8_per_row(w)
    names = []
    for suffix, t in (("", q), ("_scale", s)):
        name, i = base + suffix, 1
        while hasattr(gm, name):
            name, i = f"{base}{suffix}_{i}", i + 1
        gm.register_buffer(name, t.contiguous())
        names.append(name)
    return names[0], names[1]


def _keep_meta(new: Node, old: Node) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "val", "stack_trace")})


def _rewrite_head(gm: GraphModule, site: LinearSite, w8: str, scale: str) -> None:
    g = gm.graph
    bias = site.bias if get_bias(gm, site) is not None else None
    with g.inserting_before(site.node):
        args = (site.x, g.get_attr(w8), g.get_attr(scale), bias)
        new = g.call_function(_W8A8, args)
    _keep_meta(new, site.node)
    annotate(new, int8_head={"replaced": "linear", "fqn": site.name})
    site.node.replace_all_uses_with(new)
    g.erase_node(site.node)


def _rewrite_embedding(gm: GraphModule, node: Node, w8: str, scale: str) -> None:
    """``embedding(W, ids)`` -> ``(embedding(W8, ids).float() * embedding(s[:, None], ids)).to(W.dtype)``."""
    g = gm.graph
    dtype = embedding_table(node).dtype
    ids = node.args[1]
    with g.inserting_before(node):
        rows = g.call_function(_EMBEDDING, (g.get_attr(w8), ids))
        s_col = g.call_function(aten.unsqueeze.default, (g.get_attr(scale), 1))
        s = g.call_function(_EMBEDDING, (s_col, ids))
        rows_f = g.call_function(aten._to_copy.default, (rows,), {"dtype": torch.float32})
        deq = g.call_function(aten.mul.Tensor, (rows_f, s))
        out = deq if dtype == torch.float32 else g.call_function(aten._to_copy.default, (deq,), {"dtype": dtype})
    _keep_meta(out, node)
    annotate(out, int8_head={"replaced": "embedding", "weight": node.args[0].target})
    node.replace_all_uses_with(out)
    g.erase_node(node)


def _drop_unused(gm: GraphModule, targets: list[str]) -> None:
    """Erase dead get_attr nodes; free the replaced float weights nothing reads any more."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets:
        if target in used:
            continue
        *path, last = target.split(".")
        mod = gm.get_submodule(".".join(path)) if path else gm
        mod._parameters.pop(last, None)
        mod._buffers.pop(last, None)
        if hasattr(mod, last) and isinstance(getattr(mod, last), torch.Tensor):
            delattr(mod, last)


def tensor_bytes(gm: GraphModule) -> int:
    """Bytes of the distinct tensors the module holds (a tied tensor counted once)."""
    seen = {t.untyped_storage().data_ptr(): t for t in [*gm.parameters(), *gm.buffers()]}
    return sum(t.untyped_storage().nbytes() for t in seen.values())
