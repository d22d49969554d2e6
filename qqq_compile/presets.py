"""Named pipelines, as plain lists of passes.

``qqq_w4a8`` is the method this project exists for; the others are the baselines the
accuracy benchmark compares it with. Every preset returns a fresh ``list[QQQPass]``
that users may edit (insert their own passes, drop one) before running it.
"""

from __future__ import annotations

from typing import Any

from .passes.calibrate import Calibrate
from .passes.lower import LowerW4A8
from .passes.observe import InsertObservers
from .passes.quantize import QuantizeRTN
from .pipeline import PRESETS, QQQPass, register_preset


@register_preset("rtn")
def rtn_w4a8(*, calibrate: bool = False) -> list[QQQPass]:
    """Round-to-nearest W4 weights, dynamic per-token int8 activations."""
    head: list[QQQPass] = [InsertObservers(), Calibrate()] if calibrate else []
    return [*head, QuantizeRTN(), LowerW4A8()]


def get_preset(name: str, **options: Any) -> list[QQQPass]:
    """Build a registered preset by name (``qqq``, ``rtn``, ``smoothquant``, ``gptq``...)."""
    return PRESETS.get(name)(**options)
