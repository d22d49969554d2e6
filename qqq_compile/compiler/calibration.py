"""Calibration data: what the user gives, normalised into batches the graph can run.

Two kinds of data, told apart by the model and the data:

* **token ids**, for language models (a Hugging Face model with a vocabulary, or a module
  whose ``forward`` takes ``input_ids``): a text source name or path (with a tokenizer),
  a tensor ``[N, T]``, or an iterable of ``[T]``/``[1, T]``/``[B, T]`` tensors or dicts with
  ``input_ids``. Windows are re-batched (``batch_size`` windows of equal length per batch)
  into ``{"input_ids": LongTensor[B, T]}`` and checked: integer ids inside the vocabulary,
  at least 2 tokens per window.
* **calls**, for every other module: each item is one forward call, used as given: a
  tensor (the first positional argument), a tuple of positional arguments, a dict of
  keyword arguments or ``(args, kwargs)``. A tensor, tuple or dict given directly is one
  call; a list (or any other iterable) holds calls. Each becomes a dict keyed by position
  (``0, 1, ...``) and keyword name; :meth:`qqq_compile.compiler.capture.Captured.graph_inputs` maps it
  onto the captured graph's inputs. ``max_samples`` caps the number of calls;
  ``batch_size`` does not apply (the calls keep their own batch sizes).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

Batch = dict[Any, Any]  # str keys: keyword inputs; int keys: positional inputs
MIN_CALIB_TOKENS = 256
#: Automatic batching (``batch_size=None``): a batch's widest activation (tokens x the
#: widest linear width x 4 bytes) stays within this, and a batch holds at most
#: ``MAX_BATCH_TOKENS`` tokens. glibc's default (dynamic) mmap threshold never exceeds 32
#: MB: a larger tensor is always its own mmap, page-faulted in (zeroed) on every allocation
#: and unmapped on free, while smaller ones are reused from the heap. Measured on SmolLM2
#: (GPTQ, 2 threads, 512-token windows, 3 blocks per process): 8 windows per batch (25 MB)
#: 7.5-7.8 s per block against 8.3-8.9 s for 16 (50 MB: half the page faults and 1.1-1.4 s
#: less system time per block); earlier, with the activations at 64 MB either way, 16
#: windows ran 3-6% faster than 8, 4 windows 13% slower, 1 window 2.3x slower (per-op
#: overhead).
BATCH_ACT_BYTES = 32 << 20
MAX_BATCH_TOKENS = 8192
DEFAULT_BATCH_SIZE = 8  # windows per batch when the model's widths are unknown


def is_hf(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "to_dict")


def is_token_model(model: torch.nn.Module) -> bool:
    """A Hugging Face model with a vocabulary whose ``input_ids`` are token ids."""
    return is_hf(model) and getattr(model.config, "vocab_size", None) is not None


def split_call(call: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of one forward call given as a tensor (the first positional
    argument), a tuple of positional arguments, a dict of keyword arguments or
    ``(args, kwargs)``, the forms ``torch.export`` takes. Raises TypeError otherwise."""
    if isinstance(call, torch.Tensor):
        return (call,), {}
    if isinstance(call, Mapping):
        return (), dict(call)
    if (
        isinstance(call, tuple)
        and len(call) == 2
        and isinstance(call[0], (tuple, list))
        and isinstance(call[1], Mapping)
    ):
        return tuple(call[0]), dict(call[1])
    if isinstance(call, tuple):
        return call, {}
    raise TypeError(
        "must be a tensor, a tuple of positional arguments, a dict of keyword arguments or (args, kwargs), as "
        f"torch.export takes them; got {type(call).__name__}"
    )


