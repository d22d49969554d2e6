"""Graph queries shared by all passes: linear sites, norms, linear pairs, blocks, and the
per-version :class:`~qqq_compile.graph.analysis.Analysis` that computes them once.

Passes ask these questions here instead of rediscovering patterns themselves, and no
question is answered with per-model code: everything is read off the exported graph
(op targets, ``get_attr`` weights and the ``nn_module_stack`` metadata).

* :mod:`.sites`: annotations (``LinearInfo``), weights, linear sites, module names, views.
* :mod:`.norms`: RMSNorm / ``(1 + w)`` RMSNorm / LayerNorm and the linears they feed.
* :mod:`.channels`: producer → consumer linear pairs whose channels can be rescaled.
* :mod:`.blocks`: the one rule for where the decoder blocks are.
* :mod:`.analysis`: the cached analysis (``analysis(gm)``, ``invalidate(gm)``), networkx.
"""

from qqq_compile.graph.analysis import (
    Analysis,
    BlockIO,
    analysis,
    block_prefix,
    downstream_linears,
    graph_key,
    invalidate,
    linear_pairs,
    linear_sites,
    norm_groups,
    partition,
    to_networkx,
)
from qqq_compile.graph.blocks import (
    Block,
    BlockStack,
    Partition,
    block_stack,
    module_block_stack,
    partition_nodes,
)
from qqq_compile.graph.channels import LinearPair, depends_on
from qqq_compile.graph.norms import NormGroup, NormInfo, find_norm
from qqq_compile.graph.sites import (
    ASSERT_OPS,
    TRANSPARENT,
    LinearInfo,
    LinearSite,
    attr_users,
    consumers,
    ensure_info,
    get_attr,
    get_bias,
    get_weight,
    info,
    is_skipped,
    is_transparent,
    match_linear,
    module_fqn,
    module_path,
    set_attr,
    set_weight,
    static_size,
    through_transparent,
)

__all__ = [
    "ASSERT_OPS",
    "TRANSPARENT",
    "Analysis",
    "Block",
    "BlockIO",
    "BlockStack",
    "LinearInfo",
    "LinearPair",
    "LinearSite",
    "NormGroup",
    "NormInfo",
    "Partition",
    "analysis",
    "attr_users",
    "block_prefix",
    "block_stack",
    "consumers",
    "depends_on",
    "downstream_linears",
    "ensure_info",
    "find_norm",
    "get_attr",
    "get_bias",
    "get_weight",
    "graph_key",
    "info",
    "invalidate",
    "is_skipped",
    "is_transparent",
    "linear_pairs",
    "linear_sites",
    "match_linear",
    "module_block_stack",
    "module_fqn",
    "module_path",
    "norm_groups",
    "partition",
    "partition_nodes",
    "set_attr",
    "set_weight",
    "static_size",
    "through_transparent",
    "to_networkx",
]
