"""``cast_float``: store the weights that stay in float (lm_head, embeddings) in bf16/fp16."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import annotate, node_annotation
from qqq_compile.compiler.pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass
from qqq_compile.config import ConfigError
from qqq_compile.graph import get_attr, info, linear_sites, set_attr

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_EMBEDDING = torch.ops.aten.embedding.default
_CAST = torch.ops.aten._to_copy.default


@dataclass(frozen=True)
class CastFloatConfig(PassConfig):
    """``dtype``: ``"bfloat16"``, ``"float16"`` or None (follow ``ctx.quant.float_weight_dtype``)."""

    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(
                f"CastFloatWeights(dtype={self.dtype!r}) is not supported; use one of {list(DTYPES)} or None"
            )


@register_pass("cast_float")
class CastFloatWeights(QQQPass):
    """Store the float weights that survive lowering in ``dtype`` and compute with them there.

    After lowering, the weights that are not W4 (``lm_head``, which QQQ keeps unquantized,
    and the embedding table it is often tied to) dominate a small model's memory: 108 of
    159 MiB for SmolLM2-135M. Storing them in bf16 halves that, and bf16 ``linear`` runs
    on oneDNN (AVX512-BF16/AMX) about 2x faster than fp32 on CPU. The activations are
    rounded to ``dtype`` at the float linear's input and the result is cast back, so the
    graph's outputs keep their dtype. Embedding lookups are exact in ``dtype`` and are cast
    back after the gather.

    ``dtype`` None: read ``ctx.quant.float_weight_dtype``; if that is None too, the pass
    does nothing (the default: full precision, as the method states). ``compile()``
    appends this pass to the pipeline when ``QuantConfig.float_weight_dtype`` is set. Preconditions: run
    after ``lower`` (only linears that were not lowered are touched). Position: last.
    Tied weights stay tied: each attribute is cast once and every consumer reads it.
    """

    name = "cast_float"
    config_class = CastFloatConfig
    requires = ("lower",)
    replay_mode = "rerun"  # load() re-runs it; casting an already-cast weight is a no-op

    def __init__(self, dtype: str | None = None):
        super().__init__(CastFloatConfig(dtype))

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        name = self.dtype or getattr(ctx.quant, "float_weight_dtype", None)
        if name is None:
            return PassResult(gm, False)
        dtype = DTYPES[name]
        # (consumer node, weight get_attr node, kind) for every float weight to cast.
        targets: list[tuple[Node, Node, str]] = []
        for site in linear_sites(gm):
            li = info(site.node)
            if li is not None and li.lowered:
                continue
            targets.append((site.node, site.weight, "linear"))
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is _EMBEDDING and n.args[0].op == "get_attr":
                targets.append((n, n.args[0], "embedding"))
        modified = False
        cast_attrs: set[str] = set()
        for node, w, kind in targets:
            if node_annotation(node).float_cast:  # this consumer already reads the cast weight
                continue
            t = get_attr(gm, w.target)
            if not t.is_floating_point():
                continue
            if w.target not in cast_attrs and t.dtype != dtype:
                set_attr(gm, w.target, t.detach().to(dtype))  # a new tensor: the user's model keeps fp32
            cast_attrs.add(w.target)
            out_dtype = node.meta["val"].dtype if "val" in node.meta else torch.float32
            if kind == "linear":
                _cast_linear(gm, node, w, dtype, out_dtype)
            else:
                _cast_after(gm, node, out_dtype)
            annotate(node, float_cast=True)
            modified = True
        if modified:
            ctx.note(self.name, f"{len(cast_attrs)} float weight(s) stored as {name}: {sorted(cast_attrs)[:4]}")
        return PassResult(gm, modified)


def _cast(g, value: Node, dtype: torch.dtype) -> Node:
    return g.call_function(_CAST, (value,), {"dtype": dtype})


def _cast_after(gm: GraphModule, node: Node, dtype: torch.dtype) -> None:
    g = gm.graph
    with g.inserting_after(node):
        back = _cast(g, node, dtype)
    node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
    back.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val")})


def _cast_linear(gm: GraphModule, node: Node, w: Node, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    g = gm.graph
    # Every tensor input other than the weight (activation, bias) is rounded to ``dtype``.
    new_args = list(node.args)
    for i, a in enumerate(node.args):
        if isinstance(a, Node) and a is not w and a.all_input_nodes != [w]:  # not W (or its transpose)
            with g.inserting_before(node):
                new_args[i] = _cast(g, a, dtype)
    node.args = tuple(new_args)
    _cast_after(gm, node, out_dtype)
