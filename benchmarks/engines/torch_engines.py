"""Engines in the project's venv: Hugging Face ``generate()`` and qqq_compile's ``generate()``.

Both are timed through the same streamer (``put``/``end``), so TTFT and per-token decode
are measured identically for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from engines.worker import ClockStreamer, TokenClock


def _unique_bytes(tensors) -> int:
    """Bytes of distinct storages (SmolLM2's lm_head is tied to the embedding: count it once)."""
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _embedding_only_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of tensors that only embedding lookups read: a decode step reads one row of
    them, not the table (a loaded artifact keeps the int8 embedding apart from the tied
    lm_head, so weight_bytes() counts the 28 MB table twice for SmolLM2)."""
    users: dict[str, set] = {}
    for n in gm.graph.nodes:
        for a in n.args:
            if getattr(a, "op", None) == "get_attr":
                users.setdefault(a.target, set()).add(n.target)
    emb = torch.ops.aten.embedding.default
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    only = {t for t, targets in users.items() if targets == {emb} and t in tensors}
    # A table sharing storage with a tensor read in full (a tied lm_head) is read in full.
    full = {tensors[t].data_ptr() for t in tensors if t not in only}
    seen: dict[int, int] = {}
    for t in only:
        if tensors[t].data_ptr() not in full:
            seen[tensors[t].data_ptr()] = tensors[t].numel() * tensors[t].element_size()
    return sum(seen.values())


class HFEngine:
    """transformers ``generate()`` with its default (dynamic) KV cache, greedy."""

    def __init__(self, dtype: str = "float32") -> None:
        self.dtype = getattr(torch, dtype)
        self.model = None

    def load(self, options: dict[str, Any]) -> dict[str, Any]:
        from qqq_compile.models import load_model

        torch.set_num_threads(int(options["threads"]))
        self.model, tokenizer = load_model("demo", dtype=self.dtype)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return {
            "weight_bytes": _unique_bytes(list(self.model.parameters()) + list(self.model.buffers())),
            "weight_bytes_source": "parameters + buffers (tied lm_head counted once)",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new: int, clock: TokenClock) -> list[list[int]]:
        ids = torch.tensor(prompts, dtype=torch.long)  # equal-length rows: no padding needed
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            min_new_tokens=max_new,  # never stop early at EOS: every engine decodes the same count
            do_sample=False,
            pad_token_id=self.pad,
            streamer=ClockStreamer(clock),
        )
        return out[:, ids.shape[1] :].tolist()


class OursEngine:
    """``qqq_compile.compile(...)`` (or ``qqq_compile.load(artifact)``), then its ``generate()``."""

    def __init__(
        self, runtime: str = "eager", int8_head: bool = True, cache_dtype: str | None = None, artifact_key: str = ""
    ) -> None:
        self.runtime = runtime
        # Which option names the artifact ("artifact"; "alt_artifact": a second one, e.g. another format).
        self.artifact_key = artifact_key or "artifact"
        self.int8_head = int8_head  # lm_head + tied embedding in int8 (QuantConfig.int8_head, the default)
        self.cache_dtype = getattr(torch, cache_dtype) if cache_dtype else None  # KV cache (None: fp32)
        self.compiled = None
        self.last_notes: dict[str, Any] = {}  # run_notes() of the last generation

    def load(self, options: dict[str, Any]) -> dict[str, Any]:
        import qqq_compile as qc

        torch.set_num_threads(int(options["threads"]))
        options = {**options, "artifact": options.get(self.artifact_key)}
        if not options.get("artifact") and not callable(getattr(qc.CompiledModel, "generate", None)):
            # Say so before minutes of calibration, not after.
            raise RuntimeError(self._no_generate("qqq_compile.CompiledModel"))
        info: dict[str, Any] = {"runtime": self.runtime, "torch": torch.__version__}
        if options.get("artifact"):
            self.compiled = qc.load(options["artifact"])
            info["source"] = f"artifact {options['artifact']}"
        else:
            from qqq_compile.data import CALIB_REGION, load_text, token_windows
            from qqq_compile.models import load_model

            model, tokenizer = load_model("demo")
            calib = token_windows(
                tokenizer, load_text("wikipedia"), 512, region=CALIB_REGION, n=int(options["calib_windows"]), seed=0
            )
            config = qc.CompileConfig(preset=options["preset"], quant=qc.QuantConfig(int8_head=self.int8_head))
            self.compiled = qc.compile(model, calib=calib, config=config, progress=False)
            del model  # the compiled model holds its own weights; keep the float ones out of RSS
            info["source"] = f"compiled: preset {options['preset']!r}, {len(calib)} x 512 calibration windows"
        if not callable(getattr(self.compiled, "generate", None)):
            raise RuntimeError(self._no_generate(type(self.compiled).__name__))
        # Build the decode steps before anything is timed (an AOT compile takes minutes; its
        # package is cached and reused by later runs): one per batch size of the workloads,
        # as a user serving one prompt at a time would (a one-row step has a static batch);
        # generate() takes the smallest that fits each request.
        t0 = time.perf_counter()
        for rows in sorted({1, int(options["batch"]) or 1}):
            kw = {"cache_dtype": self.cache_dtype} if self.cache_dtype is not None else {}
            step = self.compiled.prepare_generation(
                max_batch=rows, max_len=int(options["max_len"]), runtime=self.runtime, **kw
            )
        info["step_build_s"] = round(time.perf_counter() - t0, 1)
        info["step_runtime"] = step.runtime
        info["int8_head"] = self.int8_head
        info["kv_cache_dtype"] = str(self.cache_dtype or "float32")
        if callable(getattr(self.compiled, "weight_bytes", None)):
            info["weight_bytes"] = int(self.compiled.weight_bytes())
            info["weight_bytes_source"] = "compiled.weight_bytes()"
            info["decode_read_bytes"] = info["weight_bytes"] - _embedding_only_bytes(self.compiled.graph_module)
        return info

    @staticmethod
    def _no_generate(what: str) -> str:
        return (
            f"{what} has no generate() yet: this engine calls compiled.generate(input_ids, max_new_tokens=N, "
            "do_sample=False, streamer=S, runtime='eager'|'aot') -> LongTensor [B, prompt + N]"
        )

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new: int, clock: TokenClock) -> list[list[int]]:
        from qqq_compile.targets.w4a8.kernels.cpu import cpp_path_counts

        ids = torch.tensor(prompts, dtype=torch.long)
        streamer = _PathStreamer(clock, cpp_path_counts)
        out = self.compiled.generate(ids, max_new_tokens=max_new, do_sample=False, streamer=streamer, eos_token_id=[])
        self.last_notes = streamer.notes()
        return out[:, ids.shape[1] :].tolist()

    def run_notes(self) -> dict[str, Any]:
        """How the C++ kernels shared their work in the last generation (see :class:`_PathStreamer`)."""
        return self.last_notes


class _PathStreamer(ClockStreamer):
    """A :class:`ClockStreamer` that also counts the C++ kernels' work-sharing paths over the
    prefill (up to the first new token) and over the decode: ``solo`` calls ran on the calling
    thread alone after a ``stall`` (a fork + join that waited on a descheduled thread), which
    is how a busy machine shows in a slow run (``csrc/parallel_cpu.cpp``)."""

    KEYS = ("team", "solo", "stall")

    def __init__(self, clock: TokenClock, counts: Callable[[], dict[str, int]]) -> None:
        super().__init__(clock)
        self.counts = counts
        self.marks = [counts()]

    def put(self, value: Any) -> None:
        if self.seen_prompt and len(self.marks) == 1:
            self.marks.append(self.counts())
        super().put(value)

    def end(self) -> None:
        self.marks.append(self.counts())
        super().end()

    def notes(self) -> dict[str, Any]:
        if len(self.marks) < 3:
            return {}
        a, b, c = self.marks[:3]
        return {
            "paths_prefill": {k: b[k] - a[k] for k in self.KEYS},
            "paths_decode": {k: c[k] - b[k] for k in self.KEYS},
        }
