"""Worker process for one generation engine: JSON lines on stdin, JSON lines back.

Started as ``python -m engines.worker MODULE:CLASS KWARGS_JSON`` (``benchmarks/`` on
``PYTHONPATH``). An engine class has ``load(options) -> info`` and
``generate(prompts, max_new, clock) -> new token ids per row``; it calls ``clock.tick()``
once per decoding step, right after the step's tokens are chosen.

Requests and replies (one JSON object a line):

* ``{"cmd": "load", "options": {...}, "cases": {name: [[ids...], ...]}, "max_new": N}``
  -> ``{"ok": true, "info": {...}}``; loads, then warms every case up (a few tokens),
  so a case an engine cannot run is reported here (``info["case_errors"]``), not mid-run.
* ``{"cmd": "run", "case": name}`` -> ``{"ok": true, "result": {...timings...}}``
* ``{"cmd": "quit"}``

Errors come back as ``{"ok": false, "error": "...", "traceback": "..."}`` and the worker
keeps serving. Only stdlib here: the llama.cpp venv's python runs this file too.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import re
import resource
import sys
import time
import traceback
from typing import Any, TextIO

WARMUP_TOKENS = 4


class TokenClock:
    """Timestamps of the decoding steps of one generation (``perf_counter`` seconds)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.ticks: list[float] = []

    def begin(self) -> None:
        self.ticks = []
        self.start = time.perf_counter()

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())

    def timings(self, batch: int, prompt_tokens: int) -> dict[str, Any]:
        """TTFT, prefill and decode rates, as ``generate_speed.py`` defines them."""
        if not self.ticks:
            raise RuntimeError("the engine produced no token (clock.tick() was never called)")
        ttft = self.ticks[0] - self.start
        decode_s = self.ticks[-1] - self.ticks[0]
        steps = len(self.ticks) - 1
        return {
            "batch": batch,
            "prompt_tokens": prompt_tokens,  # summed over rows
            "new_tokens": len(self.ticks),  # per row
            "ttft_s": ttft,
            "prefill_tok_s": prompt_tokens / ttft,
            "decode_s": decode_s,
            # Tokens of all rows per second: one step yields one token per row.
            "decode_tok_s": batch * steps / decode_s if steps and decode_s > 0 else None,
            "step_ms": [1e3 * (b - a) for a, b in zip(self.ticks[:-1], self.ticks[1:], strict=True)],
        }


class ClockStreamer:
    """A transformers-style streamer (``put``/``end``) that ticks a :class:`TokenClock`.

    The first ``put`` carries the prompt (transformers' convention), every later one a
    new token per row.
    """

    def __init__(self, clock: TokenClock) -> None:
        self.clock = clock
        self.seen_prompt = False

    def put(self, value: Any) -> None:
        if self.seen_prompt:
            self.clock.tick()
        self.seen_prompt = True

    def end(self) -> None:
        pass


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return kb / 1024.0 if kb is not None else None


def peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (Linux VmHWM), else since start."""
    kb = _status_kb("VmHWM")
    return kb / 1024.0 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter, so generation's peak excludes loading's (a compile
    with calibration peaks far above what inference keeps resident)."""
    gc.collect()
    try:  # return freed heap to the OS first, else RSS keeps loading's garbage
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _error(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def serve(engine: Any, proto_in: TextIO, proto_out: TextIO) -> None:
    cases: dict[str, list[list[int]]] = {}
    max_new = 0
    case_errors: dict[str, str] = {}
    clock = TokenClock()

    def reply(obj: dict[str, Any]) -> None:
        proto_out.write(json.dumps(obj) + "\n")
        proto_out.flush()

    for line in proto_in:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        try:
            if cmd == "quit":
                return
            if cmd == "load":
                cases, max_new = msg["cases"], int(msg["max_new"])
                t0 = time.perf_counter()
                info = dict(engine.load(msg["options"]) or {})
                info["load_s"] = time.perf_counter() - t0
                for name, prompts in cases.items():
                    try:  # warm-up: first-call allocations / compilation stay out of the timings
                        engine.generate(prompts, min(WARMUP_TOKENS, max_new), TokenClock())
                    except Exception as exc:  # noqa: BLE001 - reported per case, the others still run
                        case_errors[name] = f"{type(exc).__name__}: {exc}"
                info["case_errors"] = case_errors
                info["peak_rss_load_mb"] = peak_rss_mb()
                info["peak_rss_reset"] = reset_peak_rss()
                info["rss_after_load_mb"] = rss_mb()
                reply({"ok": True, "info": info})
            elif cmd == "run":
                name = msg["case"]
                if name in case_errors:
                    raise RuntimeError(case_errors[name])
                prompts = cases[name]
                clock.begin()
                new = engine.generate(prompts, max_new, clock)
                result = clock.timings(len(prompts), sum(len(p) for p in prompts))
                result["tokens"] = [list(map(int, row)) for row in new]
                notes = getattr(engine, "run_notes", None)
                if callable(notes):
                    result.update(notes())
                result["peak_rss_mb"] = peak_rss_mb()
                reply({"ok": True, "result": result})
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as exc:  # noqa: BLE001 - the parent decides; the worker stays up
            reply(_error(exc))


def main() -> None:
    spec, kwargs = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    # The protocol owns the real stdout; anything else printing there (library banners,
    # llama.cpp's C code) goes to stderr instead of corrupting the JSON stream.
    proto_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    module, cls = spec.split(":")
    try:
        engine = getattr(importlib.import_module(module), cls)(**kwargs)
    except Exception as exc:  # noqa: BLE001 - e.g. the engine's library is missing: say so on the first request
        line = sys.stdin.readline()
        if line:
            proto_out.write(json.dumps(_error(exc)) + "\n")
            proto_out.flush()
        return
    serve(engine, sys.stdin, proto_out)


if __name__ == "__main__":
    main()
