"""Tests for qqq_compile.data: text sources, token windows and the standard splits."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from qqq_compile import data

N_WORDS = 100


def tiny_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ``<s>``=0, ``<unk>``=1, ``w{k}`` = k + 2. One word, one token."""
    vocab = {"<s>": 0, "<unk>": 1} | {f"w{k}": k + 2 for k in range(N_WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    kwargs = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kwargs)


def words(n: int) -> str:
    """A text of ``n`` tokens whose token ``i`` has id ``i % N_WORDS + 2``."""
    return " ".join(f"w{i % N_WORDS}" for i in range(n))


def ids_of(n: int) -> torch.Tensor:
    return torch.arange(n) % N_WORDS + 2


# ----------------------------------------------------------------------- token_windows


def test_tokenize_matches_tokenizer_call() -> None:
    tok = tiny_tokenizer()
    text = words(250)
    assert data.tokenize(tok, text) == tok(text, add_special_tokens=False)["input_ids"]
    assert data.tokenize(tok, text) == ids_of(250).tolist()


def test_all_windows_are_bos_plus_consecutive_chunks() -> None:
    tok = tiny_tokenizer()
    windows = data.token_windows(tok, words(100), seq_len=10, select="all")
    assert len(windows) == 100 // 9  # chunks of seq_len - 1 = 9 text tokens
    ids = ids_of(100)
    for i, w in enumerate(windows):
        assert w.shape == (1, 10) and w.dtype == torch.long
        assert w[0, 0].item() == tok.bos_token_id
        assert torch.equal(w[0, 1:], ids[9 * i : 9 * i + 9])


def test_last_and_random_select() -> None:
    tok = tiny_tokenizer()
    text = words(300)
    every = data.token_windows(tok, text, seq_len=10, select="all")
    last = data.token_windows(tok, text, seq_len=10, n=5, select="last")
    assert all(torch.equal(a, b) for a, b in zip(last, every[-5:], strict=True))

    r1 = data.token_windows(tok, text, seq_len=10, n=7, select="random", seed=3)
    r2 = data.token_windows(tok, text, seq_len=10, n=7, select="random", seed=3)
    r3 = data.token_windows(tok, text, seq_len=10, n=7, select="random", seed=4)
    assert len(r1) == 7 and all(torch.equal(a, b) for a, b in zip(r1, r2, strict=True))
    keys = {tuple(w[0].tolist()) for w in r1}
    assert len(keys) == 7  # drawn without replacement
    assert keys <= {tuple(w[0].tolist()) for w in every}
    assert keys != {tuple(w[0].tolist()) for w in r3}
    # n=None means every window, whatever the selection.
    assert len(data.token_windows(tok, text, seq_len=10, select="random")) == len(every)


def test_region_and_no_bos() -> None:
    tok = tiny_tokenizer()
    starts, body = data.window_starts(1000, 11, region=(0.25, 0.5), select="all")
    assert body == 10 and starts[0] == 250 and starts[-1] + body <= 500 and len(starts) == 25
    windows = data.token_windows(tok, words(1000), seq_len=10, region=(0.5, 1.0), select="all", add_bos=False)
    assert len(windows) == 50
    assert torch.equal(windows[0][0], ids_of(1000)[500:510])  # no BOS, seq_len text tokens


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        ("", {}, "empty"),
        ("   \n ", {}, "empty"),
        (words(5), {"seq_len": 10}, "too short"),
        (words(50), {"seq_len": 10, "region": (0.9, 1.0)}, "too short"),
        (words(50), {"seq_len": 10, "n": 6}, "only 5 windows"),
        (words(50), {"seq_len": 10, "n": 0}, "at most"),
        (words(50), {"seq_len": 1}, "too small"),
        (words(50), {"seq_len": 10, "region": (0.5, 0.5)}, "region"),
        (words(50), {"seq_len": 10, "n": 2, "select": "first"}, "select"),
    ],
)
def test_window_errors(text: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        data.token_windows(tiny_tokenizer(), text, **kwargs)


def test_tokenizer_without_bos() -> None:
    tok = tiny_tokenizer(bos=False)
    with pytest.raises(ValueError, match="no BOS token"):
        data.token_windows(tok, words(50), seq_len=10)
    assert len(data.token_windows(tok, words(50), seq_len=10, select="all", add_bos=False)) == 5


# --------------------------------------------------------------------- standard_splits


def test_standard_splits_disjoint_and_deterministic() -> None:
    tok = tiny_tokenizer()
    n_tokens = 2000
    calib, evals = data.standard_splits(tok, words(n_tokens), seq_len=16, n_calib=12, n_eval=4)
    assert len(calib) == 12 and len(evals) == 4
    assert all(w.shape == (1, 16) and w[0, 0] == tok.bos_token_id for w in calib + evals)
    # Same windows as the building blocks say, and the same again on a second call.
    every = data.token_windows(tok, words(n_tokens), seq_len=16, select="all")
    assert all(torch.equal(a, b) for a, b in zip(evals, every[-4:], strict=True))
    calib2, _ = data.standard_splits(tok, words(n_tokens), seq_len=16, n_calib=12, n_eval=4)
    assert all(torch.equal(a, b) for a, b in zip(calib, calib2, strict=True))
    # Disjointness by token offsets: every calibration window ends before the first eval token.
    eval_starts, body = data.window_starts(n_tokens, 16, n=4, select="last")
    calib_starts, _ = data.window_starts(n_tokens, 16, region=(0.0, 0.8), n=12, select="random", seed=0)
    assert max(calib_starts) + body <= int(0.8 * n_tokens) <= min(eval_starts)


def test_standard_splits_too_short_for_disjoint() -> None:
    # 100 tokens = 6 windows of 15; the last 4 windows reach into the first 80%.
    with pytest.raises(ValueError, match="too short for disjoint splits"):
        data.standard_splits(tiny_tokenizer(), words(100), seq_len=16, n_calib=2, n_eval=4)


def _spans(starts: list[int], body: int) -> list[tuple[int, int]]:
    return [(s, s + body) for s in starts]


@pytest.mark.parametrize("n_tokens", [700, 1000, 1999, 5003])
@pytest.mark.parametrize("seq_len", [8, 16, 33])
@pytest.mark.parametrize(("n_calib", "n_val", "n_eval"), [(1, 1, 1), (12, 4, 4), (20, 6, 9)])
def test_split_starts_never_share_a_token(n_tokens, seq_len, n_calib, n_val, n_eval) -> None:
    """Whatever the sizes: either a clear error, or calibration, validation and
    evaluation windows that share no token, each split inside its own range."""
    body = seq_len - 1
    c_end, v_end = int(0.8 * n_tokens), int(0.9 * n_tokens)
    fits = (
        n_tokens // body >= n_eval
        and (n_tokens // body - n_eval) * body >= v_end  # first eval window after 90%
        and c_end // body >= n_calib
        and (v_end - c_end) // body >= n_val
    )
    if not fits:
        with pytest.raises(ValueError, match="too short|only"):
            data.split_starts(n_tokens, seq_len, n_calib, n_eval, n_val, seed=1)
        return
    starts, body = data.split_starts(n_tokens, seq_len, n_calib, n_eval, n_val, seed=1)
    assert body == seq_len - 1
    assert (len(starts.calib), len(starts.val), len(starts.eval)) == (n_calib, n_val, n_eval)
    owner = {}
    for split, offsets in zip(starts._fields, starts, strict=True):
        for a, b in _spans(offsets, body):
            assert 0 <= a and b <= n_tokens
            for t in range(a, b):
                assert owner.setdefault(t, split) == split, f"token {t} is in {owner[t]} and {split}"
    assert max(starts.calib) + body <= c_end <= min(starts.val)
    assert max(starts.val) + body <= v_end <= min(starts.eval)
    # Without validation windows the calibration and evaluation offsets do not move.
    plain, _ = data.split_starts(n_tokens, seq_len, n_calib, n_eval, 0, seed=1)
    assert plain.calib == starts.calib and plain.eval == starts.eval and plain.val == []


def test_protocol_splits_match_standard_splits() -> None:
    tok = tiny_tokenizer()
    text = words(3000)
    calib, evals = data.standard_splits(tok, text, seq_len=16, n_calib=12, n_eval=4)
    splits = data.protocol_splits(tok, text, seq_len=16, n_calib=12, n_eval=4, n_val=5)
    assert all(torch.equal(a, b) for a, b in zip(calib + evals, splits.calib + splits.eval, strict=True))
    assert len(splits.val) == 5
    starts, body = data.split_starts(3000, 16, 12, 4, 5)
    ids = ids_of(3000)
    for w, s in zip(splits.val, starts.val, strict=True):
        assert w[0, 0] == tok.bos_token_id and torch.equal(w[0, 1:], ids[s : s + body])
        assert 2400 <= s and s + body <= 2700  # 80-90% of the tokens


def test_protocol_splits_errors() -> None:
    tok = tiny_tokenizer()
    # 300 tokens: the last 4 windows of 15 start at 240, inside the first 90%.
    with pytest.raises(ValueError, match="first 90% .* calibration and validation"):
        data.protocol_splits(tok, words(300), seq_len=16, n_calib=2, n_eval=4, n_val=1)
    with pytest.raises(ValueError, match="at least one validation window"):
        data.protocol_splits(tok, words(3000), seq_len=16, n_val=0)


# --------------------------------------------------------------------------- load_text


def test_load_text_file_and_folder(tmp_path) -> None:
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    assert data.load_text(tmp_path / "a.txt") == "first\n"
    assert data.load_text(str(tmp_path)) == "first\n\nsecond"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        data.load_text(empty)
    with pytest.raises(FileNotFoundError, match="neither"):
        data.load_text(tmp_path / "missing.txt")


def test_load_text_hf_without_datasets(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match="pip install datasets"):
        data.load_text("hf:wikitext:wikitext-2-raw-v1:test")
    with pytest.raises(ValueError, match="Bad dataset spec"):
        data.load_text("hf:")


def test_missing_gensim_message(monkeypatch) -> None:
    def no_gensim(name, *args, **kwargs):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a, **k: None)
    monkeypatch.setattr(data.importlib.metadata, "distribution", no_gensim)
    with pytest.raises(RuntimeError, match="pip install 'gensim>=4.3'"):
        data.wikipedia_text()


def test_clean_lee_collapses_and_dedups() -> None:
    raw = "First  story,\tone line. \n\nSecond story.\nFirst story, one line.\n  \n"
    assert data._clean_lee(raw) == "First story, one line.\n\nSecond story.\n"


def test_lee_text_clean_and_cached(tmp_path, monkeypatch) -> None:
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim not installed")
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path))
    text = data.lee_text()
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("lee-")
    assert data.load_text("lee") == text == files[0].read_text(encoding="utf-8")
    articles = text.strip().split("\n\n")
    assert len(articles) == len(set(articles)) == 293  # 300 lines, 7 exact repeats
    assert 340_000 < len(text) < 370_000
    assert "  " not in text and "\t" not in text
    assert articles[0].startswith("Hundreds of people have been forced to vacate their homes")


