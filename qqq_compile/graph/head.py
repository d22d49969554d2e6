"""The lm_head and the token embedding of a causal LM graph, found from the graph alone.

Targets that store the head or the embedding in their own format (the W4A8 int8 head, a
GGUF Q8_0 output) ask here, so there is one rule for which linear is the head.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qqq_compile.graph.analysis import linear_sites
from qqq_compile.graph.sites import LinearSite, consumers, get_attr, get_weight, info, match_linear
from qqq_compile.targets.registry import lowered_linear_ops

_EMBEDDING = torch.ops.aten.embedding.default


def _reaches_output(n: Node) -> bool:
    return any(u.op == "output" for u in consumers(n))


def find_lm_head(gm: GraphModule) -> LinearSite | None:
    """The float linear that produces the logits: the last float linear whose output reaches
    the graph output through view/copy ops only; else (logit soft-capping between the head
    and the output) the graph's last linear if it is still float; else None."""
    sites = [s for s in linear_sites(gm) if not (info(s.node) is not None and info(s.node).lowered)]
    to_output = [s for s in sites if _reaches_output(s.node)]
    if to_output:
        return to_output[-1]
    last = _last_linear(gm)
    return next((s for s in sites if s.node is last), None)


def _last_linear(gm: GraphModule) -> Node | None:
    """The graph's last linear, float or lowered."""
    lowered = set(lowered_linear_ops())
    last = None
    for n in gm.graph.nodes:
        if match_linear(gm, n) is not None or n.target in lowered:
            last = n
    return last


def embedding_table(n: Node) -> torch.Tensor:
    """The table a ``get_attr``-fed ``aten.embedding`` node reads."""
    return get_attr(n.graph.owning_module, n.args[0].target)


def is_float_embedding(n: Node) -> bool:
    """An ``aten.embedding`` lookup of a float table held by the graph."""
    return (
        n.op == "call_function"
        and n.target is _EMBEDDING
        and isinstance(n.args[0], Node)
        and n.args[0].op == "get_attr"
        and embedding_table(n).is_floating_point()
    )


def lowered_head_rows(gm: GraphModule) -> int | None:
    """The output width of the graph's last linear when it is already lowered (a head
    quantized with the other linears, ``QuantConfig.skip=()``); None otherwise."""
    last = _last_linear(gm)
    li = info(last) if last is not None else None
    return li.out_features if li is not None and li.lowered and _reaches_output(last) else None


def token_embeddings(gm: GraphModule, head: LinearSite | None, vocab: int | None = None) -> list[Node]:
    """The lookups of the token embedding: float tables with one row per output of the
    (float) lm_head ``head``, tied to it or not (or with ``vocab`` rows, the width of a head
    already lowered). None without either: an encoder's or a position embedding is not a
    token embedding here."""
    if head is not None:
        vocab = get_weight(gm, head).shape[0]
    if vocab is None:
        return []
    return [n for n in gm.graph.nodes if is_float_embedding(n) and embedding_table(n).shape[0] == vocab]


__all__ = ["embedding_table", "find_lm_head", "is_float_embedding", "lowered_head_rows", "token_embeddings"]
