"""Perplexity of a causal LM over fixed token windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# Logit elements per float32 cross-entropy chunk (~64 MB; log-softmax makes one more copy).
_CHUNK_ELEMENTS = 16 * 1024 * 1024


def _logits_of(output: Any) -> torch.Tensor:
    """Logits from a tensor, a Hugging Face output (``.logits``), a dict or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"The model returned {type(output).__name__}; expected a logits tensor or an object with "
        ".logits. Wrap the model so that it returns logits of shape [batch, seq, vocab]."
    )


def _input_device(model: Any) -> torch.device | None:
    params = getattr(model, "parameters", None)
    if callable(params):
        try:
            return next(iter(params())).device
        except (StopIteration, TypeError):
            return None
    return None


def _batches(windows: Sequence[torch.Tensor], batch_size: int):
    """Consecutive windows of equal length, at most ``batch_size`` per batch."""
    batch: list[torch.Tensor] = []
    for w in windows:
        w = w.reshape(1, -1) if w.dim() == 1 else w
        if w.dim() != 2 or w.shape[0] != 1:
            raise ValueError(f"Each window must have shape [1, T] or [T]; got {tuple(w.shape)}.")
        if batch and (len(batch) == batch_size or batch[0].shape[1] != w.shape[1]):
            yield torch.cat(batch)
            batch = []
        batch.append(w)
    if batch:
        yield torch.cat(batch)


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum over the batch of the NLL of ``ids[:, 1:]`` under ``logits[:, :-1]``, in float32.

    Works one window and a few thousand positions at a time: ``logits[b, i:j]`` is a view,
    so neither the shift nor the float32 cast copies the whole ``[B, T, V]`` tensor.
    """
    vocab = logits.shape[-1]
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    n_pred = ids.shape[1] - 1
    total = 0.0
    for b in range(ids.shape[0]):
        for i in range(0, n_pred, rows):
            j = min(i + rows, n_pred)
            chunk = logits[b, i:j].float()
            total += F.cross_entropy(chunk, ids[b, i + 1 : j + 1], reduction="sum").double().item()
    return total


def perplexity(
    model: Callable[[torch.Tensor], Any],
    windows: Sequence[torch.Tensor],
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` over ``windows`` (each ``[1, T]``, first token BOS).

    ``model(input_ids)`` must return logits ``[B, T, V]`` or an object with ``.logits``.
    Every window contributes the NLL of its tokens ``1..T-1`` given their prefixes; the
    result is ``exp`` of the mean over all predicted tokens of all windows.
    """
    from tqdm.auto import tqdm

    if len(windows) == 0:
        raise ValueError("No windows given; pass at least one [1, T] token window.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    device = _input_device(model)
    total_nll, total_tokens = 0.0, 0
    with (
        torch.inference_mode(),
        tqdm(total=len(windows), desc="Perplexity", unit="win", disable=not progress) as bar,
    ):
        for ids in _batches(windows, batch_size):
            if ids.shape[1] < 2:
                raise ValueError("Windows need at least 2 tokens (BOS + one token to predict).")
            if device is not None:
                ids = ids.to(device)
            logits = _logits_of(model(ids))
            if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                raise ValueError(
                    f"Logits have shape {tuple(logits.shape)}, expected [batch, seq, vocab] with "
                    f"batch, seq = {tuple(ids.shape)}."
                )
            total_nll += _nll_sum(logits, ids)
            total_tokens += ids.shape[0] * (ids.shape[1] - 1)
            bar.update(ids.shape[0])
    return math.exp(total_nll / total_tokens)