def takes_token_ids(model: torch.nn.Module | None, calib: Any) -> bool:
    """True when ``calib`` is token-id data for ``model`` (see the module docstring)."""
    if isinstance(calib, str):
        return True
    if model is not None and is_token_model(model):
        return True
    if model is not None:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "input_ids" not in params:
            return False
    first = calib
    if not isinstance(calib, (torch.Tensor, Mapping)) and isinstance(calib, Iterable):
        if not isinstance(calib, (list, tuple)):
            return True  # a generator cannot be peeked at: the model takes input_ids
        first = next(iter(calib), None)
    if isinstance(first, Mapping):
        return "input_ids" in first
    return isinstance(first, torch.Tensor) and not first.is_floating_point()


def auto_batch_size(seq_len: int, widest: int | None) -> int:
    """Windows of ``seq_len`` tokens per calibration batch: as many as keep one batch's
    widest activation within :data:`BATCH_ACT_BYTES` and its tokens within
    :data:`MAX_BATCH_TOKENS`, at least one; :data:`DEFAULT_BATCH_SIZE` if ``widest`` is unknown."""
    if not widest:
        return DEFAULT_BATCH_SIZE
    tokens = min(MAX_BATCH_TOKENS, BATCH_ACT_BYTES // (4 * widest))
    return max(1, tokens // max(seq_len, 1))


def widest_linear(model: torch.nn.Module | None) -> int | None:
    """The widest input or output of the model's linears, the output embedding (lm_head)
    aside: the largest activation a block runs through. None without linears."""
    if model is None:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    widths = [
        max(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    ]
    return max(widths, default=None)


def calib_batches(
    calib: Any,
    tokenizer: Any = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    seq_len: int = 512,
    *,
    model: torch.nn.Module | None = None,
) -> list[Batch]:
    """Normalise calibration input to a list of batches (see the module docstring).

    Token-id data becomes ``{"input_ids": [B, T]}`` batches of ``batch_size`` windows
    (None: :func:`auto_batch_size` for the model's widest linear and each window length);
    other data (when ``model`` does not take token ids, or, without a model, when the data
    is not integer) becomes one ``{0: ..., "name": ...}`` call per item.
    """
    if calib is None:
        return []
    if not takes_token_ids(model, calib):
        return _call_batches(calib, max_samples)
    if isinstance(calib, str):
        if tokenizer is None:
            raise ValueError(f"calib={calib!r} is a text source: pass tokenizer=... so it can be tokenized")
        from qqq_compile.data import load_text, token_windows

        calib = token_windows(tokenizer, load_text(calib), seq_len, region=(0.0, 0.8), n=max_samples or 128)
    if isinstance(calib, torch.Tensor):
        calib = list(calib.unsqueeze(0) if calib.dim() == 1 else calib.split(1))
    rows: list[torch.Tensor] = []
    for item in calib if isinstance(calib, Iterable) else [calib]:
        t = item["input_ids"] if isinstance(item, Mapping) else item
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"calibration items must be token-id tensors or dicts with input_ids, got {type(t).__name__}"
            )
        if t.is_floating_point():
            raise TypeError("calibration tensors must hold integer token ids, got a floating-point tensor")
        if t.dim() == 0 or t.numel() == 0:
            continue  # an empty item adds nothing; all empty is refused below
        if t.shape[-1] < 2:
            raise ValueError(
                f"calibration window of {t.shape[-1]} token: windows need at least 2 tokens (attention needs a "
                "context); use windows of 64+ tokens, e.g. qqq_compile.data.token_windows(tokenizer, text, 512)"
            )
        rows.extend(t.reshape(-1, t.shape[-1]).split(1))
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise ValueError("calibration data is empty: give at least one window of token ids (e.g. a [N, T] tensor)")
    # Batch windows of equal length together; lengths may differ between batches.
    by_len: dict[int, list[torch.Tensor]] = {}
    for r in rows:
        by_len.setdefault(r.shape[-1], []).append(r)
    batches: list[Batch] = []
    widest = widest_linear(model) if batch_size is None else None
    for length, same in by_len.items():
        size = batch_size or auto_batch_size(length, widest)
        for i in range(0, len(same), size):
            batches.append({"input_ids": torch.cat(same[i : i + size]).long()})
    return batches


def _call_batches(calib: Any, max_samples: int | None) -> list[Batch]:
    items = [calib] if isinstance(calib, (torch.Tensor, Mapping, tuple)) else calib
    if not isinstance(items, Iterable):
        raise TypeError(
            f"calibration data must be a tensor, a tuple of positional arguments, a dict of keyword arguments, "
            f"(args, kwargs), or a list of those (one per forward call); got {type(calib).__name__}"
        )
    batches: list[Batch] = []
    for i, item in enumerate(items):
        if max_samples is not None and len(batches) >= max_samples:
            break
        try:
            args, kwargs = split_call(item)
        except TypeError:
            raise TypeError(
                f"calibration item {i} is a {type(item).__name__}: each item is one forward call, given as a "
                "tensor, a tuple of positional arguments, a dict of keyword arguments or (args, kwargs)"
            ) from None
        leaves = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if not leaves or any(v.numel() == 0 for v in leaves):
            raise ValueError(f"calibration item {i} holds an empty tensor or no tensor at all")
        batches.append({**dict(enumerate(args)), **kwargs})
    if not batches:
        raise ValueError("calibration data is empty: give at least one forward call (e.g. [torch.randn(64, 512)])")
    return batches


def example_call(batches: list[Batch]) -> Any:
    """An example call for ``capture`` from the first calibration batch.

    Token ids: two rows (export specialises a batch of 1) of at most 16 tokens, made
    contiguous (a strided slice would make export guard on the original row length).
    Calls: the first call as ``(args, kwargs)``.
    """
    first = batches[0]
    if set(first) == {"input_ids"}:
        ids = first["input_ids"][:, :16]
        return {"input_ids": ids[[0, -1]].contiguous()}
    n = sum(1 for k in first if isinstance(k, int))
    return tuple(first[i] for i in range(n)), {k: v for k, v in first.items() if isinstance(k, str)}


def batch_tokens(batch: Batch) -> int:
    """The tokens a calibration batch feeds the model (at least 1): its ``input_ids``'
    elements, else its first tensor's, an integer one's elements or a float one's rows
    (``numel / last dim``: ``[B, D]`` holds B, ``[B, T, D]`` B x T)."""
    t = batch.get("input_ids")
    if not isinstance(t, torch.Tensor):
        t = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
    if t is None:
        return 1
    if not t.is_floating_point():
        return max(1, t.numel())
    return max(1, t.numel() // (t.shape[-1] if t.dim() >= 2 else 1))


def check_calib(model: torch.nn.Module, batches: list[Batch]) -> None:
    """Refuse token ids outside the model's vocabulary; warn when calibration is too
    small for stable statistics (fewer than ``MIN_CALIB_TOKENS`` tokens, or fewer tokens
    than the widest linear has inputs: its Hessian is then rank-deficient). Only token-id
    batches are checked: a module's other inputs have no vocabulary or token count."""
    if not batches or not all(isinstance(b.get("input_ids"), torch.Tensor) for b in batches):
        return
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or getattr(emb, "num_embeddings", None)
    lo = min(int(b["input_ids"].min()) for b in batches)
    hi = max(int(b["input_ids"].max()) for b in batches)
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"calibration token id {bad} is out of range: the model's vocabulary has {vocab} entries (ids 0.."
            f"{(vocab or 0) - 1}), the data's ids span {lo}..{hi}. Tokenize the data with the model's own tokenizer"
        )
    tokens = sum(batch_tokens(b) for b in batches)
    widest = max((m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)
    need = max(MIN_CALIB_TOKENS, widest)
    if tokens < need:
        why = (
            f"the {widest} inputs of the widest linear: its GPTQ Hessian is rank-deficient below that"
            if widest > MIN_CALIB_TOKENS
            else "the least for usable activation ranges"
        )
        warnings.warn(
            f"calibration data holds only {tokens} tokens, fewer than {need} ({why}); smoothing scales, "
            "activation ranges and GPTQ are poorly estimated. Use more windows (the standard protocol: 128 x 512 "
            "tokens)",
            stacklevel=3,
        )
