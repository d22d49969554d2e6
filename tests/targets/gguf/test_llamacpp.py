"""The GGUF file in stock llama.cpp (llama-cpp-python: its loader, tokenizer and kernels), run in
its own environment. Skipped without it (``benchmarks/peers/setup.sh llamacpp``); failed
instead when ``QQQ_REQUIRE_LLAMACPP=1``."""

from __future__ import annotations

import pytest
import torch

import qqq_compile as qc
from qqq_compile.compiler.pipeline import sqnr_db
from tests.targets.gguf.conftest import TEXT, gguf_calib, gguf_model

# llama.cpp's logits against our graph's on the same file: the same Q4_0/Q8_0 arithmetic, but
# float sums in another order, an fp16 KV cache and its own RoPE/softmax/RMSNorm; a Q8_0
# rounding flipped by such a difference then moves the next layer. Measured on these tiny
# models: 42.7-43.8 dB (our graph vs float: 20-22 dB); the floor leaves 6 dB of margin.
FLOOR_DB = 36.0


def export(compiled, tokenizer, path):
    return compiled.target.export("gguf", compiled, path, tokenizer=tokenizer, tokenizer_pre="gpt-2")


@pytest.mark.parametrize(
    "arch, tied, preset",
    [("llama", False, "qqq_rot"), ("llama", True, "rtn"), ("qwen2", True, "qqq_rot"), ("qwen2", False, "rtn")],
)
def test_llamacpp_logits_match_our_graph(llamacpp, tokenizer, tmp_path, arch, tied, preset):
    model = gguf_model(arch, tie_word_embeddings=tied)
    compiled = qc.compile(model, gguf_calib(4), {"preset": preset, "quant": {"target": "gguf"}}, progress=False)
    path = export(compiled, tokenizer, tmp_path / "m.gguf")
    ids = tokenizer(TEXT[:300])["input_ids"][:48]
    (res,) = llamacpp(path, [{"op": "logits", "ids": ids}], n_ctx=64)
    theirs = torch.from_numpy(res["logits"])
    with torch.no_grad():
        ours = compiled(torch.tensor([ids])).logits[0]
        fp = model(torch.tensor([ids])).logits[0]
    agree = sqnr_db(ours, theirs)
    print(f"{arch} tied={tied} {preset}: llama.cpp vs ours {agree:.1f} dB; ours vs float {sqnr_db(fp, ours):.1f} dB")
    assert agree > FLOOR_DB
    assert agree > sqnr_db(fp, ours) + 10  # far closer to our graph than quantization is to float


def test_llamacpp_tokenizes_as_the_hf_tokenizer(llamacpp, tokenizer, tmp_path):
    compiled = qc.compile(gguf_model("qwen2"), gguf_calib(2), {"preset": "rtn", "quant": {"target": "gguf"}})
    path = export(compiled, tokenizer, tmp_path / "m.gguf")
    texts = ["The quick brown fox jumps over the lazy dog.", "  two  spaces, tabs\tand 123 digits!", TEXT[:200]]
    res = llamacpp(path, [{"op": "tokenize", "text": t} for t in texts], n_ctx=64)
    for t, r in zip(texts, res, strict=True):
        assert r["ids"] == tokenizer(t, add_special_tokens=False)["input_ids"], t


@pytest.mark.slow
def test_smollm2_file_in_llamacpp(llamacpp, smollm2, wiki_splits, tmp_path):
    """SmolLM2, rotated and RTN on the Q4_0 grid (GPTQ is the benchmark's business): llama.cpp
    loads the file, tokenizes like the HF tokenizer, and its greedy text is ours."""
    model, tok = smollm2
    passes = [{"name": "rotate"}, {"name": "quantize_rtn"}, {"name": "lower"}]
    compiled = qc.compile(model, wiki_splits[0][:2], {"quant": {"target": "gguf"}}, passes=passes, progress=False)
    path = compiled.target.export("gguf", compiled, tmp_path / "smollm2.gguf", tokenizer=tok)
    sentence = "The Eiffel Tower, completed in 1889, is 330 metres tall; it's Paris's most-visited monument."
    prompt = tok("Monday, Tuesday, Wednesday,")["input_ids"]
    res = llamacpp(
        path,
        [{"op": "tokenize", "text": sentence}, {"op": "generate", "ids": prompt, "n": 24}],
        n_ctx=128,
    )
    assert res[0]["ids"] == tok(sentence)["input_ids"]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):  # greedy by full forwards: the graph that was checked against llama.cpp above
            ids.append(int(compiled(torch.tensor([ids])).logits[0, -1].argmax()))
    ours = ids[len(prompt) :]
    theirs = res[1]["tokens"]
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
    print(f"llama.cpp: {res[1]['text']!r}; ours: {tok.decode(ours)!r}; first {same} tokens equal")
    assert same >= 8
    # Coherent: a 135M model quantized by RTN alone loses facts ("The capital of France is"
    # gave " a testament to the human capacity for innovation."), not the order of weekdays.
    assert "Thursday" in res[1]["text"], res[1]["text"]
