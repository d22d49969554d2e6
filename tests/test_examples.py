"""The examples run and do what they say."""

import runpy
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_custom_pass_example_keeps_last_mlp_float():
    compiled = runpy.run_path(str(EXAMPLES / "custom_pass.py"))["main"]()
    status = {li.fqn: li.lowered for li in compiled.linears()}
    assert status["model.layers.1.mlp.down_proj"] is False
    assert status["model.layers.1.self_attn.q_proj"] is True
    assert status["model.layers.0.mlp.down_proj"] is True
    assert "keep_last_mlp_float" in compiled.report.pipeline
    ops = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.qqq.w4a8_linear.default) == 14 - 3
