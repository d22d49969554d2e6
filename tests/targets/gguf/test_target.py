"""The GGUF target: its config rules, the passes it adapts, and the compiled graph against an
independent reference (the Hugging Face model with decoded weights and Q8_0 inputs)."""

from __future__ import annotations

import copy

import pytest
import torch

import qqq_compile as qc
from qqq_compile.annotations import node_annotation
from qqq_compile.compiler.driver import build_passes
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.config import ConfigError, QuantConfig
from qqq_compile.graph import info
from qqq_compile.targets.gguf.formats import PackedQ4_0, PackedQ8_0, fake_quant_act
from qqq_compile.targets.registry import get_target
from tests.targets.gguf.conftest import gguf_calib, gguf_model


@pytest.mark.parametrize("group_size", [-1, 64, 128])
def test_group_size_other_than_32_is_refused(group_size):
    with pytest.raises(ConfigError, match="block of 32 input values, so group_size must be 32"):
        get_target("gguf").resolve(QuantConfig(target="gguf", group_size=group_size))


def test_compile_with_group_size_128_is_refused():
    with pytest.raises(ConfigError, match="group_size must be 32"):
        qc.compile(gguf_model(), gguf_calib(2), {"preset": "rtn", "quant": {"target": "gguf", "group_size": 128}})


def test_default_group_size_is_32():
    assert get_target("gguf").resolve(QuantConfig(target="gguf")).group_size == 32


def test_input_width_not_a_multiple_of_32_names_the_layer():
    model = gguf_model(intermediate_size=72)  # down_proj reads 72 = 2 blocks + 8
    with pytest.raises(Exception, match=r"not a multiple of 32: model\.layers\.0\.mlp\.down_proj \(K=72\)") as e:
        qc.compile(model, gguf_calib(2), {"quant": {"target": "gguf"}}, progress=False)
    assert "gguf_check" in str(e.value)  # the first pass: before any calibration work


def test_pass_list_is_adapted_for_llamacpp():
    notes: list[str] = []
    passes = build_passes({"quant": {"target": "gguf"}}, notes=notes)  # the default preset, qqq_rot
    names = [p.name for p in passes]
    assert names[0] == "gguf_check" and names[-1] == "gguf_head"
    rotate = passes[names.index("rotate")]
    assert rotate.online_down_proj is False and any("online Hadamard" in n for n in notes)
    head = passes[-1]
    assert (head.head, head.embedding) == ("q8_0", "q4_0")
    floats = build_passes({"quant": {"target": "gguf", "int8_head": False}})
    assert (floats[-1].head, floats[-1].embedding) == ("f16", "f16")


def reference_logits(model: torch.nn.Module, compiled, ids: torch.Tensor) -> torch.Tensor:
    """The Hugging Face model run as llama.cpp runs the file: each linear's weight (the head's
    too, when it was quantized with them) replaced by what its packed Q4_0 weight decodes to
    and its input by Q8_0 blocks; a head kept in float by its Q8_0 table with Q8_0 inputs; the
    embedding by its table's decoded rows. Built from the model's own modules, not from the
    compiled graph."""
    m = copy.deepcopy(model)
    gm = compiled.graph_module
    packed = {info(n).fqn: info(n).packed for n in gm.graph.nodes if info(n) is not None and info(n).packed}
    buffers = dict(gm.named_buffers())

    tables = {a["replaced"]: a for n in gm.graph.nodes if (a := node_annotation(n).int8_head)}

    def table(role: str) -> torch.Tensor:  # the gguf_head pass's table of the head or the embedding
        qs, d = buffers[tables[role]["qs"]], buffers[tables[role]["d"]]
        fmt = {"q8_0": PackedQ8_0, "q4_0": PackedQ4_0}[tables[role]["format"]]
        return fmt(qs, d, compiled.model_config["hidden_size"]).dequantize()

    def quant_input(mod, args):
        return (fake_quant_act(args[0]),)

    with torch.no_grad():
        for name, mod in m.named_modules():
            if name in packed:
                assert isinstance(packed[name], PackedQ4_0)
                mod.weight = torch.nn.Parameter(packed[name].dequantize())  # a new tensor: unties a tied head
                mod.register_forward_pre_hook(quant_input)
        m.model.embed_tokens.weight = torch.nn.Parameter(table("embedding"))
        if "linear" in tables:
            tied = tables["linear"]["qs"] == tables["embedding"]["qs"]
            assert tied == model.config.tie_word_embeddings
            m.lm_head.weight = torch.nn.Parameter(table("linear"))
            m.lm_head.register_forward_pre_hook(quant_input)
        else:
            assert "lm_head" in packed
        return m(ids).logits


@pytest.mark.parametrize(
    "arch, tied, skip",
    [("llama", False, None), ("llama", True, None), ("llama", True, ["lm_head"]), ("qwen2", True, None)],
)
def test_compiled_graph_computes_llamacpps_numerics(arch, tied, skip):
    model = gguf_model(arch, tie_word_embeddings=tied)
    cfg = {"preset": "rtn", "quant": {"target": "gguf", "skip": skip}}
    compiled = qc.compile(model, gguf_calib(2), cfg, progress=False)
    ids = gguf_calib(2, 24)[1]
    with torch.no_grad():
        got = compiled(ids).logits
    ref = reference_logits(model, compiled, ids)
    # Float summation order differs (one matmul of decoded operands vs nn.Linear), and a Q8_0
    # rounding that flips on such a difference moves the next layer: measured 95-140 dB.
    assert sqnr_db(ref, got) > 80
    assert sqnr_db(model(ids).logits, got) < 60  # and it is quantized: about 25 dB here


def test_head_and_embedding_types_by_default():
    """The default quantizes the head with the other linears and stores a Q4_0 embedding (the
    file llama.cpp's Q4_0 size); a tied head kept in float keeps one Q8_0 table."""
    assert get_target("gguf").resolve(QuantConfig(target="gguf")).skip == ()
    assert get_target("w4a8").resolve(QuantConfig()).skip == ("lm_head", "*.lm_head")
    for skip, want in ((None, {"embedding": "q4_0"}), (["lm_head"], {"embedding": "q8_0", "linear": "q8_0"})):
        cfg = {"preset": "rtn", "quant": {"target": "gguf", "skip": skip}}
        compiled = qc.compile(gguf_model(tie_word_embeddings=True), gguf_calib(2), cfg, progress=False)
        nodes = compiled.graph_module.graph.nodes
        got = {a["replaced"]: a["format"] for n in nodes if (a := node_annotation(n).int8_head)}
        assert got == want
        lowered = {info(n).fqn for n in nodes if info(n) is not None and info(n).lowered}
        assert ("lm_head" in lowered) == (skip is None)


def test_artifact_round_trip(tmp_path):
    model = gguf_model("qwen2")
    compiled = qc.compile(model, gguf_calib(2), {"preset": "rtn", "quant": {"target": "gguf"}}, progress=False)
    compiled.save(str(tmp_path / "a"))
    loaded = qc.load(str(tmp_path / "a"))
    ids = gguf_calib(1, 16)[0]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, compiled(ids).logits)
    assert loaded.target.name == "gguf"
    assert {type(info(n).packed) for n in loaded.graph_module.graph.nodes if info(n) and info(n).packed} == {PackedQ4_0}


def test_a_w4a8_model_is_not_written_as_gguf(tmp_path):
    compiled = qc.compile(gguf_model(), gguf_calib(2), {"preset": "rtn"}, progress=False)
    with pytest.raises(ConfigError, match="quantize with --target gguf"):
        compiled.target.export("gguf", compiled, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
