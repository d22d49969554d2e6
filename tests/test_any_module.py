"""compile() takes any module torch.export takes: an MLP, a BERT encoder, a ViT, GPT-2's
Conv1D layers. Each is compiled, lowered (W4A8 kernel counts asserted), called like the
original and compared to float under a measured SQNR floor."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn
from torch.export import Dim

import qqq_compile as qc
from qqq_compile.annotations import node_annotation
from qqq_compile.compiler.passes.smooth import SmoothRecord
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.graph import linear_sites
from tests.conftest import tiny_calib, tiny_model

W4A8 = torch.ops.qqq.w4a8_linear.default
RTN = qc.CompileConfig(preset="rtn")


def count(gm, op=W4A8) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


def notes(compiled) -> str:
    return "\n".join(n.message for n in compiled.report.notes)


# ----------------------------------------------------------------------------- MLP


def test_mlp_from_float_calibration():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 512)).eval()
    out = qc.compile(mlp, calib=[torch.randn(64, 512)], config=RTN, progress=False)
    assert count(out.graph_module) == 1
    x = torch.randn(5, 512)  # another batch size: dim 0 was captured dynamic
    with torch.no_grad():
        assert sqnr_db(mlp(x), out(x)) > 22.0  # measured 23.1
    assert "dynamic dims: input [s" in notes(out)


def test_mlp_from_example_inputs_alone():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 512)).eval()
    out = qc.compile(mlp, example_inputs=(torch.randn(64, 512),), config=RTN, progress=False)
    assert count(out.graph_module) == 1
    x = torch.randn(3, 512)
    with torch.no_grad():
        assert sqnr_db(mlp(x), out(x)) > 22.0  # measured 23.2
        torch.testing.assert_close(out(input=x), out(x))  # by keyword too


def ln_gelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    with torch.no_grad():  # a LayerNorm with a real bias, and outlier channels for smoothing to find
        mlp[0].weight.uniform_(0.5, 1.5)
        mlp[0].bias.normal_(0, 0.5)
        mlp[0].weight[:4] *= 12
    return mlp


def test_ln_gelu_mlp_qqq_smooths_into_layernorm_and_explains_the_gelu():
    mlp = ln_gelu_mlp()
    calib = [torch.randn(128, 256) for _ in range(4)]
    out = qc.compile(mlp, calib=calib, config=qc.CompileConfig(preset="qqq"), progress=False)  # smooth + gptq
    assert count(out.graph_module) == 2
    anns = [node_annotation(n) for n in out.graph_module.graph.nodes]
    rec = {a.linear.fqn: a.smooth for a in anns if a.linear is not None}
    assert isinstance(rec["1"], SmoothRecord) and rec["1"].param is not None  # LayerNorm → linear 1
    assert "3: its producer 1 does not qualify" in notes(out) and "gelu" in notes(out)
    rtn = qc.compile(mlp, calib=calib, config=RTN, progress=False)
    x = torch.randn(32, 256)
    with torch.no_grad():
        ref = mlp(x)
        s_qqq, s_rtn = sqnr_db(ref, out(x)), sqnr_db(ref, rtn(x))
    assert s_qqq > 20.0  # measured 20.9
    assert s_qqq > s_rtn  # measured 20.9 vs 19.5


def test_positional_and_keyword_inputs():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x, mask=None):
            return self.fc(x) * mask

    torch.manual_seed(0)
    model = Masked().eval()
    x, m = torch.randn(8, 64), (torch.rand(8, 64) > 0.2).float()
    calib = [((torch.randn(8, 64),), {"mask": torch.ones(8, 64)}) for _ in range(2)]
    out = qc.compile(model, calib=calib, config=RTN, progress=False)
    assert out.input_names == ["x", "mask"] and count(out.graph_module) == 1
    with torch.no_grad():
        assert sqnr_db(model(x, mask=m), out(x, mask=m)) > 22.5  # measured 23.5
        torch.testing.assert_close(out(x, m), out(x, mask=m))


def test_dynamic_shapes_in_torch_export_format():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64)).eval()
    x = torch.randn(4, 64)
    out = qc.compile(mlp, example_inputs=(x,), dynamic_shapes=({0: Dim("rows")},), config=RTN, progress=False)
    with torch.no_grad():
        assert out(torch.randn(9, 64)).shape == (9, 64)
    static = qc.compile(mlp, example_inputs=(x,), dynamic_shapes={"input": None}, config=RTN, progress=False)
    assert "static shapes" in notes(static)
    (ph,) = [n for n in static.graph_module.graph.nodes if n.op == "placeholder"]
    assert tuple(ph.meta["val"].shape) == (4, 64)


class FixedBatch(nn.Module):
    """Reshapes with a hard-coded batch of 4: export cannot keep dim 0 dynamic."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x).reshape(4, 2, 16)


