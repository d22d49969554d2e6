"""rotate(head_rotation=True): a head-dim Hadamard on v_proj's rows and o_proj's columns,
found from the SDPA nodes; exact (float rounding) under MHA and GQA, with biases."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from qqq_compile import CompileContext
from qqq_compile.annotations import node_annotation
from qqq_compile.compiler.block_runner import run_nodes
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.hadamard import hadamard
from qqq_compile.compiler.passes.rotate import Rotate
from qqq_compile.compiler.pipeline import first_tensor, sqnr_db
from qqq_compile.graph import get_weight, linear_sites
from qqq_compile.graph.attention import attention_heads
from tests.conftest import tiny_calib, tiny_model

EVAL = {"input_ids": torch.cat(tiny_calib(8, 32, seed=1))}
ARCHS = ["llama", "llama_mha", "qwen2", "mistral", "gemma"]  # every RMSNorm tiny model in conftest


@functools.cache
def _captured(arch: str, **cfg) -> torch.fx.GraphModule:
    return capture(tiny_model(arch, **cfg), torch.randint(0, 256, (2, 8))).graph_module


def graph(arch: str, **cfg) -> torch.fx.GraphModule:
    return copy.deepcopy(_captured(arch, **cfg))


def values(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Each v_proj's output on EVAL, by module name."""
    env = {n: EVAL[n.target] for n in gm.graph.nodes if n.op == "placeholder"}
    run_nodes(gm, [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")], env)
    return {a.value.name: env[a.value.node] for a in attention_heads(gm)[0]}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("online", [True, False])
def test_head_rotation_keeps_the_float_model_and_rotates_each_value_head(arch, online):
    gm, plain = graph(arch), graph(arch)
    ref = first_tensor(gm(**EVAL)).detach()
    found, why = attention_heads(gm)
    assert len(found) == 2 and not why, why  # one attention per decoder layer
    hd = found[0].head_dim
    ctx = CompileContext(progress=False)
    assert Rotate(online_down_proj=online, head_rotation=True)(gm, ctx).modified
    Rotate(online_down_proj=online)(plain, CompileContext(progress=False))
    out = first_tensor(gm(**EVAL))
    # float32 rounding only; measured 110-125 dB on these models (the residual rotation alone: the same)
    assert sqnr_db(ref, out) > 90, sqnr_db(ref, out)
    assert f"rotated 2 attention(s) per head: head dim {hd}" in ctx.notes[-1].message
    # v_proj's output, head by head, is the unrotated one times H: v_h' = v_h H.
    h = hadamard(hd).float()
    new, old = values(gm), values(plain)
    for name, v in new.items():
        heads = v.reshape(*v.shape[:-1], -1, hd)
        torch.testing.assert_close(heads @ h.T, old[name].reshape(heads.shape), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(v, old[name], atol=1e-2)
    roles = {s.name.rsplit(".", 1)[-1]: node_annotation(s.node).rotate for s in linear_sites(gm)}
    assert roles["v_proj"] == "reader+head_value" and roles["o_proj"] == "writer+head_output"
    assert roles["q_proj"] == "reader"  # queries and keys are left alone


def test_v_bias_is_rotated_per_head():
    gm = graph("qwen2")  # Qwen2 has q/k/v biases
    a = attention_heads(gm)[0][0]
    assert a.value.bias is not None
    ref = first_tensor(gm(**EVAL)).detach()
    with torch.no_grad():  # a bias large enough that a wrong fold would show
        b = gm.get_parameter(a.value.bias.target)
        b.copy_(torch.randn_like(b) * 3)
    ref = first_tensor(gm(**EVAL)).detach()
    Rotate(head_rotation=True)(gm, CompileContext(progress=False))
    assert sqnr_db(ref, first_tensor(gm(**EVAL))) > 90


def test_head_rotation_runs_where_the_residual_stream_cannot_be_rotated():
    gm = graph("opt")  # LayerNorm: no residual rotation; v_proj and o_proj have biases
    ref = first_tensor(gm(**EVAL)).detach()
    v0 = {s.name: get_weight(gm, s).clone() for s in linear_sites(gm)}
    ctx = CompileContext(progress=False)
    assert Rotate(head_rotation=True)(gm, ctx).modified
    assert sqnr_db(ref, first_tensor(gm(**EVAL))) > 90
    msgs = [n.message for n in ctx.notes]
    assert any("rotation skipped" in m and "LayerNorm" in m for m in msgs)
    assert "rotated 2 attention(s) per head" in msgs[-1]
    changed = {s.name.rsplit(".", 1)[-1] for s in linear_sites(gm) if not torch.equal(get_weight(gm, s), v0[s.name])}
    assert changed == {"v_proj", "out_proj"}


def test_fused_qkv_is_skipped_with_a_note():
    gm = graph("gpt2")  # c_attn computes q, k and v in one Conv1D, split afterwards
    code = gm.code
    ctx = CompileContext(progress=False)
    assert not Rotate(head_rotation=True)(gm, ctx).modified
    assert gm.code == code
    assert "head rotation skipped" in ctx.notes[-1].message and "do not come from a linear" in ctx.notes[-1].message


def test_head_dim_without_a_hadamard_is_skipped_with_a_note():
    # head dim 30 is no multiple of 4: it has no Hadamard (the residual width 120 = 60·2 has one)
    gm = graph("llama", hidden_size=120, head_dim=30)
    plain = graph("llama", hidden_size=120, head_dim=30)
    ctx = CompileContext(progress=False)
    Rotate(head_rotation=True)(gm, ctx)
    Rotate()(plain, CompileContext(progress=False))
    msg = ctx.notes[-1].message
    assert "head rotation skipped" in msg and "head dim 30 admits no Hadamard" in msg
    for s, p in zip(linear_sites(gm), linear_sites(plain), strict=True):
        assert torch.equal(get_weight(gm, s), get_weight(plain, p))


@pytest.mark.slow
def test_smollm2_head_rotation_is_float_equivalent(smollm2, wiki_splits):
    model, _ = smollm2
    x = {"input_ids": wiki_splits[1][0]}
    gm = capture(model, torch.randint(0, 1000, (2, 16))).graph_module
    ref = first_tensor(gm(**x)).detach()
    ctx = CompileContext(progress=False)
    Rotate(head_rotation=True)(gm, ctx)
    assert sqnr_db(ref, first_tensor(gm(**x))) > 60  # as the residual rotation's own SmolLM2 test
    assert "rotated 30 attention(s) per head: head dim 64 (hadamard 64)" in ctx.notes[-1].message
