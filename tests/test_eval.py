"""Tests for qqq_compile.eval.perplexity."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from qqq_compile import eval as qeval

VOCAB = 50


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_cache=False,
    )
    return LlamaForCausalLM(config).eval()


def make_windows(n: int, t: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(1, VOCAB, (n, 1, t), generator=g)
    windows[:, :, 0] = 0  # BOS
    return list(windows)


def manual_ppl(model, windows: list[torch.Tensor]) -> float:
    """Reference: one window at a time, plain cross_entropy on the shifted logits."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w).logits[0].float()
            nll += F.cross_entropy(logits[:-1], w[0, 1:], reduction="sum").item()
            count += w.shape[1] - 1
    return math.exp(nll / count)


def test_matches_manual_cross_entropy(tiny_model) -> None:
    windows = make_windows(7, 24)
    expected = manual_ppl(tiny_model, windows)
    for batch_size in (1, 3, 8):
        got = qeval.perplexity(tiny_model, windows, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expected, rel=1e-5)
    # A random model on uniform random tokens sits near the vocabulary size.
    assert 0.5 * VOCAB < expected < 2 * VOCAB


def test_chunked_loss_equals_unchunked(tiny_model, monkeypatch) -> None:
    windows = make_windows(3, 33)
    expected = qeval.perplexity(tiny_model, windows, progress=False)
    monkeypatch.setattr(qeval, "_CHUNK_ELEMENTS", 5 * VOCAB)  # 5 positions per chunk
    assert qeval.perplexity(tiny_model, windows, progress=False) == pytest.approx(expected, rel=1e-6)


def test_output_kinds_and_lengths(tiny_model) -> None:
    windows = make_windows(4, 16) + make_windows(2, 9, seed=2)  # two lengths: batched separately
    expected = manual_ppl(tiny_model, windows)
    as_tensor = lambda ids: tiny_model(ids).logits
    as_tuple = lambda ids: (tiny_model(ids).logits,)
    as_dict = lambda ids: {"logits": tiny_model(ids).logits}
    for fn in (tiny_model, as_tensor, as_tuple, as_dict):
        assert qeval.perplexity(fn, windows, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-5)
    flat = [w[0] for w in windows]  # [T] windows are accepted too
    assert qeval.perplexity(tiny_model, flat, progress=False) == pytest.approx(expected, rel=1e-5)


def test_low_precision_logits_scored_in_float32() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(2, 10, VOCAB) * 4).to(torch.bfloat16)
    windows = [torch.randint(0, VOCAB, (1, 10)) for _ in range(2)]
    model = lambda ids: logits[: ids.shape[0]]
    nll = sum(F.cross_entropy(logits[i, :-1].float(), w[0, 1:], reduction="sum").item() for i, w in enumerate(windows))
    got = qeval.perplexity(model, windows, batch_size=2, progress=False)
    assert got == pytest.approx(math.exp(nll / 18), rel=1e-6)


def test_errors(tiny_model) -> None:
    with pytest.raises(ValueError, match="No windows"):
        qeval.perplexity(tiny_model, [], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        qeval.perplexity(tiny_model, make_windows(1, 8), batch_size=0, progress=False)
    with pytest.raises(TypeError, match="logits"):
        qeval.perplexity(lambda ids: SimpleNamespace(foo=1), make_windows(1, 8), progress=False)
    with pytest.raises(ValueError, match="Logits have shape"):
        qeval.perplexity(lambda ids: torch.zeros(1, 3, VOCAB), make_windows(1, 8), progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        qeval.perplexity(tiny_model, [torch.zeros(1, 1, dtype=torch.long)], progress=False)


@pytest.mark.slow
def test_smollm2_wikipedia_perplexity() -> None:
    """SmolLM2-135M (Q4_1-dequantized, fp32) on 2 standard eval windows (BOS + 511 tokens)."""
    from qqq_compile.data import standard_splits
    from qqq_compile.models import load_model

    model, tok = load_model("demo")
    _, evals = standard_splits(tok)
    ppl = qeval.perplexity(model, evals[:2], batch_size=2, progress=False)
    # Measured 18.83 on these 2 windows (the full 40 give 21.86). The margin allows for
    # other CPUs and library versions; a broken shift or missing BOS lands far outside.
    assert 15.0 < ppl < 25.0, ppl
