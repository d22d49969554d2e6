"""Generation on the real SmolLM2-135M (slow): HF parity for the float graph, cache
equivalence for the W4A8 graph. (Its weights come from a GGUF Q4_1 file.)"""

from __future__ import annotations

import pytest
import torch

import qqq_compile as qc
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.data import standard_splits
from qqq_compile.runtime.kv_cache import add_kv_cache

pytestmark = pytest.mark.slow


def test_float_graph_greedy_matches_transformers(smollm2):
    model, tok = smollm2
    ids = tok("The history of the printing press began", return_tensors="pt").input_ids
    compiled = qc.compile(model, passes=[], example_inputs={"input_ids": ids}, progress=False)
    with torch.no_grad():
        want = model.generate(
            ids, max_new_tokens=24, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=tok.eos_token_id
        )
    got = compiled.generate(ids, max_new_tokens=24, runtime="eager", eos_token_id=[])
    assert torch.equal(got, want)


def test_w4a8_cache_matches_the_full_sequence_graph(smollm2):
    model, tok = smollm2
    calib, evals = standard_splits(tok, seq_len=128, n_calib=4, n_eval=1)
    compiled = qc.compile(model, calib=calib, config=qc.CompileConfig(preset="rtn"), progress=False)
    gm = compiled.graph_module
    ids = evals[0].reshape(1, -1)[:, :96]
    cached, _ = add_kv_cache(gm, max_batch=1, max_len=128, last_logits_only=False)
    with torch.no_grad():
        full = gm(input_ids=ids).logits
        outs = [cached(ids[:, :80], torch.ones(1, 80, dtype=torch.long), torch.arange(80))]
        for i in range(80, 96):
            outs.append(cached(ids[:, i : i + 1], torch.ones(1, i + 1, dtype=torch.long), torch.tensor([i])))
        fp = model(ids).logits
    got = torch.cat(outs, 1)
    # The float graph agrees exactly (test above). With int8 activations this RTN model is
    # chaotic at the scale of one float rounding: the cache's attention kernels (the prefill
    # kernel, the one-token kernel) round differently from the full graph's SDPA, each as
    # close to float64 as SDPA (128-132 dB per layer, measured here), and the flipped int8
    # roundings grow over 30 layers: 22.8 dB between the two, where multiplying SDPA's output
    # by (1 + 1e-7·noise) alone gives 22.1 dB. So the floor is set by that control, and the
    # cache must be as close to the float model as the full graph is (6.07 vs 6.31 dB).
    assert sqnr_db(full, got) > 18
    assert sqnr_db(fp, got) > sqnr_db(fp, full) - 1


def test_saved_step_is_code_only_and_load_then_generate_compiles_nothing(smollm2, tmp_path, monkeypatch):
    from qqq_compile.runtime import steps

    model, tok = smollm2
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path / "cache"))
    calib, _ = standard_splits(tok, seq_len=128, n_calib=4, n_eval=1)
    compiled = qc.compile(model, calib=calib, config=qc.CompileConfig(preset="rtn"), progress=False)
    qc.save(compiled, tmp_path / "art", prepare_step=True, progress=False)  # one AOT compile (minutes)
    (pkg,) = (tmp_path / "art" / "step").glob("*.pt2")
    weights = (tmp_path / "art" / "model.safetensors").stat().st_size
    # Code only: measured 3.2 MB against 82 MB of weights (the bound: weights + 10 %).
    assert pkg.stat().st_size < 0.1 * weights

    def boom(*args, **kwargs):
        raise AssertionError("an AOT compile ran")

    monkeypatch.setattr(steps, "_aot_compile", boom)
    back = qc.load(tmp_path / "art")
    ids = tok("The history of the printing press began", return_tensors="pt").input_ids
    aot = back.generate(ids, max_new_tokens=16, eos_token_id=[], return_dict_in_generate=True)
    eager = back.prepare_generation(runtime="eager")
    (step,) = [s for s in back.decode_steps if s.runtime == "aot"]
    assert aot.runtime == "aot" and step.calls == 16
    seq, t = aot.sequences, ids.shape[1]

    def along(s):
        out = [s(seq[:, :t], torch.ones(1, t, dtype=torch.long), torch.arange(t))]
        for i in range(t, seq.shape[1] - 1):
            out.append(s(seq[:, i : i + 1], torch.ones(1, i + 1, dtype=torch.long), torch.tensor([i])))
        return torch.cat(out, 1)

    # Not bit-equal: Inductor orders float ops differently and 30 layers of int8 activation
    # rounding amplify that. Measured: 21.1 dB here; 22.3 dB on a 64-token wikipedia prompt
    # (24 new), where eager against itself with the prompt prefilled in two chunks gives
    # 25.0 dB. (The package with the weights inside gives bit-identical logits to this one.)
    assert sqnr_db(along(eager), along(step)) > 15
