"""Config dataclasses: round-trip to dict/JSON and reject unknown keys."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qqq_compile.errors import ConfigError

T = TypeVar("T", bound="ConfigBase")

__all__ = ["CalibConfig", "CompileConfig", "ConfigBase", "ConfigError", "QuantConfig", "check_group_size"]


class ConfigBase:
    """Mixin for config dataclasses: ``to_dict``/``from_dict``/``to_json``/``from_json``.

    ``from_dict`` rejects keys the dataclass does not declare (a typo in a config file
    must not be silently ignored) and rebuilds nested config dataclasses.
    """

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, ConfigBase) else _plain(v)
        return out

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} for {cls.__name__}; valid keys are {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in d.items():
            sub = _config_type(hints.get(k))
            if sub is not None and isinstance(v, dict):
                v = sub.from_dict(v)
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[T], s: str) -> T:
        return cls.from_dict(json.loads(s))

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _config_type(hint: Any) -> type[ConfigBase] | None:
    """The ConfigBase subclass inside a hint like ``SmoothConfig | None``."""
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for a in typing.get_args(hint):
            if isinstance(a, type) and issubclass(a, ConfigBase):
                return a
    return None


def check_group_size(group_size: int | None, owner: str = "group_size", allow_none: bool = False) -> None:
    """The one group-size rule: -1 (per output channel) or a positive even number (two
    int4 codes per byte never straddle a group); None where the caller allows "inherit"."""
    if group_size is None and allow_none:
        return
    if not isinstance(group_size, int) or group_size == 0 or group_size < -1 or (group_size > 0 and group_size % 2):
        what = "None, -1" if allow_none else "-1"
        raise ConfigError(f"{owner} must be {what} (per channel) or a positive even number, got {group_size}")


@dataclass(frozen=True)
class QuantConfig(ConfigBase):
    """The deployed weight format: what every quantizing pass and the lowering agree on.

    * ``target``: the registered target (weight format + where it runs,
      :mod:`qqq_compile.targets.registry`): ``"w4a8"`` (QQQ's packed int4 weights with
      per-token int8 activations, run by this package's kernels) or ``"gguf"`` (llama.cpp's
      Q4_0 blocks of 32 with Q8_0 activations, written as a GGUF file).
    * ``group_size``: None takes the target's default; -1 for per-output-channel int4
      scales, or e.g. 128 for QQQ's two-level group scales (W4A8); 32 for GGUF's Q4_0.
      The target checks what its format can hold.
    * ``group_scale_dtype`` (W4A8): ``"int8"`` (small-integer group scales, exact int8 GEMM)
      or ``"float16"`` (QQQ's storage; the kernel rounds ``q4 * gs`` to int8).
    * ``skip``: fnmatch patterns of linear module names kept in full precision; None takes
      the target's (``Target.default_skip``): W4A8 keeps ``lm_head`` out of the int4 GEMMs
      (``int8_head`` then stores it in 8 bits), GGUF quantizes it onto Q4_0 with the rest.
    * ``float_weight_dtype``: storage of the weights that stay in float after lowering
      (``lm_head``, embeddings): None keeps the model's dtype; ``"bfloat16"`` or
      ``"float16"`` halves their memory (the ``cast_float`` pass).
    * ``int8_head`` (default True): store the lm_head and the (tied) embedding in 8 bits and
      run the head on 8-bit weights (W4A8: the ``int8_head`` pass, a quarter of the bytes a
      decode step reads for it, for +0.5% perplexity on SmolLM2, docs/RESULTS.md). False
      keeps them in float. It applies to pass lists that lower linears (every preset); a
      list without ``lower`` (``passes=[]``) keeps the float head.
    """

    target: str = "w4a8"
    group_size: int | None = None
    group_scale_dtype: str = "int8"
    skip: tuple[str, ...] | None = None
    float_weight_dtype: str | None = None
    int8_head: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise ConfigError(f"target must be a target name such as 'w4a8' or 'gguf', got {self.target!r}")
        if self.float_weight_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(
                f"float_weight_dtype must be None, 'bfloat16' or 'float16', got {self.float_weight_dtype!r}"
            )
        check_group_size(self.group_size, allow_none=True)
        if self.group_scale_dtype not in ("int8", "float16"):
            raise ConfigError(f"group_scale_dtype must be 'int8' or 'float16', got {self.group_scale_dtype!r}")


@dataclass(frozen=True)
class CalibConfig(ConfigBase):
    """How calibration data is batched when a pass runs the graph: ``batch_size`` windows
    per batch (None: sized to the model, ``compiler.calibration.auto_batch_size``), at most
    ``max_samples`` windows."""

    batch_size: int | None = None
    max_samples: int | None = None


#: The preset ``compile()``, the CLI and ``make demo`` use unless told otherwise: the
#: rotation-first ``qqq_rot`` (rotation, GPTQ with clip search and GPTAQ, no smoothing),
#: chosen on validation windows disjoint from calibration and evaluation
#: (``benchmarks/accuracy.py``, docs/RESULTS.md). The paper's smoothing pipeline is ``qqq``.
#:
#: The default weight format is the target's (``Target.default_group_size``), chosen by one
#: rule: the most accurate format (val/eval/lee perplexity on SmolLM2, 128 windows) whose
#: decode speed is within 10% of the fastest format's, both end to end on SmolLM2
#: (``benchmarks/generate_speed.py``) and in the layer GEMVs at the median of the real-model
#: widths (``benchmarks/format_speed.py``: 896 ... 18944, where decode is GEMV-bound).
#: Measured for W4A8 (docs/RESULTS.md, "The default format"): groups of 128 with two-level
#: scales (g64 is more accurate but its GEMVs cost 1.21x per-channel's at the median width).
DEFAULT_PRESET = "qqq_rot"


@dataclass(frozen=True)
class CompileConfig(ConfigBase):
    """Top-level config for :func:`qqq_compile.compile`."""

    preset: str = DEFAULT_PRESET
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    preset_options: dict[str, Any] = field(default_factory=dict)
