"""Named pipelines, as plain lists of passes built from their configs.

``qqq_w4a8`` is the method this project exists for; the others are the baselines the
accuracy benchmark compares it with. Every preset returns a fresh ``list[QQQPass]``
that users may edit (insert their own passes, drop one) before running it; each pass is
built from its config dataclass (``GPTQConfig``, ``SmoothConfig``...), so the list is
data (``[p.to_dict() for p in preset]``) and option typos fail with the valid keys.

``group_size=None`` (the default everywhere) lets every pass follow
``CompileConfig.quant.group_size``; an explicit value is passed to ``smooth``, ``gptq``
and ``quantize_rtn``. ``lower`` reads the format off each packed weight, so mixing
formats in one model is safe.
"""

from __future__ import annotations

from typing import Any

# Every built-in pass module is imported here, presets or not: a pass registers itself when
# its module runs, and a pass list given as data (``{"name": "rotate"}``) must find it.
from qqq_compile.compiler.passes.calibrate import Calibrate
from qqq_compile.compiler.passes.gptq import GPTQ, GPTQConfig
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.observe import InsertObservers
from qqq_compile.compiler.passes.quantize import QuantizeRTN, QuantizeRTNConfig
from qqq_compile.compiler.passes.rotate import Rotate, RotateConfig
from qqq_compile.compiler.passes.smooth import Smooth, SmoothConfig
from qqq_compile.compiler.pipeline import PRESETS, QQQPass, register_preset
from qqq_compile.targets import builtin  # noqa: F401 - the targets' own passes (int8_head, fuse_norm_quant)

SMOOTHING = ("qqq", "smoothquant", "awq", "qoq_down")


@register_preset("rtn")
def rtn_w4a8(
    *, group_size: int | None = None, calibrate: bool = False, rtn_options: dict[str, Any] | None = None
) -> list[QQQPass]:
    """Round-to-nearest W4 weights, dynamic per-token int8 activations
    (``rtn_options``: extra keyword arguments of ``quantize_rtn``, e.g. ``clip_search``)."""
    head: list[QQQPass] = [InsertObservers(), Calibrate()] if calibrate else []
    return [*head, _rtn(group_size, **(rtn_options or {})), Lower()]


def _rtn(group_size: int | None, **options: Any) -> QQQPass:
    return QuantizeRTN.from_config(QuantizeRTNConfig.from_dict({**options, "group_size": group_size}))


def _smooth(method: str, group_size: int | None, **options: Any) -> QQQPass:
    return Smooth.from_config(SmoothConfig.from_dict({**options, "method": method, "group_size": group_size}))


def _rotate(**options: Any) -> QQQPass:
    return Rotate.from_config(RotateConfig.from_dict(options))


def _gptq(group_size: int | None, **options: Any) -> QQQPass:
    return GPTQ.from_config(GPTQConfig.from_dict({**options, "group_size": group_size}))


@register_preset("qqq")
def qqq_w4a8(
    *,
    group_size: int | None = None,
    smoothing: str | None = "qqq",
    rotation: bool = False,
    gptq: bool = True,
    smooth_options: dict[str, Any] | None = None,
    gptq_options: dict[str, Any] | None = None,
    rotate_options: dict[str, Any] | None = None,
) -> list[QQQPass]:
    """QQQ W4A8: [rotate] → [smooth] → [gptq] → quantize_rtn (whatever is left) → lower.

    * ``group_size``: ``None`` → ``ctx.quant.group_size``; -1 per-channel; e.g. 128.
    * ``smoothing``: ``"qqq"`` (adaptive threshold search, the paper's), ``"smoothquant"``,
      ``"awq"``, ``"qoq_down"`` (after rotation: only the MLP output projections, α
      searched on their W4A8 output error; needs ``online_down_proj=False``) or ``None``.
    * ``rotation``: a Hadamard rotation of the residual stream first (QuaRot-style).
    * ``gptq``: GPTQ weights (else round-to-nearest).
    * ``smooth_options`` / ``gptq_options`` / ``rotate_options``: extra keyword arguments
      for those passes (e.g. ``rotate_options={"head_rotation": True, "online_down_proj": False}``).
    """
    if smoothing is not None and smoothing not in SMOOTHING:
        raise ValueError(f"smoothing={smoothing!r} is not known; use one of {SMOOTHING} or None")
    if rotate_options and not rotation:
        raise ValueError("rotate_options were given but rotation=False; pass rotation=True to use them")
    passes: list[QQQPass] = []
    if rotation:
        passes.append(_rotate(**(rotate_options or {})))
    if smoothing is not None:
        passes.append(_smooth(smoothing, group_size, **(smooth_options or {})))
    if gptq:
        passes.append(_gptq(group_size, **(gptq_options or {})))
    return [*passes, _rtn(group_size), Lower()]


@register_preset("smoothquant")
def smoothquant_w4a8(*, group_size: int | None = None, alpha: float = 0.5, n_grid: int = 1) -> list[QQQPass]:
    """SmoothQuant baseline: smoothing with a fixed ``alpha`` (``n_grid > 1``: searched),
    then round-to-nearest W4."""
    return [_smooth("smoothquant", group_size, alpha=alpha, n_grid=n_grid), _rtn(group_size), Lower()]


@register_preset("qqq_rot")
def qqq_rot_w4a8(
    *,
    group_size: int | None = None,
    clip_search: bool = True,
    asym: bool = True,
    online_down_proj: bool = True,
    gptq_options: dict[str, Any] | None = None,
) -> list[QQQPass]:
    """Rotation-first QQQ W4A8: a Hadamard rotation of the residual stream (and online
    before each MLP down projection), then GPTQ with a clip search on the exact final
    format and GPTAQ's asymmetric-calibration term, no smoothing: the best pipeline on
    validation windows disjoint from calibration and evaluation (``benchmarks/accuracy.py``;
    docs/RESULTS.md). The paper's smoothing pipeline is the ``qqq`` preset."""
    options = {"clip_search": clip_search, "asym": asym, **(gptq_options or {})}
    return qqq_w4a8(
        group_size=group_size,
        smoothing=None,
        rotation=True,
        gptq_options=options,
        rotate_options={"online_down_proj": online_down_proj},
    )


@register_preset("gptq")
def gptq_w4a8(*, group_size: int | None = None, **gptq_options: Any) -> list[QQQPass]:
    """GPTQ baseline: GPTQ W4 weights without smoothing, per-token int8 activations."""
    return qqq_w4a8(group_size=group_size, smoothing=None, gptq=True, gptq_options=gptq_options)


def get_preset(name: str, **options: Any) -> list[QQQPass]:
    """Build a registered preset by name (``qqq``, ``rtn``, ``smoothquant``, ``gptq``...)."""
    return PRESETS.get(name)(**options)
