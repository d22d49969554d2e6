"""The batching engine behind ``qqq-compile serve``: continuous batching over one decode step.

The rows of the step's KV cache (:mod:`qqq_compile.runtime.kv_cache`) are slots. One
worker thread owns the step (it is not re-entrant) and loops over step boundaries:

1. **cancel**: rows whose client went away are released;
2. **admit**: waiting requests take free rows and are prefilled *alone in their rows*
   (``DecodeStep(..., cache_row=r)``), so running rows keep their cache;
3. **decode**: one step call for every running row, then each row samples its next token.

All rows share one slot counter ``cur`` (the step's rows share ``cache_position``).
A request joining a running batch gets its prompt in slots ``cur - len(prompt) .. cur - 1``;
its row's mask marks the slots before them invalid, so it sees its own tokens only, and the
step counts its positions from its first valid slot (``kv_cache._row_positions``), so its
prefill is bit for bit a lone ``generate()``'s (``docs/serving.md``). Two consequences of the
shared counter:

* a prompt longer than ``cur`` cannot join yet: it waits until the batch has advanced
  that far, or has drained (then ``cur`` restarts at 0);
* positions only grow while the batch runs: a request needing more than ``max_len - cur``
  positions waits, and admission stops until the batch drains (first in, first out, so no
  request waits forever).

A row that finishes (EOS, ``max_tokens``, a stop string, its client gone) is released at
once and its result returned; the next step boundary may give the row to a new request.

Text leaves incrementally (:class:`TextStream`): the generated ids are decoded whole each
time and the new suffix is sent, holding back an incomplete UTF-8 character and any tail
that could still become a stop string.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qqq_compile.runtime.generate import SamplingConfig, process_logits, step_device
from qqq_compile.runtime.steps import DecodeStep
from qqq_compile.targets.w4a8.kernels.cpu import AllocationReuse


class QueueFullError(RuntimeError):
    """The engine's queue of waiting requests is full; retry later."""


class EngineClosedError(RuntimeError):
    """The engine was shut down."""


@dataclass
class Event:
    """What a request's sink receives: new text, and at the end a finish reason."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


class TextStream:
    """Incremental detokenization with stop strings.

    ``add(token)`` returns the text that may be sent now. The whole id list is decoded
    each time (tokenizers merge bytes across tokens); trailing U+FFFD (an incomplete UTF-8
    sequence) and any tail that is a prefix of a stop string are held back. When a stop
    string appears, the text ends right before it and :attr:`stopped` is set.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.decode(self.ids)
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = text[: min(hits)], True
                out = self.text[self.sent :]
                self.sent = len(self.text)
                return out
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        self.text = text
        if safe <= self.sent:
            return ""
        out, self.sent = text[self.sent : safe], safe
        return out

    def flush(self) -> str:
        """The held-back rest, at the end (nothing after a stop string)."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


@dataclass(eq=False)
class Job:
    """One accepted request: its prompt ids, sampling settings and where its text goes.

    ``sink(event)`` is called from the engine thread (hand it to an event loop with
    ``loop.call_soon_threadsafe``). ``seed`` seeds the request's own generator, as
    ``CompiledModel.generate(seed=...)`` does, so a seeded request samples the same tokens
    as ``generate`` would for it alone."""

    prompt: list[int]
    cfg: SamplingConfig
    stream: TextStream
    sink: Callable[[Event], None]
    seed: int | None = None
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    # engine state
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    row: int | None = None
    start: int | None = None  # the position of its first prompt token (0: as generate() places it)
    pending: int | None = None  # sampled, not yet fed to the step
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def __post_init__(self) -> None:
        if self.cfg.do_sample:
            self._seed = self.seed if self.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(self._seed)
        self._eos = set(self.cfg.eos_ids())

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """The job's generator on ``device`` (sampling draws there), seeded alike; made anew
        only when the job's first token is drawn on another device than the default."""
        if self.generator is not None and self.generator.device != device and not self.generated:
            self.generator = torch.Generator(device=device).manual_seed(self._seed)
        return self.generator

    def push(self, token: int) -> str | None:
        """Record a sampled token and send its text; the finish reason if the job is done."""
        self.generated.append(token)
        if self.first_token is None:
            self.first_token = time.perf_counter()
        if token in self._eos:
            return "stop"
        text = self.stream.add(token)
        if text:
            self._send(Event(text, len(self.generated)))
        if self.stream.stopped:
            return "stop"
        return "length" if len(self.generated) >= self.cfg.max_new_tokens else None

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        rest = self.stream.flush() if reason in ("stop", "length") else ""
        self._send(Event(rest, len(self.generated), reason, error))

    def _send(self, event: Event) -> None:
        try:
            self.sink(event)
        except RuntimeError:  # the receiving event loop is gone (shutdown): nobody listens
            self.cancelled = True


