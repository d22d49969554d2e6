"""``CompiledModel.generate``: parity with transformers, sampling, batching, EOS, bad input."""

from __future__ import annotations

import pytest
import torch

import qqq_compile as qc
from qqq_compile.runtime.generate import GenerationError, SamplingConfig, context_limit, process_logits
from tests.conftest import tiny_calib, tiny_model


def float_compiled(arch: str = "llama"):
    model = tiny_model(arch)
    return model, qc.compile(model, calib=tiny_calib(), passes=[], progress=False)


@pytest.fixture(scope="module")
def pair():
    return float_compiled("llama")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_matches_transformers_token_for_token(arch):
    model, compiled = float_compiled(arch)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    model.config.use_cache = True
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = compiled.generate(ids, max_new_tokens=20, runtime="eager", eos_token_id=[])
    assert torch.equal(got, want)


def test_sampling_is_reproducible_with_a_seed(pair):
    _, compiled = pair
    ids = torch.randint(0, 256, (1, 6))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=50, top_p=0.9, runtime="eager")
    a = compiled.generate(ids, seed=7, **kw)
    b = compiled.generate(ids, seed=7, **kw)
    c = compiled.generate(ids, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batched_left_padded_prompts_match_single_prompts(pair):
    _, compiled = pair
    g = torch.Generator().manual_seed(9)
    p1, p2 = torch.randint(1, 256, (1, 4), generator=g), torch.randint(1, 256, (1, 9), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), p1], 1), p2])
    mask = torch.tensor([[0] * 5 + [1] * 4, [1] * 9])
    both = compiled.generate(ids, mask, max_new_tokens=10, runtime="eager", eos_token_id=[])
    one = compiled.generate(p1, max_new_tokens=10, runtime="eager", eos_token_id=[])
    two = compiled.generate(p2, max_new_tokens=10, runtime="eager", eos_token_id=[])
    assert torch.equal(both[0, 5:], one[0]) and torch.equal(both[1], two[0])


def test_each_row_stops_at_its_eos_and_is_padded(pair):
    _, compiled = pair
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(11))
    free = compiled.generate(ids, max_new_tokens=8, runtime="eager", eos_token_id=[])
    eos = int(free[0, 6 + 2])  # row 0's third new token
    out = compiled.generate(ids, max_new_tokens=8, runtime="eager", eos_token_id=[eos], pad_token_id=255)
    assert int(out[0, 8]) == eos and (out[0, 9:] == 255).all()
    row1_hit = (free[1, 6:] == eos).nonzero()
    stop = int(row1_hit[0]) + 1 if len(row1_hit) else 8
    assert torch.equal(out[1, 6 : 6 + stop], free[1, 6 : 6 + stop])


def test_streamer_receives_prompt_then_every_token(pair):
    _, compiled = pair
    seen: list[torch.Tensor] = []

    class Streamer:
        ended = False

        def put(self, value):
            seen.append(value)

        def end(self):
            Streamer.ended = True

    ids = torch.randint(0, 256, (1, 5))
    out = compiled.generate(ids, max_new_tokens=6, runtime="eager", eos_token_id=[], streamer=Streamer())
    assert torch.equal(seen[0], ids) and len(seen) == 7 and Streamer.ended
    assert torch.equal(torch.cat([s.reshape(-1) for s in seen[1:]]), out[0, 5:])


def test_transformers_text_streamer_works(pair, capsys):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    from transformers import TextStreamer

    _, compiled = pair
    ids = torch.randint(0, 256, (1, 4))
    out = compiled.generate(ids, max_new_tokens=5, runtime="eager", eos_token_id=[], streamer=TextStreamer(tok))
    printed = capsys.readouterr().out
    assert tok.decode(out[0].tolist()).replace(" ", "") in printed.replace(" ", "")


def test_return_dict_reports_timings_and_runtime(pair):
    _, compiled = pair
    out = compiled.generate(
        torch.randint(0, 256, (1, 8)), max_new_tokens=4, runtime="eager", eos_token_id=[], return_dict_in_generate=True
    )
    assert out.runtime == "eager" and out.new_tokens == 4 and out.prompt_tokens == 8
    assert out.prefill_tokens_per_s > 0 and out.decode_tokens_per_s > 0
    assert any("generation runtime: eager" in n.message for n in compiled.report.notes)


