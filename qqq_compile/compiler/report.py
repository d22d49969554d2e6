"""What a pipeline leaves behind: :class:`Note` s, :class:`PassRecord` s and the
:class:`Report` that holds them, plus the output metrics they use (:func:`sqnr_db`).

Plain data with no graph in it, so every layer may hold a report: the driver returns
one, a ``CompiledModel`` keeps it, artifacts store it as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Note:
    """Something a pass wants the user to know (a skipped fold, a damping retry...)."""

    pass_name: str
    message: str
    target: str | None = None
    level: str = "info"


@dataclass
class PassRecord:
    """One pass run: did it change the graph, how long it took, the output SQNR against
    the step before (when the pipeline ran a numeric check)."""

    name: str
    modified: bool
    seconds: float
    sqnr_db: float | None = None


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf for identical tensors)."""
    ref, test = ref.detach().double(), test.detach().double()
    noise = (ref - test).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(ref.pow(2).sum().item(), 1e-30) / noise)


def first_tensor(out: Any) -> torch.Tensor:
    """The main output tensor of a graph call (``.logits`` for HF outputs)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    if isinstance(out, (list, tuple)):
        return first_tensor(out[0])
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


@dataclass
class Report:
    """What a pipeline did: per-pass records, notes, the config, the pass list.

    ``pipeline`` holds the pass names; ``pass_configs`` the exact passes as data
    (``QQQPass.to_dict()``), which is what ``load()`` rebuilds.
    """

    passes: list[PassRecord] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    pipeline: list[str] = field(default_factory=list)
    pass_configs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "pipeline": self.pipeline,
            "pass_configs": self.pass_configs,
            "passes": [vars(p) for p in self.passes],
            "notes": [vars(n) for n in self.notes],
        }
