"""``quantize_rtn``: round-to-nearest W4 weights, recorded as annotations."""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from ..config import check_group_size
from ..formats import PackedW4
from ..graph import ensure_info, get_weight, is_skipped, linear_sites
from ..pipeline import CompileContext, PassConfig, PassResult, QQQPass, register_pass, sqnr_db


@dataclass(frozen=True)
class QuantizeRTNConfig(PassConfig):
    """``group_size``: None follows ``ctx.quant.group_size``; -1 per channel; e.g. 128."""

    group_size: int | None = None

    def __post_init__(self) -> None:
        check_group_size(self.group_size, "QuantizeRTN(group_size)", allow_none=True)


@register_pass("quantize_rtn")
class QuantizeRTN(QQQPass):
    """Quantize every linear weight to int4 by rounding to nearest, in ``ctx.quant``'s
    format, and store the :class:`~qqq_compile.formats.PackedW4` in ``meta["qqq"]``.
    ``group_size`` None follows ``ctx.quant.group_size`` (like ``smooth`` and ``gptq``).

    Annotation only: the graph still computes in float until ``lower`` rewrites it, so
    ``modified`` is False. Position: after smoothing/rotation, before ``lower``. Linears
    that already carry a packed weight (e.g. from ``gptq``) are left alone.
    """

    name = "quantize_rtn"
    config_class = QuantizeRTNConfig
    replay_mode = "tensors"  # annotation only: the packed weights are saved tensors

    def __init__(self, group_size: int | None = None):
        super().__init__(QuantizeRTNConfig(group_size))

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
            li.packed = PackedW4.from_float(w, group_size, ctx.quant.group_scale_dtype)
            li.method = "rtn"
            li.weight_sqnr_db = sqnr_db(w, li.packed.dequantize())
        return PassResult(gm, False)