def test_w4a8_generation_matches_the_w4a8_graph_greedy():
    model = tiny_model("llama")
    compiled = qc.compile(model, calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(13))
    got = compiled.generate(ids, max_new_tokens=8, runtime="eager", eos_token_id=[])
    seq = ids
    with torch.no_grad():
        for _ in range(8):  # the no-cache way: re-run the whole sequence each step
            seq = torch.cat([seq, compiled(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq)


def test_process_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits, seqs = torch.randn(3, 50, generator=g), torch.randint(0, 50, (3, 7), generator=g)
    cfg = SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    want = logits.clone()
    for proc in (
        RepetitionPenaltyLogitsProcessor(1.3),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
    ):
        want = proc(seqs, want)
    torch.testing.assert_close(process_logits(logits, seqs, cfg), want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    ],
)
def test_invalid_sampling_values_name_the_fix(pair, kwargs, match):
    _, compiled = pair
    with pytest.raises(GenerationError, match=match):
        compiled.generate(torch.randint(0, 256, (1, 4)), runtime="eager", **kwargs)


def test_request_larger_than_a_prepared_cache_is_refused(pair):
    _, compiled = pair
    compiled._steps = []  # the steps earlier tests built on demand fit everything
    compiled.prepare_generation(max_batch=1, max_len=16, runtime="eager")
    with pytest.raises(GenerationError, match=r"more than the KV cache's 16; .* prepare_generation\(max_len=20, ...\)"):
        compiled.generate(torch.randint(0, 256, (1, 10)), max_new_tokens=10)
    with pytest.raises(GenerationError, match="larger than the 1 rows the KV cache was built for"):
        compiled.generate(torch.randint(0, 256, (2, 4)), max_new_tokens=2)
    compiled._steps = []  # leave the shared fixture as it was


def test_generate_takes_the_smallest_prepared_step_that_fits(pair):
    _, compiled = pair
    compiled._steps = []
    small = compiled.prepare_generation(max_batch=1, max_len=24, runtime="eager")
    wide = compiled.prepare_generation(max_batch=2, max_len=24, runtime="eager")
    again = compiled.prepare_generation(max_batch=1, max_len=24, runtime="eager")  # replaces `small`
    try:
        assert compiled.decode_steps == [wide, again] and small not in compiled.decode_steps
        assert compiled._pick_step(1, 20, None) is again
        assert compiled._pick_step(2, 20, None) is wide
        one = compiled.generate(torch.randint(0, 256, (1, 4)), max_new_tokens=3, return_dict_in_generate=True)
        two = compiled.generate(torch.randint(0, 256, (2, 4)), max_new_tokens=3, return_dict_in_generate=True)
        assert one.sequences.shape == (1, 7) and two.sequences.shape == (2, 7)
        with pytest.raises(GenerationError, match="larger than the 2 rows"):  # the largest refuses
            compiled.generate(torch.randint(0, 256, (3, 4)), max_new_tokens=2)
    finally:
        compiled._steps = []


def test_long_prompts_are_prefilled_in_chunks_with_the_same_result(pair):
    from qqq_compile.runtime.generate import generate

    _, compiled = pair
    step = compiled.prepare_generation(max_batch=2, runtime="eager")
    calls: list[int] = []
    fn = step.fn
    step.fn = lambda ids, mask, pos, row: (calls.append(ids.shape[1]), fn(ids, mask, pos, row))[1]
    try:
        g = torch.Generator().manual_seed(17)
        short = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.randint(1, 256, (1, 63), generator=g)], 1)
        ids = torch.cat([short, torch.randint(1, 256, (1, 70), generator=g)])  # left-padded rows of 63 and 70
        mask = (ids != 0).long()
        cfg = SamplingConfig(max_new_tokens=6, eos_token_id=[])
        whole = generate(step, ids, mask, cfg, prefill_chunk=None)
        assert calls[0] == 70
        calls.clear()
        chunked = generate(step, ids, mask, cfg, prefill_chunk=16)
        assert calls[:5] == [16, 16, 16, 16, 6]  # then one call per new token
        assert torch.equal(chunked.sequences, whole.sequences)
    finally:
        compiled._steps = []


