"""Run stock llama.cpp (llama-cpp-python) on a GGUF file: the worker :mod:`.llamacpp` starts.

Runs under the llama.cpp virtual environment's Python, which has no torch and no
qqq_compile: it imports only ``llama_cpp`` and numpy. Reads one JSON request on stdin::

    {"model": PATH, "threads": N, "n_ctx": N, "tasks": [TASK, ...]}

and prints one JSON line with a result per task. Tasks (``"op"``):

* ``tokenize``: ``text``, ``add_special`` → ``ids`` (llama.cpp's own tokenizer);
* ``logits``: ``ids`` (one sequence), ``out`` (a ``.npy`` path) → the float32 logits of
  every position written there;
* ``nll``: ``windows`` (lists of ids) → ``nll`` (sum over windows of ``-log p`` of tokens
  ``1..T-1``, float64) and ``tokens`` (how many), for perplexity;
* ``generate``: ``ids`` (a prompt), ``n`` → ``tokens`` (greedy), ``text``, and
  ``decode_s`` (seconds of the ``n - 1`` one-token decode calls after the first token).

The model loads as ``benchmarks/engines/llamacpp.py`` loads it: CPU only, and
``use_extra_bufts = False`` (the repacked AMX buffers segfault on the VMs this was built on).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import _logger


class Model:
    def __init__(self, path: str, threads: int, n_ctx: int) -> None:
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx
        cp.n_threads = threads
        cp.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, ids: list[int], start: int, all_logits: bool) -> None:
        b = self.batch
        for k, t in enumerate(ids):
            b.token[k] = t
            b.pos[k] = start + k
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = 0
            b.logits[k] = all_logits or k == len(ids) - 1
        b.n_tokens = len(ids)
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, ids: list[int]) -> np.ndarray:
        self.clear()
        self.decode(ids, 0, True)
        ptr = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(ids), self.n_vocab)).astype(np.float32).copy()

    def last(self) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 16))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(buf[:n])

    def piece(self, t: int) -> bytes:
        buf = (ctypes.c_char * 256)()
        n = llama_cpp.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
        return bytes(buf[: max(n, 0)])

    def run(self, task: dict) -> dict:
        op = task["op"]
        if op == "tokenize":
            return {"ids": self.tokenize(task["text"], bool(task.get("add_special", False)))}
        if op == "logits":
            np.save(task["out"], self.logits(task["ids"]))
            return {"out": task["out"]}
        if op == "nll":
            total, count = 0.0, 0
            for ids in task["windows"]:
                lg = self.logits(ids).astype(np.float64)[:-1]
                lse = np.log(np.exp(lg - lg.max(axis=1, keepdims=True)).sum(axis=1)) + lg.max(axis=1)
                total += float((lse - lg[np.arange(len(ids) - 1), ids[1:]]).sum())
                count += len(ids) - 1
            return {"nll": total, "tokens": count}
        if op == "generate":
            self.clear()
            ids = list(task["ids"])
            self.decode(ids, 0, False)
            out = [int(np.argmax(self.last()))]
            t0 = time.perf_counter()
            for step in range(int(task["n"]) - 1):
                self.decode([out[-1]], len(ids) + step, True)
                out.append(int(np.argmax(self.last())))
            decode_s = time.perf_counter() - t0
            text = b"".join(self.piece(t) for t in out).decode("utf-8", errors="replace")
            return {"tokens": out, "text": text, "decode_s": decode_s}
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    req = json.loads(sys.stdin.read())
    _logger.set_verbose(False)  # llama.cpp logs every tensor at load otherwise; errors still show
    model = Model(req["model"], int(req.get("threads", 2)), int(req.get("n_ctx", 512)))
    results = [model.run(t) for t in req["tasks"]]
    sys.stdout.write(json.dumps({"results": results, "n_vocab": model.n_vocab}) + "\n")


if __name__ == "__main__":
    main()
