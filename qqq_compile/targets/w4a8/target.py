"""The W4A8 target: QQQ's packed int4 weights with dynamic per-token int8 activations.

Weights are symmetric int4 per output channel or in groups with two-level scales
(:mod:`.formats`), so the kernels (:mod:`.kernels`: C++ on CPU, Triton on GPU) run one int8
GEMM. The config's ``int8_head`` adds the int8 lm_head (:mod:`.int8_head`); decode steps get
their projections fused (:mod:`.fuse_linears`); the exporters write compressed-tensors
(vLLM, SGLang, transformers) and ONNX (onnxruntime).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.compiler.pipeline import CompileContext, QQQPass
from qqq_compile.config import QuantConfig
from qqq_compile.export import check_new_file
from qqq_compile.targets.registry import QuantizedInput, Target, register_target
from qqq_compile.targets.w4a8 import formats, fuse_norm_quant, lower  # noqa: F401 - registers fuse_norm_quant
from qqq_compile.targets.w4a8.calib_ops import calib_ops as kernel_overrides
from qqq_compile.targets.w4a8.fuse_hadamard import fuse_online_hadamard
from qqq_compile.targets.w4a8.fuse_linears import FuseLinears
from qqq_compile.targets.w4a8.grid import Grid
from qqq_compile.targets.w4a8.int8_head import Int8Head
from qqq_compile.targets.w4a8.kernels import ensure_cpp_kernels
from qqq_compile.targets.w4a8.kernels.cpu import aoti_c_shims
from qqq_compile.targets.w4a8.kernels.ops import LINEAR_OPS


@register_target
class W4A8(Target):
    name = "w4a8"
    summary = "int4 weights (per channel or two-level groups) x per-token int8 activations, this package's kernels"
    #: Groups of 128 with two-level scales: the format rule next to ``config.DEFAULT_PRESET``
    #: picks it (measured: docs/RESULTS.md, "The default format").
    default_group_size = 128
    export_formats = {
        "compressed-tensors": "a Hugging Face folder vLLM, SGLang and transformers load",
        "onnx": "an ONNX file for onnxruntime (MatMulNBits or int4 DequantizeLinear)",
    }

    def grid(
        self,
        w: torch.Tensor,
        quant: QuantConfig,
        group_size: int,
        *,
        clip: Any = None,
        col_weight: torch.Tensor | None = None,
    ) -> Grid:
        return Grid(w, group_size, quant.group_scale_dtype, clip=clip, col_weight=col_weight)

    def quantize_rtn(self, w: torch.Tensor, quant: QuantConfig, group_size: int) -> formats.PackedW4:
        return formats.PackedW4.from_float(w, group_size, quant.group_scale_dtype)

    def fake_quant_weight(self, w: torch.Tensor, quant: QuantConfig, group_size: int) -> torch.Tensor:
        return formats.fake_quant_weight(w, group_size, quant.group_scale_dtype)

    def fake_quant_act(self, x: torch.Tensor) -> torch.Tensor:
        return formats.fake_quant_act(x)

    def quantize_input(self, x: torch.Tensor) -> QuantizedInput:
        """Per-token symmetric int8, as the lowered ``qqq::w4a8_linear`` quantizes its input."""
        q, s = torch.ops.qqq.quantize_act(x)
        return QuantizedInput(q, s, x.dtype)

    def calib_linear(self, site: Any, packed: formats.PackedW4) -> Callable[..., Any]:
        """The lowered model's kernel (``qqq::w4a8_linear``, or ``w4a8_linear_q`` on an input
        already held as :class:`QuantizedInput`) with the node's own bias."""
        xi = site.x_index()
        w = (packed.qweight, packed.channel_scale, packed.group_scale)

        def run(*args: Any, **kwargs: Any) -> Any:
            x, bias = args[xi], site.bias_value(args, kwargs)
            if isinstance(x, QuantizedInput):
                return torch.ops.qqq.w4a8_linear_q(x.q, x.scale, *w, bias, packed.group_size, x.dtype)
            return torch.ops.qqq.w4a8_linear(x, *w, bias, packed.group_size)

        return run

    def calib_ops(self, gm: GraphModule, nodes: Sequence[Node]) -> dict[Node, Callable[..., Any]]:
        """Attention on ``attention_prefill``, the online Hadamard on ``kron_transform``
        (:mod:`.calib_ops`)."""
        return kernel_overrides(gm, nodes)

    def linear_ops(self) -> tuple[Any, ...]:
        return LINEAR_OPS

    def lower_linear(self, gm: GraphModule, site: Any, li: Any) -> Node:
        return lower.lower_linear(gm, site, li)

    def config_passes(self, config: Any) -> list[QQQPass]:
        # The int8 head and embedding (one int8 table when tied).
        return [Int8Head(embedding=True)] if config.quant.int8_head else []

    def prepare_step(self, gm: GraphModule) -> list[str]:
        ctx = CompileContext()
        FuseLinears()(gm, ctx)
        notes = [n.message for n in ctx.notes]
        if not self.load_kernels():
            notes.append("C++ W4A8 kernels unavailable: the step calls the Python kernels")
        elif fused := fuse_online_hadamard(gm):
            notes.append(f"{fused} online Hadamard transform(s) run as one C++ kernel call each")
        return notes

    def load_kernels(self) -> bool:
        return ensure_cpp_kernels()

    def aot_c_shims(self) -> dict[Any, list[str]]:
        return aoti_c_shims()

    def exporters(self) -> dict[str, Any]:
        from qqq_compile.targets.w4a8.export.compressed_tensors import export_compressed_tensors
        from qqq_compile.targets.w4a8.export.onnx import export_onnx

        def compressed_tensors(compiled: Any, out: Any, *, tokenizer: Any = None, overwrite: bool = False, **kw: Any):
            return export_compressed_tensors(compiled, out, tokenizer, overwrite=overwrite, **kw)

        def onnx(compiled: Any, out: Any, *, tokenizer: Any = None, overwrite: bool = False, **kw: Any):
            check_new_file(out, overwrite)
            return export_onnx(compiled, out, **kw)

        return {"compressed-tensors": compressed_tensors, "onnx": onnx}