# ------------------------------------------------------------------- real Wikipedia text


@pytest.mark.slow
def test_wikipedia_text_clean_cached_and_deterministic(tmp_path, monkeypatch) -> None:
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim not installed")
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path))
    text = data.wikipedia_text()
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".txt"  # the cache file, no temp leftovers
    assert data.wikipedia_text() == text == files[0].read_text(encoding="utf-8")
    paragraphs = text.strip().split("\n\n")
    assert 2_200_000 < len(text) < 2_900_000 and len(paragraphs) > 4000
    assert all(len(p) >= 80 for p in paragraphs)
    for residue in ("[[", "]]", "{{", "}}", "'''", "#REDIRECT", "<ref", "thumb|"):
        assert residue not in text, residue
    assert "Anarchism is a political philosophy" in text
    assert data.load_text() == text


@pytest.mark.slow
def test_standard_splits_on_wikipedia() -> None:
    from transformers import AutoTokenizer

    from qqq_compile.models import demo_model_path

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    text = data.wikipedia_text()
    n_tokens = len(data.tokenize(tok, text))
    assert 500_000 < n_tokens < 620_000
    calib, evals = data.standard_splits(tok, text)
    assert len(calib) == 128 and len(evals) == 40
    assert all(w.shape == (1, 512) and w[0, 0] == tok.bos_token_id for w in calib + evals)
    eval_starts, body = data.window_starts(n_tokens, 512, n=40, select="last")
    calib_starts, _ = data.window_starts(n_tokens, 512, region=(0.0, 0.8), n=128, select="random", seed=0)
    assert body == 511
    assert max(calib_starts) + body <= int(0.8 * n_tokens) <= min(eval_starts)
    assert len(set(calib_starts)) == 128
