"""``gguf_head``: the lm_head and the token embedding in the GGUF file's formats, computed as
llama.cpp computes them.

The head becomes ``qqq::q8_0_linear`` (a Q8_0 weight times Q8_0 activations:
``ggml_vec_dot_q8_0_q8_0``) or ``qqq::f16_linear`` (an F16 weight times fp16 activations);
the token embedding a lookup in a Q8_0 table (``qqq::q8_0_embedding``), a Q4_0 table
(``qqq::q4_0_embedding``) or an F16 table (llama.cpp's ``get_rows`` decodes the row to
float32). A float head tied to the embedding keeps one table, in the head's format, which the
GGUF writer stores once (llama.cpp then reads ``token_embd`` for the output).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from qqq_compile.annotations import annotate
from qqq_compile.compiler.passes.lower import drop_unused_attrs
from qqq_compile.compiler.pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass
from qqq_compile.errors import ConfigError
from qqq_compile.graph import LinearSite, get_attr, get_bias, get_weight
from qqq_compile.graph.head import embedding_table, find_lm_head, lowered_head_rows, token_embeddings
from qqq_compile.targets.gguf.formats import PackedQ8_0, check_blocks
from qqq_compile.targets.gguf.grid import Q4_0Grid
from qqq_compile.targets.gguf.ops import F16_LINEAR, Q4_0_EMBEDDING, Q8_0_EMBEDDING, Q8_0_LINEAR
from qqq_compile.targets.w4a8.int8_head import tensor_bytes
from qqq_compile.targets.w4a8.lower import buffer_name

aten = torch.ops.aten
HEAD_FORMATS = ("q8_0", "f16")
EMBEDDING_FORMATS = ("q8_0", "q4_0", "f16")


@dataclass(frozen=True)
class GGUFHeadConfig(PassConfig):
    """``head``: the lm_head's GGUF type (``"q8_0"`` or ``"f16"``); ``embedding``: the token
    embedding's (``"q8_0"``, ``"q4_0"`` or ``"f16"``)."""

    head: str = "q8_0"
    embedding: str = "q8_0"

    def __post_init__(self) -> None:
        if self.head not in HEAD_FORMATS:
            raise ConfigError(f"GGUFHead(head=...) must be one of {HEAD_FORMATS}, got {self.head!r}")
        if self.embedding not in EMBEDDING_FORMATS:
            raise ConfigError(f"GGUFHead(embedding=...) must be one of {EMBEDDING_FORMATS}, got {self.embedding!r}")


