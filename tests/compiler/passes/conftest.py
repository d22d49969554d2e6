"""The tiny LLaMA the GPTQ tests share (test_gptq, test_gptq_fast, test_gptq_levers): hidden 96
(not a multiple of the group size 64: the last group is shorter), MLP 192, eight calibration
windows in batches of four, captured once per module."""

from __future__ import annotations

import pytest

from qqq_compile import calib_batches
from qqq_compile.compiler.capture import capture
from tests.conftest import tiny_calib, tiny_model

HIDDEN, INTER = 96, 192


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", hidden_size=HIDDEN, intermediate_size=INTER)


@pytest.fixture(scope="module")
def batches():
    return calib_batches(tiny_calib(8, 64), batch_size=4)


@pytest.fixture(scope="module")
def captured(model, batches):
    return capture(model, {"input_ids": batches[0]["input_ids"][:2, :16].contiguous()}).graph_module
