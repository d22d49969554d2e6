"""``generate()``: greedy and sampled decoding over a :class:`~qqq_compile.runtime.steps.DecodeStep`.

The arguments are transformers' (``max_new_tokens``, ``do_sample``, ``temperature``,
``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``,
``streamer``), applied in transformers' order: repetition penalty, temperature, top-k,
top-p. Batched prompts are left-padded (``attention_mask`` marks the real tokens); each row
stops at its own EOS and is padded with ``pad_token_id`` afterwards.

The loop is one prefill call (a long prompt: one call per :data:`PREFILL_CHUNK` tokens) and
one step call per new token; the only work between steps is choosing the next token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qqq_compile.runtime.steps import DecodeStep
from qqq_compile.targets.w4a8.kernels.cpu import AllocationReuse

# Prompts are prefilled this many tokens per step call: the activations of a call grow
# with its tokens (SmolLM2, 1900 tokens in one call: 65-220 MB more peak RSS than in
# 256-token calls), and attention over a chunk costs no more than over the whole prompt at once
# (measured under load: 1900 tokens in 256-token chunks 11 s, in one call 21 s). 512 rather
# than 256: the int8 GEMMs run ~10% faster at 512 rows and each weight is unpacked once per
# 512 tokens; with freed tensors reused (AllocationReuse) a 512-token prefill took 349 vs 402-406
# ms in 256-token chunks on a busy host and 294 vs 299 ms on a quiet one, and 1900 tokens + 32
# new 2.2-2.3 vs 2.5-3.0 s, for 7-20 MB more peak RSS (docs/RESULTS.md, round 9).
PREFILL_CHUNK = 512


class GenerationError(ValueError):
    """Bad generation arguments; the message names the value and the fix."""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise GenerationError(
                f"temperature must be > 0 when sampling, got {self.temperature!r}; use do_sample=False for greedy"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise GenerationError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}")

    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [int(e)] if isinstance(e, int) else [int(x) for x in e]


@dataclass
class GenerateOutput:
    """``sequences`` [B, T + new] plus where the time went."""

    sequences: torch.Tensor
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    runtime: str

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1  # the first new token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else float("nan")


def process_logits(logits: torch.Tensor, seqs: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Repetition penalty, temperature, top-k and top-p on ``logits [B, V]`` (float32)."""
    if cfg.repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, seqs)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        logits = logits.scatter(1, seqs, seen)
    if not cfg.do_sample:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - cfg.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1)``. For CPU float32 rows numpy's argmax returns the same index
    (the first maximum; a NaN counts as the maximum) ~30x faster: 3 us against 100 us for a
    49152-token vocabulary, measured on the 2-core EPYC, once per generated token."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad:
        return torch.from_numpy(scores.numpy().argmax(-1))
    return scores.argmax(-1)


def _check_left_padded(mask: torch.Tensor) -> None:
    # A real token after a pad in any row means right padding: the new tokens would then
    # not follow the prompt.
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise GenerationError(
            "attention_mask shows right padding; generation needs left-padded prompts: "
            "set tokenizer.padding_side = 'left' before tokenizing the batch"
        )


def step_device(step: Any, like: torch.Tensor | None = None) -> torch.device:
    """The device a step's inputs are made on: its ``device`` (a :class:`DecodeStep`'s
    weights and cache), else ``like``'s (a plain callable standing in for a step), else
    torch's default device."""
    dev = getattr(step, "device", None)
    if dev is not None:
        return torch.device(dev)
    return like.device if like is not None else torch.get_default_device()


