"""capture(): dynamic export of six architectures, names kept, errors explained."""

import pytest
import torch

from qqq_compile import CaptureError, capture
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
