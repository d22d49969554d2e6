"""Fixtures for the inspection tests: one tiny LLaMA compiled with the RTN preset."""

from __future__ import annotations

import pytest

import qqq_compile as qc
from tests.conftest import tiny_calib, tiny_model


@pytest.fixture(scope="session")
def rtn_llama():
    """(float model, compiled model): tiny LLaMA, RTN W4A8 per-channel, lm_head kept in float."""
    model = tiny_model("llama")
    # int8_head off: the table lists the float head
    config = qc.CompileConfig(preset="rtn", quant=qc.QuantConfig(group_size=-1, int8_head=False))
    compiled = qc.compile(model, tiny_calib(), config, progress=False)
    return model, compiled