def generate(
    step: DecodeStep,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cfg: SamplingConfig,
    *,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    prefill_chunk: int | None = PREFILL_CHUNK,
) -> GenerateOutput:
    """Run ``cfg.max_new_tokens`` steps from ``input_ids [B, T]``; see the module docstring.
    ``prefill_chunk``: prompt tokens per prefill call (None: the whole prompt in one).
    The ids, masks and positions are made on the step's device (``input_ids`` and
    ``attention_mask`` are moved there); the returned sequences stay on it."""
    cfg.validate()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise GenerationError("input_ids must be a LongTensor [batch, tokens] (tokenizer(..., return_tensors='pt'))")
    b, t = input_ids.shape
    if t < 1:
        raise GenerationError("input_ids is empty: give at least one prompt token")
    spec = step.spec
    if b > spec.max_batch:
        raise GenerationError(
            f"a batch of {b} prompts is larger than the {spec.max_batch} rows the KV cache was built for; "
            f"call prepare_generation(max_batch={b}, ...) first"
        )
    if t + cfg.max_new_tokens > spec.max_len:
        raise GenerationError(
            f"the prompt ({t} tokens) plus max_new_tokens ({cfg.max_new_tokens}) is {t + cfg.max_new_tokens} "
            f"positions, more than the KV cache's {spec.max_len}; lower max_new_tokens, shorten the prompt, or "
            f"call prepare_generation(max_len={t + cfg.max_new_tokens}, ...) once (up to the model's context)"
        )
    dev = step_device(step, input_ids)
    if attention_mask is None:
        mask = torch.ones(b, t, dtype=torch.long, device=dev)
    else:
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        _check_left_padded(attention_mask.to(torch.long))  # where the caller made it: a host mask needs no sync
        mask = attention_mask.to(dev, torch.long)
    eos_ids = cfg.eos_ids()
    eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    input_ids = input_ids.to(dev, torch.long)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    # Per-token work is kept to a few small ops (it cost ~0.3 ms/token on a busy 2-core machine
    # with torch's argmax, torch.cat of the sequence, where and isin every step): the sequence
    # is written into a preallocated buffer, greedy decoding without penalty takes numpy's
    # argmax of the raw logits, and the pad/EOS bookkeeping runs only when some row can stop.
    out = torch.empty(b, t + cfg.max_new_tokens, dtype=torch.long, device=dev)
    out[:, :t] = input_ids
    plain_greedy = not cfg.do_sample and cfg.repetition_penalty == 1.0
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    full_mask = torch.cat([mask, torch.ones(b, cfg.max_new_tokens, dtype=torch.long, device=dev)], dim=1)
    positions = torch.arange(t + cfg.max_new_tokens, device=dev)
    # Freed activations are handed back to the next call instead of being mapped afresh: a
    # prefill chunk frees and requests the same sizes in every layer (page faults otherwise
    # cost up to a fifth of a 512-token prefill on a busy host; docs/RESULTS.md, round 9).
    with AllocationReuse.for_device(dev):
        t0 = time.perf_counter()
        chunk = prefill_chunk or t
        for start in range(0, t, chunk):  # the cache keeps each chunk for the next
            end = min(t, start + chunk)
            logits = step(input_ids[:, start:end], mask[:, :end], positions[start:end])
        prefill_s, t1, new = time.perf_counter() - t0, time.perf_counter(), 0
        for i in range(cfg.max_new_tokens):
            if plain_greedy:
                nxt = _argmax(logits[:, -1])
            else:
                scores = process_logits(logits[:, -1].float(), out[:, : t + i], cfg)
                if cfg.do_sample:
                    nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
                else:
                    nxt = _argmax(scores)
            if len(eos) and b > 1:  # a finished row keeps emitting pad (a single row stops instead)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out[:, t + i] = nxt
            new += 1
            if streamer is not None:
                streamer.put(nxt.cpu())
            if len(eos):
                done |= torch.isin(nxt, eos)
                if bool(done.all()):
                    break
            if i == cfg.max_new_tokens - 1:
                break
            pos = t + i
            logits = step(nxt[:, None], full_mask[:, : pos + 1], positions[pos : pos + 1])
        decode_s = time.perf_counter() - t1
    seqs = out[:, : t + new].contiguous()
    if streamer is not None:
        streamer.end()
    return GenerateOutput(seqs, t, new, prefill_s, decode_s, step.runtime)


# Positions of the decode step a model gets unless asked otherwise: its whole context,
# capped here (SmolLM2's 8192 positions would cost 4x the cache memory for contexts
# few requests use; the cache's pages are only resident once written, so the cap costs
# address space, not memory). ``prepare_generation(max_len=...)`` / ``save(..., max_len=...)``
# choose another size, up to the model's context.
DEFAULT_MAX_LEN = 2048


def default_max_len(model_config: dict[str, Any] | None) -> int:
    """The positions of a model's default decode step: its context, at most :data:`DEFAULT_MAX_LEN`."""
    limit = context_limit(model_config)
    return min(limit, DEFAULT_MAX_LEN) if limit else DEFAULT_MAX_LEN


def context_limit(model_config: dict[str, Any] | None) -> int | None:
    """Positions a KV cache may hold for this model: ``max_position_embeddings``, and the
    sliding window when some layers use one (no ring buffer: past the window the cached
    graph's full-causal mask would no longer be the model's)."""
    cfg = model_config or {}
    limits = [cfg.get("max_position_embeddings")]
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types") or []
    if window and cfg.get("use_sliding_window", True) and (not layer_types or "sliding_attention" in layer_types):
        limits.append(window)
    known = [int(x) for x in limits if x]
    return min(known) if known else None


__all__ = [
    "DEFAULT_MAX_LEN",
    "PREFILL_CHUNK",
    "GenerateOutput",
    "GenerationError",
    "SamplingConfig",
    "context_limit",
    "default_max_len",
    "generate",
    "process_logits",
    "step_device",
]
