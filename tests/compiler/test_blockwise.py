"""Blockwise fallback: a model torch.export cannot capture whole is quantized block by block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qqq_compile as qc
from qqq_compile.artifact import ArtifactError
from qqq_compile.compiler.blockwise import BlockwiseCompiledModel, LoweredBlock, find_blocks
from qqq_compile.compiler.passes.calibrate import Calibrate
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.observe import InsertObservers
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.compiler.pipeline import FunctionPass, sqnr_db
from qqq_compile.graph import get_attr, linear_sites
from qqq_compile.runtime.generate import GenerationError
from tests.conftest import tiny_calib, tiny_model

W4A8 = torch.ops.qqq.w4a8_linear.default
LINEAR = torch.ops.aten.linear.default


def count(gm, op) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == op)


class Branchy(nn.Module):
    """A tiny LLaMA behind a top-level forward that branches on token values: the whole
    model cannot be exported, its decoder layers can."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_model("llama")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids).logits
        if bool((input_ids == 0).any()):  # data-dependent control flow
            logits = logits.clone()
        return logits


class ValueBranchBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.fc(h)
        if h.abs().max() > 1e4:  # untraceable: a Python branch on a tensor value
            h = h / 2
        return h


class ShapeBranchBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[1] % 2 == 0:  # specialises on the sequence length: no dynamic export
            h = h * 0.5
        return h + self.fc(h)