def _pack(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The stored tensors of a table ``w`` ``[V, K]`` in ``fmt`` (round to nearest)."""
    if fmt == "f16":
        return {"w": w.detach().to(torch.float16).contiguous()}
    check_blocks(w.shape[1], "the head / embedding width")
    if fmt == "q8_0":
        p = PackedQ8_0.from_float(w)
    else:
        grid = Q4_0Grid(w.detach().float())
        p = grid.pack(grid.quantize_all(w.detach().float())[0])
    return {"qs": p.qs, "d": p.d}


@register_pass("gguf_head")
class GGUFHead(QQQPass):
    """Store the float lm_head and token embedding in GGUF types and compute them as llama.cpp.

    The head is the linear :func:`~qqq_compile.graph.head.find_lm_head` finds (a head already
    lowered to Q4_0, from ``QuantConfig.skip=()``, is left alone); the embeddings are its
    token embeddings (:func:`~qqq_compile.graph.head.token_embeddings`). Each table is rounded
    to nearest in its format. Preconditions: after ``lower``. Replay on load re-runs it; the
    saved tensors then replace what it computed.
    """

    name = "gguf_head"
    config_class = GGUFHeadConfig
    replay_mode = "rerun"
    whole_model = True

    def __init__(self, head: str = "q8_0", embedding: str = "q8_0"):
        super().__init__(GGUFHeadConfig(head, embedding))

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        before = tensor_bytes(gm)
        site = find_lm_head(gm)
        embeddings = token_embeddings(gm, site, None if site is not None else lowered_head_rows(gm))
        if site is None and not embeddings:
            return PassResult(gm, False)
        done: list[str] = []
        # One set of tensors per (float attribute, format): a tied head and embedding asked
        # for in the same format share it.
        tables: dict[tuple[str, str], dict[str, str]] = {}

        def stored(target: str, w: torch.Tensor, fmt: str) -> dict[str, str]:
            key = (target, fmt)
            if key not in tables:
                base = re.sub(r"\.weight$", "", target)
                names = {}
                for role, t in _pack(w, fmt).items():
                    names[role] = buffer_name(gm, base, f"{fmt}_{role}")
                    gm.register_buffer(names[role], t)
                tables[key] = names
            return tables[key]

        if site is not None:
            names = stored(site.weight.target, get_weight(gm, site), self.head)
            _rewrite_head(gm, site, self.head, names)
            done.append(f"{site.name} {self.head}")
        head_target = site.weight.target if site is not None else None
        for n in embeddings:
            target = n.args[0].target
            # A head tied to this table keeps one table (llama.cpp reads token_embd for the
            # output), in the head's format: two tables would cost more than the one.
            fmt = self.head if target == head_target else self.embedding
            names = stored(target, get_attr(gm, target), fmt)
            _rewrite_embedding(gm, n, fmt, names)
            done.append(f"embedding {target} {fmt}" + (" (tied to the head)" if fmt != self.embedding else ""))
        drop_unused_attrs(gm)  # the replaced float tables
        gm.graph.lint()
        gm.recompile()
        after = tensor_bytes(gm)
        ctx.note(
            self.name,
            f"GGUF types: {', '.join(done)}; stored tensors {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB",
        )
        return PassResult(gm, True)


def _keep_meta(new: Node, old: Node) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "stack_trace")})


def _rewrite_head(gm: GraphModule, site: LinearSite, fmt: str, names: dict[str, str]) -> None:
    g = gm.graph
    bias = site.bias if get_bias(gm, site) is not None else None
    with g.inserting_before(site.node):
        if fmt == "f16":
            new = g.call_function(F16_LINEAR, (site.x, g.get_attr(names["w"]), bias))
        else:
            new = g.call_function(Q8_0_LINEAR, (site.x, g.get_attr(names["qs"]), g.get_attr(names["d"]), bias))
    _keep_meta(new, site.node)
    annotate(new, int8_head={"replaced": "linear", "fqn": site.name, "format": fmt, **names})
    site.node.replace_all_uses_with(new)
    g.erase_node(site.node)


def _rewrite_embedding(gm: GraphModule, node: Node, fmt: str, names: dict[str, str]) -> None:
    """``embedding(W, ids)`` -> the decoded rows of the stored table, in ``W``'s dtype."""
    g = gm.graph
    dtype = embedding_table(node).dtype
    ids = node.args[1]
    with g.inserting_before(node):
        if fmt == "f16":
            rows = g.call_function(aten.embedding.default, (g.get_attr(names["w"]), ids))
            out = g.call_function(aten._to_copy.default, (rows,), {"dtype": dtype})
        else:
            op = Q8_0_EMBEDDING if fmt == "q8_0" else Q4_0_EMBEDDING
            out = g.call_function(op, (ids, g.get_attr(names["qs"]), g.get_attr(names["d"])))
            if dtype != torch.float32:
                out = g.call_function(aten._to_copy.default, (out,), {"dtype": dtype})
    _keep_meta(out, node)
    annotate(out, int8_head={"replaced": "embedding", "weight": node.args[0].target, "format": fmt, **names})
    node.replace_all_uses_with(out)
    g.erase_node(node)


__all__ = ["EMBEDDING_FORMATS", "GGUFHead", "GGUFHeadConfig", "HEAD_FORMATS"]
