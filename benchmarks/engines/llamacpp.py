"""llama.cpp through llama-cpp-python's low-level C API (runs in ``benchmarks/peers/venv-llamacpp``).

The prompt (all rows at once, one sequence id per row) goes through one ``llama_decode``
call, then a greedy loop decodes one token per row per call: the same prefill/decode
split HF's ``generate()`` makes, timed per step. No torch here: this venv has none.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _logger

from engines.worker import TokenClock


def requantize(src: Path, dst: Path, ftype: int, threads: int) -> Path:
    """``dst``: ``src`` requantized by llama.cpp's own quantizer (cached; written atomically)."""
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.allow_requantize = True  # the source is already 4-bit (Q4_1): dequantize, then quantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}) returned {rc}")
    os.replace(tmp, dst)
    return dst


class LlamaCppEngine:
    """One llama.cpp model + context; ``quant`` "q4_1" is the shipped file, "q4_0" requantizes it."""

    def __init__(self, quant: str = "q4_1") -> None:
        if quant not in ("q4_1", "q4_0"):
            raise ValueError(f"quant={quant!r}: use 'q4_1' (the shipped GGUF) or 'q4_0'")
        self.quant = quant

    def load(self, options: dict[str, Any]) -> dict[str, Any]:
        _logger.set_verbose(False)  # llama.cpp logs every tensor at load otherwise; errors still show
        threads = int(options["threads"])
        path = Path(options["gguf"])
        if self.quant == "q4_0":
            cache = Path(options["cache_dir"]) / f"{path.stem.replace('Q4_1', '')}Q4_0-from-Q4_1.gguf"
            path = requantize(path, cache, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, threads)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        # The repacked (AMX) weight buffers segfault inside llama_decode on this VM
        # (/work/shared/FINDINGS.md); plain CPU buffers work.
        mparams.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama_model_load_from_file failed for {path}")
        max_rows = int(options["max_batch"])
        cparams = llama_cpp.llama_context_default_params()
        # One KV buffer shared by all rows (kv_unified): else n_ctx is split evenly per sequence
        # and a single long prompt would not fit.
        cparams.n_ctx = int(options["max_kv_tokens"]) + 256
        cparams.n_batch = int(options["max_prompt_tokens"])  # the whole prompt in one llama_decode call
        cparams.n_seq_max = max_rows
        cparams.kv_unified = True
        cparams.n_threads = threads
        cparams.n_threads_batch = threads  # defaults to every core otherwise
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, max_rows)
        return {
            "gguf": str(path),
            "weight_bytes": path.stat().st_size,
            "weight_bytes_source": "GGUF file size",
            "llama_cpp_python": llama_cpp.__version__,
            "n_ctx": cparams.n_ctx,
            "threads": threads,
        }

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` over ``(token, position, row, wants_logits)`` entries."""
        b = self.batch
        for k, (tok, pos, row, out) in enumerate(entries):
            b.token[k] = tok
            b.pos[k] = pos
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = row
            b.logits[k] = out
        b.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, index: int) -> int:
        logits = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], max_new: int, clock: TokenClock) -> list[list[int]]:
        # Metadata-only clear (data=False): positions restart at 0 and overwrite the old cells.
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), False)
        entries, last = [], []
        for row, ids in enumerate(prompts):
            entries += [(t, i, row, i == len(ids) - 1) for i, t in enumerate(ids)]
            last.append(len(entries) - 1)
        self._decode(entries)
        tokens = [self._argmax(k) for k in last]
        clock.tick()
        out = [[t] for t in tokens]
        for step in range(max_new - 1):
            self._decode([(t, len(prompts[r]) + step, r, True) for r, t in enumerate(tokens)])
            tokens = [self._argmax(r) for r in range(len(prompts))]
            clock.tick()
            for r, t in enumerate(tokens):
                out[r].append(t)
        return out