class BatchingEngine:
    """Continuous batching of :class:`Job` s over one :class:`DecodeStep` (see the module docstring).

    ``max_queue`` bounds the waiting requests (:meth:`submit` raises
    :class:`QueueFullError` beyond it); ``batch_window_s``: an idle engine that receives a
    request waits this long for others, so requests that arrive together start together."""

    def __init__(
        self,
        step: DecodeStep,
        *,
        max_queue: int = 64,
        batch_window_s: float = 0.0,
        pad_token_id: int = 0,
        prefill_chunk_rows: bool = True,
    ):
        self.step = step
        self.max_batch, self.max_len = step.spec.max_batch, step.spec.max_len
        self.max_queue, self.batch_window_s, self.pad = max_queue, batch_window_s, pad_token_id
        self.prefill_chunk_rows = prefill_chunk_rows  # prefill joiners in adjacent rows with one call
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._rows: list[Job | None] = [None] * self.max_batch
        self.device = step_device(step)  # ids, mask and positions are made where the step runs
        self._mask = torch.zeros(self.max_batch, self.max_len, dtype=torch.long, device=self.device)
        self._cur = 0
        names = ("accepted", "completed", "cancelled", "failed", "rejected_queue_full", "rows_released")
        names += ("joined_at_0", "joined_shifted", "prefill_calls", "decode_steps", "decode_row_steps")
        self._counts: Counter[str] = Counter(dict.fromkeys(names + ("prompt_tokens", "completion_tokens"), 0))
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qqq-serve-engine", daemon=True)

    # ------------------------------------------------------------------ public (any thread)

    def start(self) -> BatchingEngine:
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs`` (all or none). Each must fit the cache: the caller checks
        ``len(prompt) + max_new_tokens <= max_len`` and answers the client first."""
        for job in jobs:
            if len(job.prompt) + job.cfg.max_new_tokens > self.max_len or not job.prompt:
                raise ValueError(f"job {job.id} does not fit the {self.max_len} positions of the cache")
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                self._counts["rejected_queue_full"] += len(jobs)
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (queue limit {self.max_queue})")
            self._waiting.extend(jobs)
            self._counts["accepted"] += len(jobs)
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop ``job`` at the next step boundary (its row is released)."""
        with self._cv:
            job.cancelled = True
            self._cv.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            busy = sum(j is not None for j in self._rows)
            return {
                "rows": self.max_batch,
                "rows_in_use": busy,
                "waiting": len(self._waiting),
                "position": self._cur,
                "max_len": self.max_len,
                "runtime": self.step.runtime,
                **dict(self._counts),
            }

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        # Freed activations go back to the next step call instead of being mapped afresh
        # (runtime/generate.py says why), for as long as the engine runs.
        with AllocationReuse.for_device(self.device):
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._active():
                    self._cv.wait()
                if self._closed:
                    break
                if not self._active() and self.batch_window_s > 0:
                    end = time.monotonic() + self.batch_window_s
                    while not self._closed and len(self._waiting) < self.max_batch and time.monotonic() < end:
                        self._cv.wait(end - time.monotonic())
            try:
                self._iteration()
            except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
                self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", waiting_too=True)

    def _active(self) -> list[int]:
        return [r for r, j in enumerate(self._rows) if j is not None]

    def _iteration(self) -> None:
        for r in self._active():
            if self._rows[r].cancelled:
                self._release(r, "cancelled")
        joined = self._admit()
        if joined:
            self._prefill(joined)
        if self._active():
            self._decode()

    def _admit(self) -> list[int]:
        """Move waiting jobs into free rows (FIFO; see the module docstring). Returns their rows."""
        with self._cv:
            running = bool(self._active())
            if not running:
                self._cur = 0
            joined: list[int] = []
            cur = self._cur
            for job in list(self._waiting):
                if job.cancelled:
                    self._waiting.remove(job)
                    job.finish("cancelled")
                    self._counts["cancelled"] += 1
                    continue
                free = [r for r, j in enumerate(self._rows) if j is None]
                if not free:
                    break
                t, need = len(job.prompt), job.cfg.max_new_tokens
                if running:
                    if cur + need > self.max_len:
                        break  # out of positions: let the batch drain
                    if t > cur:
                        continue  # joins once the batch has advanced to its length
                else:
                    after = max(cur, t)
                    if any(after + self._rows[r].cfg.max_new_tokens > self.max_len for r in joined):
                        break
                    if after + need > self.max_len:
                        break
                    cur = after
                self._waiting.remove(job)
                job.row = free[0]
                self._rows[free[0]] = job
                joined.append(free[0])
            self._cur = cur
            return joined

    def _prefill(self, rows: list[int]) -> None:
        cur = self._cur
        for r in rows:
            t = len(self._rows[r].prompt)
            self._mask[r].zero_()
            self._mask[r, cur - t : cur] = 1
            self._rows[r].start = cur - t
            self._counts["joined_shifted" if cur - t else "joined_at_0"] += 1
        for run in self._runs(sorted(rows)):
            jobs = [self._rows[r] for r in run]
            width = max(len(j.prompt) for j in jobs)
            ids = torch.full((len(run), width), self.pad, dtype=torch.long, device=self.device)
            for i, j in enumerate(jobs):
                ids[i, width - len(j.prompt) :] = torch.tensor(j.prompt, dtype=torch.long, device=self.device)
            positions = torch.arange(cur - width, cur, device=self.device)
            logits = self.step(ids, self._mask[run[0] : run[-1] + 1, :cur], positions, run[0])
            self._counts["prefill_calls"] += 1
            self._counts["prompt_tokens"] += sum(len(j.prompt) for j in jobs)
            for i, r in enumerate(run):
                self._take(r, logits[i, -1])

    def _runs(self, rows: list[int]) -> list[list[int]]:
        """Adjacent rows prefilled with one call (left-padded), or one call per row."""
        if not self.prefill_chunk_rows:
            return [[r] for r in rows]
        runs: list[list[int]] = []
        for r in rows:
            if runs and runs[-1][-1] == r - 1:
                runs[-1].append(r)
            else:
                runs.append([r])
        return runs

    def _decode(self) -> None:
        active = self._active()
        b, cur = active[-1] + 1, self._cur
        ids = torch.full((b, 1), self.pad, dtype=torch.long, device=self.device)
        for r in active:
            ids[r, 0] = self._rows[r].pending
            self._mask[r, cur] = 1
        logits = self.step(ids, self._mask[:b, : cur + 1], torch.tensor([cur], device=self.device))
        self._cur = cur + 1
        self._counts["decode_steps"] += 1
        self._counts["decode_row_steps"] += len(active)
        for r in active:
            self._take(r, logits[r, -1])

    def _take(self, r: int, logits: torch.Tensor) -> None:
        """Sample row ``r``'s next token from its logits [V], as generate() does for one row."""
        job = self._rows[r]
        cfg = job.cfg
        seqs = (
            torch.tensor([job.prompt + job.generated], dtype=torch.long, device=logits.device)
            if cfg.repetition_penalty != 1.0
            else None
        )
        scores = process_logits(logits[None].float(), seqs, cfg)
        if cfg.do_sample:
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=job.generator_on(scores.device)))
        else:
            token = int(scores.argmax(-1))
        self._counts["completion_tokens"] += 1
        reason = job.push(token)
        if reason is not None:
            self._release(r, reason)
        elif job.cancelled:
            self._release(r, "cancelled")
        else:
            job.pending = token

    def _release(self, r: int, reason: str) -> None:
        job = self._rows[r]
        self._rows[r] = None
        self._mask[r].zero_()
        job.row = job.pending = None
        job.finish(reason)
        self._counts["rows_released"] += 1
        self._counts["cancelled" if reason == "cancelled" else "completed"] += 1

    def _fail_all(self, message: str, waiting_too: bool = False) -> None:
        for r in self._active():
            job = self._rows[r]
            self._rows[r] = None
            self._mask[r].zero_()
            job.finish("error", message)
            self._counts["failed"] += 1
        if waiting_too:
            with self._cv:
                while self._waiting:
                    self._waiting.popleft().finish("error", message)
        self._cur = 0


__all__ = ["BatchingEngine", "EngineClosedError", "Event", "Job", "QueueFullError", "TextStream"]