def test_batch_dim_that_cannot_be_dynamic_is_captured_static():
    out = qc.compile(FixedBatch().eval(), calib=[torch.randn(4, 2, 16)], config=RTN, progress=False)
    assert "static shapes" in notes(out) and count(out.graph_module) == 1
    with pytest.raises(ValueError, match=r"has shape \[3, 2, 16\], but the graph takes \[4, 2, 16\]"):
        qc.compile(FixedBatch().eval(), calib=[torch.randn(4, 2, 16), torch.randn(3, 2, 16)], progress=False)


# ----------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    return tf.BertModel(cfg).eval()


@pytest.mark.parametrize("preset,floor", [("rtn", 44.0), ("qqq", 50.5)])  # measured 45.1, 51.7
def test_bert_encoder(bert, preset, floor):
    calib = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    out = qc.compile(bert, calib=calib, config=qc.CompileConfig(preset=preset), progress=False)
    assert count(out.graph_module) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))  # new batch and length
    with torch.no_grad():
        ref, got = bert(ids), out(ids)
    assert type(got).__name__ == type(ref).__name__
    assert sqnr_db(ref.last_hidden_state, got.last_hidden_state) > floor
    if preset == "qqq":  # post-LN: the norms also feed the residual adds, so only v→o smooths
        assert "the norm output also feeds" in notes(out)
        smoothed = [li.fqn for li in out.linears() if li.smooth_group]
        assert smoothed == ["encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"]


# ----------------------------------------------------------------------------- ViT


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    cfg = tf.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    return tf.ViTForImageClassification(cfg).eval()


@pytest.mark.parametrize("preset,floor", [("rtn", 14.5), ("qqq", 19.5)])  # measured 15.3, 20.4
def test_vit_from_pixels(vit, preset, floor):
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    out = qc.compile(vit, calib=calib, config=qc.CompileConfig(preset=preset), progress=False)
    assert count(out.graph_module) == 2 * 6 + 1  # q, k, v, attention out, fc1, fc2; classifier
    px = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert sqnr_db(vit(px).logits, out(px).logits) > floor  # positional call, as the model takes it
    assert "convolution" in notes(out)  # the patch embedding stays in float, and the report says so
    if preset == "qqq":  # pre-LN: both LayerNorms (with bias) absorb smoothing; fc2 sits behind a GELU
        by_norm = [li for li in out.linears() if li.smooth_group and "norm" in li.smooth_group.split("→")[0]]
        assert len(by_norm) == 2 * 4  # q, k, v behind layernorm_before, fc1 behind layernorm_after
        assert "gelu" in notes(out)


# ----------------------------------------------------------------------------- GPT-2 Conv1D


@pytest.mark.parametrize("preset,floor", [("rtn", 19.0), ("qqq", 22.5)])  # measured 19.9, 23.4
def test_gpt2_conv1d_addmm_is_lowered(preset, floor):
    model = tiny_model("gpt2")
    captured = qc.capture(model, torch.randint(0, 256, (2, 8)))
    sites = [s for s in linear_sites(captured.graph_module) if "transformer.h" in s.name]
    assert len(sites) == 8 and all(s.node.target == torch.ops.aten.addmm.default and s.weight_t for s in sites)
    out = qc.compile(model, calib=tiny_calib(16, 32), config=qc.CompileConfig(preset=preset), progress=False)
    assert count(out.graph_module) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer; lm_head float
    assert count(out.graph_module, torch.ops.aten.addmm.default) == 0
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert sqnr_db(model(x).logits, out(x).logits) > floor
