"""``quantize_rtn``: round-to-nearest W4 weights, recorded as annotations."""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from qqq_compile.compiler.pipeline import (
    CompileContext,
    PassConfig,
    PassResult,
    QQQPass,
    register_pass,
    sqnr_db,
)
from qqq_compile.config import check_group_size
from qqq_compile.graph import ensure_info, get_weight, is_skipped, linear_sites
from qqq_compile.targets.registry import ClipSearch, check_clip


@dataclass(frozen=True)
class QuantizeRTNConfig(PassConfig):
    """``group_size``: None follows ``ctx.quant.group_size``; -1 per channel; e.g. 128.
    ``clip_search``: MSE search of the scales (``clip_grid`` ratios from 1.0 down to
    ``clip_min``) on the exact final format instead of absmax."""

    group_size: int | None = None
    clip_search: bool = False
    clip_grid: int = 11
    clip_min: float = 0.6

    def __post_init__(self) -> None:
        check_group_size(self.group_size, "QuantizeRTN(group_size)", allow_none=True)
        check_clip(self.clip_grid, self.clip_min, "QuantizeRTN")


@register_pass("quantize_rtn")
class QuantizeRTN(QQQPass):
    """Quantize every linear weight to int4 by rounding to nearest, in ``ctx.quant``'s
    target's format, and store the packed weight in ``meta["qqq"]``.
    ``group_size`` None follows ``ctx.quant.group_size`` (like ``smooth`` and ``gptq``).

    Annotation only: the graph still computes in float until ``lower`` rewrites it, so
    ``modified`` is False. Position: after smoothing/rotation, before ``lower``. Linears
    that already carry a packed weight (e.g. from ``gptq``) are left alone.
    ``clip_search`` picks each row's / group's scale by an MSE search (see
    :mod:`qqq_compile.targets.w4a8.grid`) instead of absmax.
    """

    name = "quantize_rtn"
    config_class = QuantizeRTNConfig
    replay_mode = "tensors"  # annotation only: the packed weights are saved tensors

    def __init__(
        self, group_size: int | None = None, clip_search: bool = False, clip_grid: int = 11, clip_min: float = 0.6
    ):
        super().__init__(QuantizeRTNConfig(group_size, clip_search, clip_grid, clip_min))

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        group_size = ctx.quant.group_size if self.group_size is None else self.group_size
        for site in linear_sites(gm):
            li = ensure_info(gm, site)
            if li.packed is not None or is_skipped(site.name, ctx.quant.skip):
                if li.packed is None:
                    li.skipped = li.skipped or "matches QuantConfig.skip (kept in full precision)"
                continue
            w = get_weight(gm, site).float()
            if self.clip_search:
                # Scales searched on the final format; rounding on the same Grid, so the
                # packed weight decodes exactly to what the search measured.
                grid = ctx.target.grid(w, ctx.quant, group_size, clip=ClipSearch(self.clip_grid, self.clip_min))
                li.packed = grid.pack(grid.quantize_all(w)[0])
            else:
                li.packed = ctx.target.quantize_rtn(w, ctx.quant, group_size)
            li.method = "rtn"
            li.weight_sqnr_db = sqnr_db(w, li.packed.dequantize())
        return PassResult(gm, False)
