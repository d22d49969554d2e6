"""Fixtures for the inspection tests: one tiny LLaMA compiled with the RTN preset."""

from __future__ import annotations

import pytest

import qqq_compile as qc
from tests.conftest import tiny_calib, tiny_model


@pytest.fixture(scope="session")
def rtn_llama():
    """(float model, compiled model): tiny LLaMA, RTN W4A8 per-channel, lm_head kept in float."""
    model = tiny_model("llama")
    compiled = qc.compile(model, tiny_calib(), qc.CompileConfig(preset="rtn"), progress=False)
    return model, compiled