class Stack(nn.Module):
    def __init__(self, block: type[nn.Module], vocab: int = 64, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([block(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


@pytest.fixture(scope="module")
def compiled():
    """(float model, blockwise-compiled model, what the recording pass saw per block)."""
    torch.manual_seed(0)
    model = Branchy().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def record(gm, ctx):
        seen.append(ctx.calib[0])  # the first calibration batch of this block's graph
        return False

    passes = [FunctionPass(record), InsertObservers(), Calibrate(), QuantizeRTN(), Lower()]
    out = qc.compile(model, tiny_calib(), passes=passes, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the user's model was modified"
    return model, out, seen


def test_whole_export_fails_and_blocks_are_lowered(compiled):
    model, out, _ = compiled
    with pytest.raises(qc.CaptureError, match="data-dependent"):
        qc.compile(model, tiny_calib(2), fallback="error", progress=False)
    assert isinstance(out, BlockwiseCompiledModel)
    assert list(out.blocks) == ["lm.model.layers.0", "lm.model.layers.1"]
    for gm in out.blocks.values():
        assert count(gm, W4A8) == 7 and count(gm, LINEAR) == 0
    assert [type(m) for m in model.lm.model.layers] == [type(tiny_model("llama").model.layers[0])] * 2
    assert all(isinstance(m, LoweredBlock) for m in out.model.lm.model.layers)
    note = out.report.notes[0]
    assert note.pass_name == "blockwise" and "could not be exported" in note.message
    assert [r.name for r in out.report.passes][-1] == "lower [lm.model.layers.1]"
    # the default int8 lm_head is not run on block graphs: the head stays eager float outside them
    assert any("int8_head not applied" in n.message for n in out.report.notes)


def test_the_result_is_a_compiled_model_that_generates(compiled, tmp_path):
    """The blockwise result has CompiledModel's interface: generate() (no KV cache), and
    clear errors for what it lacks."""
    _, out, _ = compiled
    assert isinstance(out, qc.CompiledModel)
    ids = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    got = out.generate(ids, max_new_tokens=5)
    seq = ids  # independently: greedy argmax over full forwards of the compiled model
    for _ in range(5):
        with torch.no_grad():
            seq = torch.cat([seq, out(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)
    with pytest.raises(GenerationError, match="generate one prompt"):
        out.generate(torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]]), max_new_tokens=2)
    with pytest.raises(GenerationError, match=r"call generate\(\) directly"):
        out.prepare_generation()
    with pytest.raises(qc.ArtifactError, match="cannot be saved as artifacts yet"):
        out.save(str(tmp_path / "a"))


def test_logits_match_the_float_model_at_new_shapes(compiled):
    model, out, _ = compiled
    for shape in [(2, 13), (1, 40), (5, 3)]:
        x = torch.randint(1, 256, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ref, got = model(x), out(x)
        assert got.shape == ref.shape
        assert sqnr_db(ref, got) > 15, shape  # per-channel W4A8 RTN on random weights: 16.4-19.4 dB measured


def test_block_calibrates_on_the_quantized_outputs_of_the_block_before(compiled):
    model, out, seen = compiled
    assert len(seen) == 2
    stream0, stream1 = (next(v for k, v in batch.items() if k.startswith("args")) for batch in seen)
    # The float model's inputs of layer 0 for the first calibration batch.
    rec = {}
    hook = model.lm.model.layers[0].register_forward_pre_hook(
        lambda m, a, k: rec.update(args=a, kwargs=k), with_kwargs=True
    )
    with torch.no_grad():
        model(qc.calib_batches(tiny_calib())[0]["input_ids"])
    hook.remove()
    assert torch.equal(rec["args"][0], stream0)
    with torch.no_grad():
        float1 = model.lm.model.layers[0](*rec["args"], **rec["kwargs"])
        quant1 = out.model.lm.model.layers[0](*rec["args"], **rec["kwargs"])
    assert torch.equal(stream1, quant1)  # block 1 saw block 0's W4A8 outputs ...
    assert not torch.equal(stream1, float1) and sqnr_db(float1, stream1) > 21.5  # ... not its float ones (23.4 dB)


def test_report_lists_float_linears_outside_blocks(compiled):
    _, out, _ = compiled
    lin = out.linears()
    assert [li.fqn for li in lin if li.lowered] == [
        f"lm.model.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    (head,) = [li for li in lin if not li.lowered]
    assert head.fqn == "lm.lm_head" and "outside the decoder blocks: kept in float" in head.skipped
    assert "14/15 linears lowered" in repr(out)
    with pytest.raises(ArtifactError, match="block by block.*cannot be saved"):
        out.save("/nonexistent/never-written")


def test_lowered_block_refuses_inputs_it_was_not_compiled_for(compiled):
    model, out, _ = compiled
    rec = {}
    hook = model.lm.model.layers[0].register_forward_pre_hook(
        lambda m, a, k: rec.update(args=a, kwargs=k), with_kwargs=True
    )
    with torch.no_grad():
        model(torch.randint(1, 256, (2, 8)))
    hook.remove()
    kwargs = dict(rec["kwargs"], attention_mask=torch.zeros(2, 1, 8, 8))  # a mask where None was compiled
    with pytest.raises(TypeError, match=r"layers.0 .* gets attention_mask = a tensor \[2, 1, 8, 8\] where it was None"):
        out.model.lm.model.layers[0](*rec["args"], **kwargs)


def test_untraceable_block_names_the_module_and_construct():
    torch.manual_seed(0)
    model = Stack(ValueBranchBlock).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qc.CaptureError) as err:
        qc.compile(model, tiny_calib(4, vocab=64), progress=False)
    msg = str(err.value)
    assert "could not export block layers.0 (ValueBranchBlock)" in msg
    assert "data-dependent" in msg and "if h.abs().max() > 1e4" in msg
    assert "torch.where/torch.cond" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_static_export_when_dynamic_fails():
    torch.manual_seed(0)
    model = Stack(ShapeBranchBlock).eval()
    out = qc.compile(model, tiny_calib(8, vocab=64), {"preset": "gptq"}, progress=False)  # one batch [8, 32]
    assert isinstance(out, BlockwiseCompiledModel)
    assert [gm for gm in out.blocks.values() if count(gm, W4A8) != 1] == []
    static = [n.message for n in out.report.notes if "exported with static shapes" in n.message]
    assert len(static) == 2 and static[0].startswith("layers.0: export with dynamic batch/sequence dims failed")
    x = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert sqnr_db(model(x), out(x)) > 27.5  # measured 29.4 dB
    with pytest.raises(TypeError, match=r"gets args\[0\] of shape \[2, 32, 32\] \(exported for \[8, 32, 32\] only"):
        out(x[:2])


def test_find_blocks_takes_the_largest_list_of_identical_layers():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(5)])  # more, but smaller
            self.stack = nn.ModuleList([nn.Sequential(nn.Linear(32, 32)) for _ in range(3)])
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 64))])
            self.norms = nn.ModuleList([nn.LayerNorm(256) for _ in range(4)])  # no linears

    assert find_blocks(Model()) == ("stack", ["stack.0", "stack.1", "stack.2"])
    with pytest.raises(qc.CaptureError, match="found no decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_unknown_fallback_is_refused():
    with pytest.raises(ValueError, match="fallback='blocks' is not known"):
        qc.compile(tiny_model("llama"), tiny_calib(2), fallback="blocks")


def test_blocks_run_the_same_driver_as_the_whole_model_path():
    """Issue #10: the blockwise path built its own pass list and ignored float_weight_dtype."""
    torch.manual_seed(0)
    model = Branchy().eval()
    config = {"preset": "rtn", "quant": {"float_weight_dtype": "bfloat16", "skip": ["*.mlp.down_proj", "*lm_head"]}}
    out = qc.compile(model, tiny_calib(2), config, progress=False)
    assert isinstance(out, BlockwiseCompiledModel)
    assert out.report.pipeline == ["quantize_rtn", "lower", "cast_float"]
    assert [s["name"] for s in out.report.pass_configs] == out.report.pipeline
    for name, gm in out.blocks.items():
        down = next(s for s in linear_sites(gm) if s.name.endswith("mlp.down_proj"))
        assert get_attr(gm, down.weight.target).dtype == torch.bfloat16, name  # kept in float, stored in bf16
        assert count(gm, W4A8) == 6
    x = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert out(x).dtype == torch.float32 and sqnr_db(model(x), out(x)) > 15  # measured 16.6 dB
