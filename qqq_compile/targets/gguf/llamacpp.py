"""Ask stock llama.cpp about a GGUF file: tokens, logits, perplexity, greedy text, decode speed.

llama.cpp runs in its own virtual environment (llama-cpp-python built from source, no
torch: ``benchmarks/peers/setup.sh llamacpp``), so each call starts
:mod:`.llamacpp_worker` under that environment's Python and reads its JSON answer. The
environment is found from ``$QQQ_LLAMACPP_PYTHON`` (a Python executable), else
``benchmarks/peers/venv-llamacpp`` of this checkout (ready once its ``.complete`` marker
exists). Tests and ``benchmarks/gguf_vs_llamacpp.py`` use it; so can a user who wants to
check a file with llama.cpp's own loader, tokenizer and kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qqq_compile.errors import QQQError

WORKER = Path(__file__).with_name("llamacpp_worker.py")
VENV = Path(__file__).resolve().parents[3] / "benchmarks" / "peers" / "venv-llamacpp"


class LlamaCppUnavailable(QQQError, RuntimeError):
    """No llama.cpp environment to run the check in."""


def llamacpp_python() -> Path | None:
    """The llama.cpp environment's Python, or None when there is none (ready)."""
    env = os.environ.get("QQQ_LLAMACPP_PYTHON")
    if env:
        return Path(env) if Path(env).is_file() else None
    py = VENV / "bin" / "python"
    return py if py.is_file() and (VENV / ".complete").is_file() else None


def run_llamacpp(
    model: str | os.PathLike, tasks: list[dict[str, Any]], *, threads: int = 2, n_ctx: int = 512, timeout: float = 3600
) -> list[dict[str, Any]]:
    """Run the worker's ``tasks`` on ``model`` in one llama.cpp process; their results in order.
    A ``logits`` task's array comes back as a numpy array under ``"logits"``."""
    py = llamacpp_python()
    if py is None:
        raise LlamaCppUnavailable(
            "no llama.cpp environment: build it with `benchmarks/peers/setup.sh llamacpp` (about 15 minutes), "
            "or point QQQ_LLAMACPP_PYTHON at a Python that has llama-cpp-python"
        )
    with tempfile.TemporaryDirectory(prefix="qqq_llamacpp_") as tmp:
        tasks = [dict(t) for t in tasks]
        for i, t in enumerate(tasks):
            if t["op"] == "logits":
                t["out"] = str(Path(tmp) / f"logits_{i}.npy")
        req = {"model": str(model), "threads": threads, "n_ctx": n_ctx, "tasks": tasks}
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        proc = subprocess.run(
            [str(py), str(WORKER)], input=json.dumps(req), capture_output=True, text=True, timeout=timeout, env=env
        )
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp worker failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
        results = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
        for r in results:
            if "out" in r:
                r["logits"] = np.load(r.pop("out"))
        return results


__all__ = ["LlamaCppUnavailable", "llamacpp_python", "run_llamacpp"]
