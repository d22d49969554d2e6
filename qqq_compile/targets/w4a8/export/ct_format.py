"""The compressed-tensors W4A8 format: int4 packing, single-level scales re-expressed from
our two-level ones, and the ``quantization_config`` block (what :mod:`.compressed_tensors`
writes; no graph or Hugging Face model involved here).

The layout is the one compressed-tensors 0.20 itself writes for its ``W4A8`` preset
(``ModelCompressor.compress_model`` + ``update_config``), checked tensor by tensor in
``tests/export/test_compressed_tensors.py``:

* ``format="int-quantized"`` (default; what compressed-tensors infers for int4 weights
  with int8 activations, and the only W4A8 format vLLM's ``CompressedTensorsW4A8Int``
  scheme accepts): per quantized ``nn.Linear`` ``<name>.weight`` int8 ``[N, K]`` holding
  the int4 values one per byte, and ``<name>.weight_scale`` ``[N, G]`` in the model dtype.
* ``format="pack-quantized"`` (4x smaller on disk; transformers loads it, vLLM's W4A8
  scheme does not): ``<name>.weight_packed`` int32 ``[N, ceil(K/8)]`` (eight offset-binary
  nibbles per word, element ``k`` at bits ``4*(k%8)`` of word ``k//8``),
  ``<name>.weight_scale`` and ``<name>.weight_shape`` int64 ``[2]``.

Weights are symmetric int4 with one float scale per group (``strategy: group``) or per
row (``strategy: channel``); activations are dynamic per-token symmetric int8. Our
two-level scales map onto that single level:

* per channel: ``W = s_ch * (q4 << 4)``, so ``scale = 16 * s_ch``: exact;
* int8 group scales: ``W = s_ch * (q4 * gs)``, so ``scale = s_ch * gs``: exact (up to the
  rounding of ``scale`` to the model dtype);
* fp16 group scales (QQQ's own storage): our kernels use ``W8 = round(q4 * gs)``, which
  no ``int4 * scale`` can express; the export writes ``q4`` with ``scale = s_ch * gs``,
  i.e. the weight before that rounding. The SQNR of each exported weight against ours is
  recorded in ``qqq_export.json``.

compressed-tensors requires ``K % group_size == 0`` (SmolLM2 has ``K = 576``), so groups
are split to ``gcd(group_size, K of every linear)`` columns (576 with 128 -> 64), which
expresses the same weights exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qqq_compile.compiler.report import sqnr_db
from qqq_compile.targets.w4a8.export import ExportError, QLinear
from qqq_compile.targets.w4a8.formats import PackedW4, expand_groups

CT_VERSION = "0.20.0"  # the compressed-tensors release whose writer this matches

FORMATS = ("int-quantized", "pack-quantized")


# ----------------------------------------------------------------------------- weights


def pack_int4_to_int32(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' 4-bit dense packing: int8 ``[N, K]`` in [-8, 7] -> int32 ``[N, ceil(K/8)]``.

    Each value is stored offset-binary (``q + 8``); element ``k`` of a row sits at bits
    ``4*(k % 8)`` of word ``k // 8``, padded with zeros (i.e. the value -8) past ``K``.
    """
    n, k = q.shape
    u = q.to(torch.int64) + 8
    u = torch.nn.functional.pad(u, (0, (-k) % 8)).view(n, -1, 8)
    words = (u << (4 * torch.arange(8, dtype=torch.int64))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).contiguous()


@dataclass
class CTWeight:
    """One linear in compressed-tensors form: ``W ≈ q * scale`` per group of columns."""

    q: torch.Tensor  # int8 [N, K], int4 values
    scale: torch.Tensor  # [N, G] (G = 1 for channel)
    group_size: int  # -1: channel
    exact: bool  # whether q * scale is our weight (before rounding scale to its dtype)
    sqnr_db: float  # of q * scale (scale in its written dtype) against our dequantized weight

    def dequantize(self) -> torch.Tensor:
        s = self.scale.float()
        if self.group_size > 0:
            s = expand_groups(s, self.q.shape[1], self.group_size)
        return self.q.float() * s


def to_ct_weight(p: PackedW4, group_size: int, scale_dtype: torch.dtype) -> CTWeight:
    """Re-express a packed weight with single-level scales; ``group_size`` must divide both
    K and ``p.group_size`` (or be -1 for per-channel weights)."""
    q4 = p.int4()
    if p.group_scale is None:
        step, exact = (16 * p.channel_scale.float())[:, None], True
    else:
        if group_size <= 0 or p.group_size % group_size or p.in_features % group_size:
            raise ExportError(f"group size {group_size} does not split groups of {p.group_size} over K={p.in_features}")
        step = p.channel_scale.float()[:, None] * p.group_scale.float()
        step = expand_groups(step, p.in_features, p.group_size)[:, ::group_size].contiguous()
        exact = p.group_scale.dtype == torch.int8
    w = CTWeight(q4, step.to(scale_dtype), group_size if p.group_scale is not None else -1, exact, 0.0)
    w.sqnr_db = sqnr_db(p.dequantize(), w.dequantize())
    return w


def export_group_size(linears: list[QLinear]) -> int:
    """The group size every grouped linear can be written with: ``gcd`` of our group size
    and every ``K`` (compressed-tensors needs whole groups)."""
    g = 0
    for ql in linears:
        if ql.packed.group_scale is not None:
            g = math.gcd(g, math.gcd(ql.packed.group_size, ql.packed.in_features))
    return g or -1


# ----------------------------------------------------------------------------- config


def _scheme(group_size: int, fmt: str, targets: list[str]) -> dict[str, Any]:
    return {
        "format": fmt,
        "input_activations": {
            "dynamic": True,
            "group_size": None,
            "num_bits": 8,
            "strategy": "token",
            "symmetric": True,
            "type": "int",
        },
        "output_activations": None,
        "targets": targets,
        "weights": {
            "dynamic": False,
            "group_size": group_size if group_size > 0 else None,
            "num_bits": 4,
            "strategy": "group" if group_size > 0 else "channel",
            "symmetric": True,
            "type": "int",
        },
    }


def quantization_config(schemes: dict[int, list[str]], ignore: list[str], fmt: str) -> dict:
    """The ``quantization_config`` block of config.json, key for key as compressed-tensors
    writes it. ``schemes`` maps a group size (-1: channel) to the linears written with it."""
    if len(schemes) == 1:
        groups = {"group_0": _scheme(next(iter(schemes)), fmt, ["Linear"])}
    else:  # several schemes: name the layers of each
        groups = {f"group_{i}": _scheme(g, fmt, sorted(names)) for i, (g, names) in enumerate(sorted(schemes.items()))}
    return {
        "config_groups": groups,
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
