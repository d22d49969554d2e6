"""compile(): same call signature and output type; the user's model is untouched."""

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import qqq_compile as qc
from qqq_compile.compiler.pipeline import sqnr_db
from tests.conftest import tiny_calib, tiny_model


def test_compile_behaves_like_the_model():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = qc.compile(model, calib=tiny_calib(4), config=qc.CompileConfig(preset="rtn"), progress=False)
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        out, ref = compiled(x), model(x)
        out_kw = compiled(input_ids=x, attention_mask=torch.ones_like(x))
    assert isinstance(out, CausalLMOutputWithPast)
    assert out.logits.shape == ref.logits.shape
    torch.testing.assert_close(out_kw.logits, out.logits)
    assert sqnr_db(ref.logits, out.logits) > 16.5  # measured 18.1 dB (rtn, per channel)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified"
    assert compiled.report.pipeline == ["quantize_rtn", "lower", "int8_head"]  # the int8 lm_head is the default
    assert "14/14 linears lowered" in repr(compiled)  # lm_head is W8A8 now, no longer a float linear


def test_compile_with_dict_config_and_dump(tmp_path):
    model = tiny_model("qwen2")
    compiled = qc.compile(
        model,
        calib=torch.randint(0, 256, (4, 16)),
        config={"preset": "rtn", "quant": {"group_size": 32}, "preset_options": {"calibrate": True}},
        dump_dir=tmp_path,
        progress=False,
    )
    assert {li.packed.group_size for li in compiled.linears() if li.lowered} == {32}
    assert (tmp_path / "04_lower.diff").exists()


def test_padding_mask_is_refused_clearly():
    compiled = qc.compile(tiny_model("llama"), config=qc.CompileConfig(preset="rtn"), progress=False)
    x = torch.randint(0, 256, (2, 6))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    with pytest.raises(TypeError, match="attention_mask"):
        compiled(x, attention_mask=mask)


@pytest.mark.parametrize(
    "calib,err",
    [([], "empty"), ([torch.randn(1, 8)], "integer token ids"), ("wikipedia", "tokenizer")],
)
def test_bad_calibration_input(calib, err):
    with pytest.raises((ValueError, TypeError), match=err):
        qc.compile(tiny_model("llama"), calib=calib, progress=False)


def test_calib_batches_groups_equal_lengths():
    rows = [torch.zeros(1, 8, dtype=torch.long)] * 5 + [torch.zeros(1, 4, dtype=torch.long)] * 2
    batches = qc.calib_batches(rows, batch_size=2)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 8), (2, 8), (1, 8), (2, 4)]
