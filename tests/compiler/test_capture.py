"""capture(): dynamic export of six architectures, names kept, errors explained."""

import pytest
import torch
from torch.export import Dim

from qqq_compile import CaptureError
from qqq_compile.compiler.capture import capture
from qqq_compile.graph import linear_sites, partition
from tests.conftest import tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gemma", "opt", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_model_at_new_shapes(arch):
    model = tiny_model(arch)
    cap = capture(model, torch.randint(0, 256, (2, 8)))
    gm = cap.graph_module
    sites = linear_sites(gm)
    # every projection + lm_head is a linear site with a qualified module name
    assert len(sites) >= 2 * 4 + 1
    assert all(s.name for s in sites)
    assert any(s.name.endswith("lm_head") for s in sites)
    # dynamic batch and sequence: run at shapes never seen at export
    for shape in [(1, 5), (3, 17)]:
        x = torch.randint(0, 256, shape)
        with torch.no_grad():
            ref, out = model(x).logits, gm(input_ids=x).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # two decoder blocks found from the module stack
    assert len(partition(gm).blocks) == 2


@pytest.mark.parametrize("example_shape", [(1, 8), (1, 1), (2, 1)])
def test_capture_from_a_single_row_or_token_example_stays_dynamic(example_shape):
    # export specialises size-1 example dims; capture widens the example instead of failing
    model = tiny_model("llama")
    gm = capture(model, torch.randint(0, 256, example_shape)).graph_module
    x = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_capture_keeps_qualified_names():
    cap = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8)))
    names = [s.name for s in linear_sites(cap.graph_module)]
    assert "model.layers.1.mlp.down_proj" in names
    assert names[0] == "model.layers.0.self_attn.q_proj"


def test_capture_leaves_model_untouched():
    model = tiny_model("llama")
    model.config.use_cache = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture(model, torch.randint(0, 256, (2, 8)))
    assert model.config.use_cache is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, input_ids):
        x = self.lin(input_ids.float())
        if x.sum() > 0:  # branches on tensor values: not exportable
            return x
        return -x


def test_untraceable_model_error_names_cause_and_way_out():
    with pytest.raises(CaptureError) as e:
        capture(DataDependent(), {"input_ids": torch.ones(2, 4)})
    msg = str(e.value)
    assert "way out" in msg and "data-dependent" in msg


def test_bad_example_inputs():
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(DataDependent(), [1, 2, 3])


@pytest.mark.slow
def test_capture_real_smollm2(smollm2):
    model, _ = smollm2
    cap = capture(model, torch.randint(0, 1000, (1, 16)))
    sites = linear_sites(cap.graph_module)
    assert len(sites) == 30 * 7 + 1
    assert len(partition(cap.graph_module).blocks) == 30
    x = torch.randint(0, 49152, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(cap.graph_module(input_ids=x).logits, model(x).logits, rtol=1e-4, atol=2e-4)


# ----------------------------------------------------------------------------- any module


def placeholder_shapes(gm):
    from qqq_compile.graph import static_size

    return {
        n.target: ["*" if static_size(d) is None else static_size(d) for d in n.meta["val"].shape]
        for n in gm.graph.nodes
        if n.op == "placeholder"
    }


@pytest.mark.parametrize(
    "example",
    [torch.randn(3, 16), (torch.randn(3, 16),), {"input": torch.randn(3, 16)}, ((torch.randn(3, 16),), {})],
)
def test_float_example_in_every_call_form_keeps_features_static(example):
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8))
    cap = capture(mlp, example)
    assert cap.input_names == ["input"]
    assert placeholder_shapes(cap.graph_module) == {"input": ["*", 16]}  # batch dynamic, features not
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(cap.graph_module(input=x), mlp(x))


def test_single_row_float_example_still_gets_a_dynamic_batch():
    cap = capture(torch.nn.Sequential(torch.nn.Linear(16, 8)), (torch.randn(1, 16),))
    assert placeholder_shapes(cap.graph_module) == {"input": ["*", 16]}


def test_user_dynamic_shapes_in_both_torch_export_forms():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x, y):
            return self.fc(x) + y

    x, y = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    seq = Dim("seq")
    as_dict = capture(Two(), (x, y), dynamic_shapes={"x": {1: seq}, "y": {1: seq}})
    as_tuple = capture(Two(), ((x,), {"y": y}), dynamic_shapes=({1: seq}, {1: seq}))
    for cap in (as_dict, as_tuple):
        assert placeholder_shapes(cap.graph_module) == {"x": [3, "*", 4], "y": [3, "*", 4]}
    with pytest.raises(CaptureError, match="one entry per input"):
        capture(Two(), (x, y), dynamic_shapes=({1: seq},))


def test_hf_encoder_sequence_is_dynamic_within_its_position_table():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    bert = tf.BertModel(cfg).eval()
    cap = capture(bert, {"input_ids": torch.randint(0, 64, (2, 8))})  # Dim("seq") unbounded would fail here
    assert placeholder_shapes(cap.graph_module) == {"input_ids": ["*", "*"]}
    x = torch.randint(0, 64, (3, 33))
    with torch.no_grad():
        torch.testing.assert_close(cap.graph_module(input_ids=x).last_hidden_state, bert(x).last_hidden_state)


def test_example_that_does_not_fit_forward_names_the_signature():
    with pytest.raises(CaptureError, match=r"do not match Sequential.forward\(input\)"):
        capture(torch.nn.Sequential(torch.nn.Linear(2, 2)), (torch.randn(2, 2), torch.randn(2, 2)))

    class PosOnly(torch.nn.Module):
        def forward(self, x, /):
            return x

    with pytest.raises(CaptureError, match="positionally only"):
        capture(PosOnly(), (torch.randn(2, 2),))
