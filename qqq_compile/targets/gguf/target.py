"""The GGUF target: llama.cpp's Q4_0 weights with its Q8_0 activations, written as a GGUF file
that stock llama.cpp (and ollama, LM Studio, llama-cpp-python) runs.

llama.cpp's CPU backend already runs Q4_0 as W4A8: ``ggml_vec_dot_q4_0_q8_0`` quantizes the
activations to int8 per block of 32. So this target is a second lowering of the same
pipeline (rotation, GPTQ with its clip search and GPTAQ), on llama.cpp's exact grid
(:mod:`.grid`) and activation quantizer (:mod:`.formats`): what GPTQ optimises is what the
file holds and what llama.cpp computes. The lm_head and the token embedding get GGUF types of
their own (:mod:`.head`); the writer is :mod:`.export`.

What the format cannot hold is adapted or refused here: llama.cpp has no online Hadamard
before the FFN down projection, so ``rotate``'s ``online_down_proj`` is turned off
(:meth:`GGUF.adapt_passes`); group sizes other than Q4_0's 32 and inputs that are not
multiples of 32 are :class:`ConfigError`\\ s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

from qqq_compile.config import QuantConfig
from qqq_compile.errors import ConfigError
from qqq_compile.export import check_new_file
from qqq_compile.targets.gguf import lower
from qqq_compile.targets.gguf.check import GGUFCheck
from qqq_compile.targets.gguf.formats import QK, PackedQ4_0, fake_quant_act
from qqq_compile.targets.gguf.grid import Q4_0Grid
from qqq_compile.targets.gguf.head import GGUFHead
from qqq_compile.targets.gguf.ops import LINEAR_OPS
from qqq_compile.targets.registry import Target, register_target

#: The head and embedding types ``QuantConfig.int8_head`` selects: on (the default), a Q8_0
#: head (llama.cpp's own choice for a head whose width is no multiple of 256; it applies only
#: to a head kept in float with ``QuantConfig.skip``) and a Q4_0 embedding; off, both F16.
#: Why Q4_0 and a GPTQ'd head by default (:attr:`GGUF.default_skip`): the rotation unties the
#: head from the embedding (the final norm's weight is folded into the head only), so the file
#: holds two vocabulary tables where llama.cpp's own Q4_0 file holds one Q8_0 table. Two Q8_0
#: tables made SmolLM2's file 33% larger than llama.cpp's Q4_0; two Q4_0 tables, the head's
#: chosen by GPTQ on the calibration windows, keep it the same size (docs/gguf.md).
HEAD_DEFAULT = {"head": "q8_0", "embedding": "q4_0"}
HEAD_FLOAT = {"head": "f16", "embedding": "f16"}


@register_target
class GGUF(Target):
    name = "gguf"
    summary = "llama.cpp Q4_0 weights (blocks of 32) x Q8_0 activations, written as a GGUF file"
    default_group_size = QK
    #: The lm_head is quantized with the rest (GPTQ and clip search on the Q4_0 grid): see
    #: :data:`HEAD_DEFAULT` for why.
    default_skip = ()
    export_formats = {"gguf": "a GGUF file stock llama.cpp runs (ollama, LM Studio, llama-cpp-python)"}

    def check(self, quant: QuantConfig) -> None:
        if quant.group_size != QK:
            raise ConfigError(
                f"target 'gguf' stores llama.cpp's Q4_0: one fp16 scale per block of {QK} input values, so "
                f"group_size must be {QK} (or left unset), got {quant.group_size}"
                + (" (per channel)" if quant.group_size == -1 else "")
            )

    def grid(
        self,
        w: torch.Tensor,
        quant: QuantConfig,
        group_size: int,
        *,
        clip: Any = None,
        col_weight: torch.Tensor | None = None,
    ) -> Q4_0Grid:
        self._check_group(group_size)
        return Q4_0Grid(w, clip=clip, col_weight=col_weight)

    def quantize_rtn(self, w: torch.Tensor, quant: QuantConfig, group_size: int) -> PackedQ4_0:
        self._check_group(group_size)
        grid = Q4_0Grid(w)
        return grid.pack(grid.quantize_all(w)[0])

    def fake_quant_weight(self, w: torch.Tensor, quant: QuantConfig, group_size: int) -> torch.Tensor:
        self._check_group(group_size)
        return Q4_0Grid(w).quantize_all(w)[1].to(w.dtype)

    def fake_quant_act(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_act(x)

    @staticmethod
    def _check_group(group_size: int) -> None:
        # A pass given its own group_size (GPTQ(group_size=128)) bypasses QuantConfig's check.
        if group_size != QK:
            raise ConfigError(
                f"target 'gguf' quantizes in Q4_0 blocks of {QK}; a pass asked for group_size={group_size}"
            )

    # ---------------------------------------------------------------- lowering

    def linear_ops(self) -> tuple[Any, ...]:
        return LINEAR_OPS

    def lower_linear(self, gm: GraphModule, site: Any, li: Any) -> Node:
        return lower.lower_linear(gm, site, li)

    def config_passes(self, config: Any) -> list[Any]:
        return [GGUFHead(**(HEAD_DEFAULT if config.quant.int8_head else HEAD_FLOAT))]

    def adapt_passes(self, pass_list: list[Any]) -> tuple[list[Any], list[str]]:
        out, notes = [], []
        for p in pass_list:
            if p.name == "rotate" and getattr(p, "online_down_proj", False):
                p = type(p).from_config(p.config.replace(online_down_proj=False))
                notes.append(
                    "gguf: rotate(online_down_proj=False): llama.cpp has no online Hadamard before the FFN down "
                    "projection, so the rotation is folded into the weights only"
                )
            out.append(p)
        if any(p.name == "lower" for p in out) and not any(p.name == "gguf_check" for p in out):
            out.insert(0, GGUFCheck())
        return out, notes

    # ---------------------------------------------------------------- export

    def exporters(self) -> dict[str, Any]:
        def gguf(compiled: Any, out: Any, *, tokenizer: Any = None, overwrite: bool = False, **kw: Any) -> Any:
            from qqq_compile.targets.gguf.export import export_gguf

            check_new_file(out, overwrite)
            return export_gguf(compiled, out, tokenizer=tokenizer, overwrite=overwrite, **kw)

        return {"gguf": gguf}
