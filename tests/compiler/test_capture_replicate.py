"""Capture by repetition: a deep decoder exported with three blocks and the third copied is
the graph a whole-model export gives, node for node; anything that could differ refuses."""

import pytest
import torch
from torch import nn
from torch.fx import Node

from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.capture_replicate import replicable_stack
from qqq_compile.graph.sites import module_path
from tests.conftest import tiny_model

DEEP = 7


def _same_graph(a, b) -> None:
    """Node-for-node equality of two captured graphs: op, target, arguments (nodes matched in
    graph order, weights by attribute name), the module stack and the value's shape."""
    na = [n for n in a.graph.nodes if n.op != "get_attr"]
    nb = [n for n in b.graph.nodes if n.op != "get_attr"]
    assert len(na) == len(nb)
    match = dict(zip(na, nb, strict=True))

    def norm(x, mine):
        if isinstance(x, Node):
            return ("attr", x.target) if x.op == "get_attr" else ("node", mine.index(x))
        if isinstance(x, (list, tuple)):
            return type(x)(norm(y, mine) for y in x)
        if isinstance(x, dict):
            return {k: norm(v, mine) for k, v in x.items()}
        return x

    for x, y in match.items():
        assert (x.op, x.target) == (y.op, y.target), (x, y)
        assert norm((x.args, x.kwargs), na) == norm((y.args, y.kwargs), nb), (x, y)
        assert module_path(x) == module_path(y), (x, y)
        vx, vy = x.meta.get("val"), y.meta.get("val")
        if isinstance(vx, torch.Tensor):
            assert str(vx.shape) == str(vy.shape) and vx.dtype == vy.dtype, (x, y)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(pa[k] is pb[k] for k in pa)  # the model's own tensors


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "opt", "gpt2"])
def test_a_deep_model_captured_by_repetition_is_the_whole_export(arch):
    overrides = {"n_layer": DEEP} if arch == "gpt2" else {"num_hidden_layers": DEEP}
    if arch == "qwen2":  # its config lists one attention type per layer
        overrides["layer_types"] = ["full_attention"] * DEEP
    model = tiny_model(arch, **overrides)
    if arch == "gpt2":  # transformers scales by the layer index only with this flag; keep it off
        assert not model.config.scale_attn_by_inverse_layer_idx
    fast = capture(model, torch.randint(0, 256, (2, 8)))
    whole = capture(model, torch.randint(0, 256, (2, 8)), replicate_blocks=False)
    assert fast.replicated == f"blocks 0-2 of {DEEP} exported, 3-{DEEP - 1} copied from block 2"
    assert whole.replicated == ""
    _same_graph(fast.graph_module, whole.graph_module)
    for shape in [(1, 5), (3, 17)]:  # dynamic dims survive the copies
        x = torch.randint(0, 256, shape)
        with torch.no_grad():
            ref, out = model(x).logits, fast.graph_module(input_ids=x).logits
            assert torch.equal(out, whole.graph_module(input_ids=x).logits)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_the_model_is_left_as_it_was():
    model = tiny_model("llama", num_hidden_layers=DEEP)
    layers, n = model.model.layers, model.config.num_hidden_layers
    assert capture(model, torch.randint(0, 256, (2, 8))).replicated
    assert model.model.layers is layers and len(layers) == DEEP and model.config.num_hidden_layers == n


def test_a_block_that_differs_is_not_copied():
    # Block 5's attention scale differs: only its module attributes can tell (blocks 1 and 2
    # export alike), so the whole model is exported, and its graph has block 5's scale.
    model = tiny_model("llama", num_hidden_layers=DEEP)
    assert replicable_stack(model) is not None
    model.model.layers[5].self_attn.scaling *= 0.5
    assert replicable_stack(model) is None
    cap = capture(model, torch.randint(0, 256, (2, 8)))
    assert cap.replicated == ""
    x = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(cap.graph_module(input_ids=x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_hooks_mixed_layer_types_and_shallow_models_are_exported_whole():
    model = tiny_model("llama", num_hidden_layers=DEEP)
    h = model.model.layers[4].register_forward_hook(lambda m, a, o: None)
    assert replicable_stack(model) is None
    h.remove()
    assert replicable_stack(model) is not None
    model.config.layer_types = ["full_attention"] * 3 + ["sliding_attention"] * (DEEP - 3)
    assert replicable_stack(model) is None
    assert replicable_stack(tiny_model("llama", num_hidden_layers=3)) is None


class _Block(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.layer_idx = i  # an index attribute: not compared, so only the graph can tell
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.proj(x) * (self.layer_idx + 1)


class _IndexedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.layers = nn.ModuleList(_Block(i) for i in range(DEEP))
        self.head = nn.Linear(16, 64)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for b in self.layers:
            x = b(x)
        return self.head(x)


def test_a_constant_that_depends_on_the_layer_index_refuses_the_copy():
    torch.manual_seed(0)
    model = _IndexedLM().eval()
    assert replicable_stack(model) is not None  # the module attributes look alike
    cap = capture(model, torch.randint(0, 64, (2, 8)))
    assert cap.replicated == ""  # blocks 1 and 2 multiply by 2 and 3: not the same graph
    x = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(cap.graph_module(input_ids=x), model(x))


class _ScaledBlock(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.register_buffer("gain", torch.full((16,), 1.0 + i / 8), persistent=False)  # its own per block

    def forward(self, x):
        return x + self.proj(x) * self.gain


class _BufferLM(_IndexedLM):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_ScaledBlock(i) for i in range(DEEP))


def test_each_copied_block_reads_its_own_buffers():
    torch.manual_seed(0)
    model = _BufferLM().eval()
    fast = capture(model, torch.randint(0, 64, (2, 8)))
    whole = capture(model, torch.randint(0, 64, (2, 8)), replicate_blocks=False)
    assert fast.replicated
    _same_graph(fast.graph_module, whole.graph_module)
    assert fast.graph_module.state_dict().keys() == whole.graph_module.state_dict().keys()  # non-persistent kept so
    x = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        assert torch.equal(fast.graph_module(input_ids=x), whole.graph_module(input_ids=x))
        torch.testing.assert_close(fast.graph_module(input_ids=x), model(x))
