"""``gguf_check``: fail before any work when a linear cannot be stored in Q4_0 blocks."""

from __future__ import annotations

from torch.fx import GraphModule

from qqq_compile.compiler.pipeline import CompileContext, PassResult, QQQPass, register_pass
from qqq_compile.errors import ConfigError
from qqq_compile.graph import get_weight, is_skipped, linear_sites
from qqq_compile.targets.gguf.formats import QK


@register_pass("gguf_check")
class GGUFCheck(QQQPass):
    """Raise :class:`ConfigError` naming every linear whose input width ``K`` is not a multiple
    of 32 (Q4_0 and Q8_0 rows are blocks of 32 values; llama.cpp has no partial block).
    Linears kept in float (``QuantConfig.skip``) are exempt: they are written as F32.
    The GGUF target puts it first in every pass list (:meth:`GGUF.adapt_passes`), so the
    error comes before calibration, not after it. Changes nothing."""

    name = "gguf_check"
    replay_mode = "rerun"

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        bad = []
        for site in linear_sites(graph_module):
            k = get_weight(graph_module, site).shape[1]
            if k % QK and not is_skipped(site.name, ctx.quant.skip):
                bad.append(f"{site.name} (K={k})")
        if bad:
            raise ConfigError(
                f"target 'gguf' stores weights in llama.cpp's Q4_0 blocks of {QK} input values, and "
                f"{len(bad)} linear(s) have an input width that is not a multiple of {QK}: {', '.join(bad[:8])}"
                f"{' ...' if len(bad) > 8 else ''}. Keep them in float with QuantConfig.skip, or use --target w4a8"
            )
        return PassResult(graph_module, False)