def test_generate_reuses_freed_activations_and_returns_the_same_tokens(pair, monkeypatch):
    """While ``generate`` runs, the C++ extension's allocator hands a prefill chunk's freed
    activations to the next chunk (targets/w4a8/kernels/cpu.py: AllocationReuse); the
    tokens equal a run with torch's allocator, and the allocator is removed afterwards."""
    from qqq_compile.runtime.generate import generate
    from qqq_compile.targets.w4a8.kernels import cpu

    if not cpu.cpu_supports_kernels():
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI: no C++ extension, nothing to reuse with")
    assert cpu.ensure_cpp_kernels()
    ext = cpu.loaded_extension()
    _, compiled = pair
    step = compiled.prepare_generation(max_batch=1, max_len=1040, runtime="eager")
    # 1024 tokens in two chunks: MLP activations of 640 KB, the allocator's sizes (>= 256 KB)
    ids = torch.randint(1, 256, (1, 1024), generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(max_new_tokens=4, eos_token_id=[])
    installed: list[bool] = []

    class Probe:  # a streamer: given the prompt first, then each new token inside the loop
        def put(self, _tokens: torch.Tensor) -> None:
            installed.append(bool(ext.alloc_cache_stats()[0]))

        def end(self) -> None:
            pass

    def run(cap: int) -> tuple[torch.Tensor, list[bool], int]:
        monkeypatch.setattr(cpu, "REUSE_BYTES", cap)
        installed.clear()
        reuses = ext.alloc_cache_stats()[4]
        out = generate(step, ids, None, cfg, streamer=Probe(), prefill_chunk=512)
        return out.sequences, list(installed), ext.alloc_cache_stats()[4] - reuses

    try:
        plain, installed_plain, reuses_plain = run(0)
        reused, installed_reuse, reuses = run(128 << 20)
    finally:
        compiled._steps = []
    assert len(installed_reuse) == 5 and not any(installed_plain) and all(installed_reuse[1:])
    assert not ext.alloc_cache_stats()[0]
    assert reuses_plain == 0 and reuses > 0  # the second chunk got the first one's freed blocks
    assert torch.equal(plain, reused)


def test_right_padding_and_float_ids_are_refused(pair):
    _, compiled = pair
    with pytest.raises(GenerationError, match="padding_side = 'left'"):
        compiled.generate(torch.randint(0, 256, (1, 4)), torch.tensor([[1, 1, 0, 0]]), runtime="eager")
    with pytest.raises(GenerationError, match="LongTensor"):
        compiled.generate(torch.randn(1, 4), runtime="eager")


def test_model_without_attention_cannot_generate():
    mlp = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))
    compiled = qc.compile(mlp, passes=[], example_inputs={"input": torch.randint(0, 16, (2, 4))}, progress=False)
    with pytest.raises(Exception, match="KV-cache rewrite needs|no scaled_dot_product_attention"):
        compiled.generate(torch.randint(0, 16, (1, 4)), runtime="eager")


def test_context_limit_reads_position_and_window_limits():
    assert context_limit({"max_position_embeddings": 2048}) == 2048
    assert (
        context_limit(
            {
                "max_position_embeddings": 8192,
                "sliding_window": 512,
                "layer_types": ["sliding_attention", "full_attention"],
            }
        )
        == 512
    )
    assert context_limit({"max_position_embeddings": 4096, "sliding_window": 1024, "use_sliding_window": False}) == 4096
    assert context_limit(None) is None


def test_a_saved_model_generates_the_same_tokens_after_load(tmp_path):
    model = tiny_model("llama")
    compiled = qc.compile(model, calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(21))
    want = compiled.generate(ids, max_new_tokens=10, runtime="eager", eos_token_id=[])
    compiled.save(str(tmp_path / "art"), prepare_step=False)
    again = qc.load(str(tmp_path / "art"))
    assert again.aot_dir == str(tmp_path / "art" / "step")  # compiled steps are kept beside the artifact
    assert torch.equal(again.generate(ids, max_new_tokens=10, runtime="eager", eos_token_id=[]), want)
