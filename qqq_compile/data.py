"""Text sources and fixed-length token windows for calibration and evaluation.

The project's standard protocol (:func:`standard_splits`): the text is the cleaned
English Wikipedia excerpt shipped in the gensim wheel (:func:`wikipedia_text`),
tokenized once without special tokens. Every window is BOS + 511 text tokens (512
total). Evaluation uses the last 40 non-overlapping windows of the whole text;
calibration draws 128 windows with seed 0 from the first 80% of the text. The two never
overlap. :func:`protocol_splits` adds the validation windows (drawn from 80-90% of the
text, for choosing methods and options) beside them; :func:`lee_text` is a second text of
another domain (news), for checking figures on text no choice was made on.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch

GENSIM_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_LEE_FILE = "lee_background.cor"
# Bump when the cleaning rules change, so stale caches are not reused.
_CLEAN_VERSION = 1
_MIN_PARAGRAPH_CHARS = 80

Select = Literal["random", "last", "all"]


def cache_root() -> Path:
    """The project's cache folder: ``$QQQ_CACHE`` if set, else ``~/.cache/qqq_compile``."""
    env = os.environ.get("QQQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qqq_compile"


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling and a rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; the cache is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- Wikipedia


def gensim_wiki_path() -> Path:
    """Path of the bz2 Wikipedia excerpt in gensim's test data (found without importing gensim)."""
    return gensim_test_data(GENSIM_WIKI_FILE)


def packaged_file(package: str, dist: str, relpath: str) -> tuple[Path | None, list[Path]]:
    """``(path, candidates)``: the file ``relpath`` inside the installed ``package`` (the
    distribution ``dist``), found without importing it (its ``__init__`` may import what is
    not installed); ``path`` is None when no candidate exists, ``candidates`` is empty when
    the package is not installed."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / relpath for p in spec.submodule_search_locations]
    if not candidates:
        # Fallback for unusual installs where find_spec fails: the wheel's file list.
        name = Path(relpath).name
        try:
            found = importlib.metadata.distribution(dist)
            candidates += [Path(found.locate_file(f)) for f in found.files or [] if f.name == name]
        except importlib.metadata.PackageNotFoundError:
            pass
    return next((c for c in candidates if c.is_file()), None), candidates


def gensim_test_data(filename: str) -> Path:
    """Path of ``filename`` in the test data of the installed gensim wheel (found without
    importing gensim)."""
    path, candidates = packaged_file("gensim", "gensim", f"test/test_data/{filename}")
    if path is not None:
        return path
    if not candidates:
        raise RuntimeError(
            f"The text {filename} ships inside the gensim wheel, and gensim is not installed. "
            "Install it with: pip install 'gensim>=4.3'"
        )
    raise RuntimeError(
        f"gensim is installed but its test data file {filename} is missing "
        f"(looked in {candidates[0].parent}). Reinstall gensim from the wheel: "
        "pip install --force-reinstall --no-deps 'gensim>=4.3'"
    )


_SKIP_FIRST = tuple("*#:;=|!{}<")  # lists, headings, tables, templates, leftover tags
_FILE_RE = re.compile(r"\.(?:jpe?g|png|svg|gif|tiff?)\b", re.IGNORECASE)  # gallery lines


def _clean_paragraph(line: str) -> str:
    line = line.replace("\xa0", " ").replace("'''", "").replace("''", "")
    line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left behind by removed templates
    line = re.sub(r"[ \t]+", " ", line)
    line = re.sub(r" ([,.;:])", r"\1", line)  # "word ," after a removed reference
    return line.strip()


def _clean_article(markup: str) -> list[str]:
    from gensim.corpora.wikicorpus import filter_wiki

    paragraphs = []
    for raw in filter_wiki(markup).split("\n"):
        raw = raw.strip()
        if not raw or raw.startswith(_SKIP_FIRST) or _FILE_RE.search(raw):
            continue
        line = _clean_paragraph(raw)
        # Short lines are captions, table cells and list residue, not prose.
        if len(line) >= _MIN_PARAGRAPH_CHARS:
            paragraphs.append(line)
    return paragraphs


def _build_wikipedia_text(source: Path) -> str:
    try:
        from gensim.corpora.wikicorpus import extract_pages
    except ImportError as exc:
        raise RuntimeError(
            f"Cleaning the Wikipedia text needs gensim's wikicorpus helpers, which failed to import "
            f"({exc}). Install gensim and its dependencies: pip install 'gensim>=4.3'"
        ) from exc
    from tqdm.auto import tqdm

    with bz2.open(source, "rb") as f:
        pages = [(title, text) for title, text, _ in extract_pages(f, filter_namespaces=("0",))]
    articles = []
    for _title, markup in tqdm(pages, desc="Cleaning Wikipedia", unit="page", leave=False):
        if not markup or markup.lstrip().lower().startswith("#redirect"):
            continue
        paragraphs = _clean_article(markup)
        if paragraphs:
            articles.append("\n\n".join(paragraphs))
    return "\n\n".join(articles) + "\n"


def wikipedia_text() -> str:
    """Cleaned prose of the English Wikipedia excerpt shipped in the gensim wheel.

    About 100 articles, 2.5 MB, about 560k SmolLM2 tokens: redirects, markup, headings,
    lists, tables and lines under 80 characters are dropped; paragraphs are separated by
    blank lines. Deterministic; cached under :func:`cache_root` after the first call.
    """
    source = gensim_wiki_path()
    digest = hashlib.sha256(f"{source.stat().st_size}:{_CLEAN_VERSION}".encode()).hexdigest()[:12]
    cached = cache_root() / f"wikipedia-gensim-clean-v{_CLEAN_VERSION}-{digest}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = _build_wikipedia_text(source)
    _atomic_write_text(cached, text)
    return text


# --------------------------------------------------------------------------- Lee news

# Bump when the cleaning rules of the Lee text change.
_LEE_CLEAN_VERSION = 1


def _clean_lee(raw: str) -> str:
    """One news article a line -> articles separated by blank lines, whitespace runs
    collapsed, exact duplicate articles (7 of 300) dropped, keeping the first."""
    seen: set[str] = set()
    articles = []
    for line in raw.splitlines():
        article = re.sub(r"\s+", " ", line).strip()
        if article and article not in seen:
            seen.add(article)
            articles.append(article)
    return "\n\n".join(articles) + "\n"


def lee_text() -> str:
    """The Lee news corpus of gensim's test data (``lee_background.cor``): 293 distinct
    Australian news articles (ABC), about 360 KB and 74k SmolLM2 tokens.

    A second text of another domain than the Wikipedia excerpt: the accuracy benchmark
    reports it for every row and never uses it for a choice. Cached under
    :func:`cache_root` after the first call, like :func:`wikipedia_text`.
    """
    source = gensim_test_data(GENSIM_LEE_FILE)
    digest = hashlib.sha256(f"{source.stat().st_size}:{_LEE_CLEAN_VERSION}".encode()).hexdigest()[:12]
    cached = cache_root() / f"lee-gensim-clean-v{_LEE_CLEAN_VERSION}-{digest}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = _clean_lee(source.read_text(encoding="utf-8"))
    _atomic_write_text(cached, text)
    return text


# ------------------------------------------------------------------------- load_text


def _load_hf_dataset(spec: str) -> str:
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(
            f"Bad dataset spec 'hf:{spec}'. Use hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:test"
        )
    name = parts[0]
    config = (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(
            f"'hf:{spec}' needs the Hugging Face 'datasets' library, which is not installed. "
            "Install it with: pip install datasets  (or pass a local .txt file or folder instead)"
        ) from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise RuntimeError(
            f"Could not load dataset {name!r} (config={config!r}, split={split!r}): {exc}. "
            "Offline, save the text to a local .txt file and pass its path instead."
        ) from exc
    column = "text" if "text" in ds.column_names else None
    if column is None:
        str_cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
        if not str_cols:
            raise ValueError(f"Dataset {name!r} has no string column (columns: {ds.column_names}).")
        column = str_cols[0]
    return "\n\n".join(t.strip() for t in ds[column] if t and t.strip())


def load_text(source: str | os.PathLike = "wikipedia") -> str:
    """Load text from ``"wikipedia"`` (default), ``"lee"`` (:func:`lee_text`), a ``.txt``
    file, a folder of ``.txt`` files (sorted, joined by blank lines), or
    ``"hf:NAME[:CONFIG][:SPLIT]"`` (needs ``datasets``; the split defaults to ``train``)."""
    text_source = os.fspath(source)
    if text_source == "wikipedia":
        return wikipedia_text()
    if text_source == "lee":
        return lee_text()
    if text_source.startswith("hf:"):
        return _load_hf_dataset(text_source[3:])
    path = Path(text_source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"Folder {path} contains no .txt files. Put the text in *.txt files there.")
        return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"Text source {text_source!r} is neither 'wikipedia', 'lee', 'hf:NAME[:CONFIG][:SPLIT]', "
        "nor an existing .txt file or folder. Check the path."
    )


# --------------------------------------------------------------------- token windows


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the fast Rust tokenizer when available)."""
    if not text or not text.strip():
        raise ValueError("The text is empty; pass a non-empty text (e.g. load_text('wikipedia')).")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Straight to the Rust tokenizer: same ids as tokenizer(text), but no
        # "sequence longer than model_max_length" warning for a 2.5 MB text.
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _bos_id(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError(
            "The tokenizer has no BOS token (bos_token_id is None), so windows cannot start with BOS. "
            "Set tokenizer.bos_token to a suitable token, or pass add_bos=False."
        )
    return int(bos)


def window_starts(
    n_tokens: int,
    seq_len: int = 512,
    *,
    region: tuple[float, float] = (0.0, 1.0),
    n: int | None = None,
    select: Select = "random",
    seed: int = 0,
    add_bos: bool = True,
) -> tuple[list[int], int]:
    """Token offsets of the selected windows, and their text length (``seq_len - 1`` with BOS).

    The region ``[floor(a * n_tokens), floor(b * n_tokens))`` is cut into non-overlapping
    windows from its start; :func:`token_windows` explains ``n``/``select``/``seed``.
    """
    a, b = region
    if not (0.0 <= a < b <= 1.0):
        raise ValueError(f"region={region!r} must be two fractions with 0 <= start < end <= 1.")
    body = seq_len - 1 if add_bos else seq_len
    if body < 1:
        raise ValueError(f"seq_len={seq_len} is too small; it needs at least {2 if add_bos else 1}.")
    lo, hi = int(a * n_tokens), int(b * n_tokens)
    available = (hi - lo) // body
    if available == 0:
        raise ValueError(
            f"The text is too short: region {region} holds {hi - lo} tokens, fewer than one window of "
            f"{body} text tokens (seq_len={seq_len}). Use a longer text, a wider region or a smaller seq_len."
        )
    if n is not None and not (0 < n <= available):
        raise ValueError(
            f"n={n} windows requested but region {region} holds only {available} windows of "
            f"{body} tokens. Ask for at most {available}, or use a longer text or smaller seq_len."
        )
    if select == "all" or n is None:
        idx = list(range(available))
    elif select == "last":
        idx = list(range(available - n, available))
    elif select == "random":
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(available, generator=gen)[:n].tolist()
    else:
        raise ValueError(f"select={select!r} is not one of 'random', 'last', 'all'.")
    return [lo + i * body for i in idx], body


def _windows_from_ids(ids: torch.Tensor, starts: Sequence[int], body: int, bos: int | None) -> list[torch.Tensor]:
    out = []
    for s in starts:
        w = ids[s : s + body]
        if bos is not None:
            w = torch.cat([w.new_full((1,), bos), w])
        out.append(w.unsqueeze(0).clone())
    return out


def token_windows(
    tokenizer,
    text: str,
    seq_len: int = 512,
    *,
    region: tuple[float, float] = (0.0, 1.0),
    n: int | None = None,
    select: Select = "random",
    seed: int = 0,
    add_bos: bool = True,
) -> list[torch.Tensor]:
    """Cut ``text`` into windows, each a ``LongTensor`` of shape ``[1, seq_len]``.

    The text is tokenized once without special tokens; the token sub-range ``region``
    (fractions of the token count) is cut into non-overlapping chunks of ``seq_len - 1``
    tokens, and each gets ``tokenizer.bos_token_id`` prepended (``add_bos=False``: chunks
    of ``seq_len`` tokens, no BOS). ``select="random"`` draws ``n`` distinct windows with
    ``torch.Generator().manual_seed(seed)``; ``"last"`` takes the last ``n``; ``"all"``
    (or ``n=None``) takes every window in text order.
    """
    bos = _bos_id(tokenizer) if add_bos else None
    ids = torch.tensor(tokenize(tokenizer, text), dtype=torch.long)
    starts, body = window_starts(len(ids), seq_len, region=region, n=n, select=select, seed=seed, add_bos=add_bos)
    return _windows_from_ids(ids, starts, body, bos)


CALIB_REGION = (0.0, 0.8)
VAL_REGION = (0.8, 0.9)


class Splits(NamedTuple):
    """Calibration, validation and evaluation windows (:func:`protocol_splits`)."""

    calib: list[torch.Tensor]
    val: list[torch.Tensor]
    eval: list[torch.Tensor]


def split_starts(
    n_tokens: int, seq_len: int = 512, n_calib: int = 128, n_eval: int = 40, n_val: int = 0, seed: int = 0
) -> tuple[Splits, int]:
    """Token offsets of the protocol's windows (a :class:`Splits` of offset lists) and
    their text length.

    Evaluation: the last ``n_eval`` windows of the whole text. Calibration: ``n_calib``
    windows drawn with ``seed`` from :data:`CALIB_REGION` (the first 80%). Validation
    (``n_val > 0``): ``n_val`` windows drawn with ``seed`` from :data:`VAL_REGION`
    (80-90%). Each split lies in its own token range, so no two windows of different
    splits share a token; a text too short for that raises ``ValueError``.
    """
    eval_starts, body = window_starts(n_tokens, seq_len, n=n_eval, select="last")
    held = VAL_REGION if n_val else CALIB_REGION
    held_end = int(held[1] * n_tokens)
    if eval_starts[0] < held_end:
        used = "calibration and validation" if n_val else "calibration"
        raise ValueError(
            f"The text is too short for disjoint splits: the last {n_eval} evaluation windows start at "
            f"token {eval_starts[0]}, inside the first {held[1]:.0%} (tokens 0-{held_end}) used for {used}. "
            f"Use a longer text (more than {round((n_eval + 1) * body / (1 - held[1]))} tokens) "
            "or fewer evaluation windows."
        )
    calib_starts, _ = window_starts(n_tokens, seq_len, region=CALIB_REGION, n=n_calib, select="random", seed=seed)
    val_starts: list[int] = []
    if n_val:
        val_starts, _ = window_starts(n_tokens, seq_len, region=VAL_REGION, n=n_val, select="random", seed=seed)
    return Splits(calib_starts, val_starts, eval_starts), body


def protocol_splits(
    tokenizer,
    text: str | None = None,
    seq_len: int = 512,
    n_calib: int = 128,
    n_eval: int = 40,
    n_val: int = 40,
    seed: int = 0,
) -> Splits:
    """:func:`standard_splits` plus ``n_val`` validation windows from 80-90% of the text.

    The validation windows are for choosing methods and options; the evaluation windows
    are then reported for the choice only. ``calib`` and ``eval`` are exactly those of
    :func:`standard_splits` with the same arguments (see :func:`split_starts`).
    """
    if n_val < 1:
        raise ValueError(f"n_val={n_val}: ask for at least one validation window (or use standard_splits).")
    if text is None:
        text = wikipedia_text()
    bos = _bos_id(tokenizer)
    ids = torch.tensor(tokenize(tokenizer, text), dtype=torch.long)  # tokenized once for all splits
    starts, body = split_starts(len(ids), seq_len, n_calib, n_eval, n_val, seed)
    return Splits(*(_windows_from_ids(ids, s, body, bos) for s in starts))


def standard_splits(
    tokenizer,
    text: str | None = None,
    seq_len: int = 512,
    n_calib: int = 128,
    n_eval: int = 40,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The project's standard ``(calibration, evaluation)`` windows.

    Evaluation: the last ``n_eval`` windows (BOS + ``seq_len - 1`` tokens) of the whole
    text. Calibration: ``n_calib`` windows drawn with ``seed`` from the first 80% of the
    text. ``text`` defaults to :func:`wikipedia_text`. Raises ``ValueError`` if the
    evaluation windows would reach into the calibration region.
    """
    if text is None:
        text = wikipedia_text()
    bos = _bos_id(tokenizer)
    ids = torch.tensor(tokenize(tokenizer, text), dtype=torch.long)  # tokenized once for both splits
    starts, body = split_starts(len(ids), seq_len, n_calib, n_eval, 0, seed)
    return _windows_from_ids(ids, starts.calib, body, bos), _windows_from_ids(ids, starts.eval, body, bos)
