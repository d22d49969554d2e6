"""The files of an artifact: atomic folder writes, the tensor table (deduplicated on
save, checked against the manifest on load) and checksums."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qqq_compile.artifact.manifest import MANIFEST, WEIGHTS, dtype_name
from qqq_compile.errors import ArtifactError


def check_target(target: Path) -> None:
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise ArtifactError(f"{target} exists and is not a folder; choose another output path")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ArtifactError(
            f"{target} is a non-empty folder without {MANIFEST}, so it is not a qqq_compile artifact; "
            "refusing to replace it (choose a new or empty folder)"
        )


def dedupe(named: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each distinct tensor once: identical views become aliases, overlapping ones copies."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in named.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen and t.numel():
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # safetensors refuses tensors that share memory: copy partial overlaps (rare)
        unique[name] = t.clone() if ptr in storages and t.numel() else t.contiguous()
        storages.add(ptr)
    return unique, aliases


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # tmp now holds the previous artifact
    else:
        old = target.with_name(f".{target.name}.qqq-old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def sweep_stale(target: Path) -> None:
    """Remove hidden siblings left by saves whose process died (``kill -9`` mid-save)."""
    pat = re.compile(rf"^\.{re.escape(target.name)}\.qqq-(?:tmp|old)-(\d+)")
    for p in target.parent.iterdir():
        m = pat.match(p.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_tensors(root: Path, manifest: dict[str, Any], verify: bool) -> dict[str, torch.Tensor]:
    """All tensors of the artifact by key (aliases included), checked against the manifest."""
    wpath = root / manifest["weights_file"].get("name", WEIGHTS)
    if not wpath.is_file():
        raise ArtifactError(f"{wpath} is missing; the artifact is incomplete, save it again")
    expected = manifest["tensors"]
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(wpath), framework="pt") as f:
            keys = set(f.keys())
            for key, spec in expected.items():
                if key not in keys:
                    raise ArtifactError(f"tensor '{key}' is missing from {wpath}; the artifact is corrupt")
                t = f.get_tensor(key)
                if list(t.shape) != list(spec["shape"]) or dtype_name(t.dtype) != spec["dtype"]:
                    raise ArtifactError(
                        f"shape mismatch for tensor '{key}' in {wpath}: the file holds {dtype_name(t.dtype)} "
                        f"{list(t.shape)}, the manifest says {spec['dtype']} {spec['shape']}"
                    )
                tensors[key] = t
    except SafetensorError as e:
        raise ArtifactError(f"{wpath} is truncated or corrupt ({e}); save the artifact again") from e
    size, want = wpath.stat().st_size, manifest["weights_file"].get("bytes")
    if want is not None and size != want:
        raise ArtifactError(f"{wpath} has {size} bytes, the manifest says {want}: truncated or replaced")
    digest = manifest["weights_file"].get("sha256")
    if verify and digest and sha256(wpath) != digest:
        raise ArtifactError(f"{wpath} does not match the checksum in {MANIFEST}: the file is corrupt")
    for alias, key in manifest["aliases"].items():
        if key not in tensors:
            raise ArtifactError(f"alias '{alias}' points at '{key}', which {wpath} lacks; the artifact is corrupt")
        tensors[alias] = tensors[key]
    return tensors


def write_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """Build the folder in a hidden sibling with ``fill(tmp)``, fsync it, swap it into place.

    A crash (even ``kill -9``) leaves the earlier artifact whole; the next save sweeps the
    hidden folder a dead process left.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.qqq-tmp-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        fill(tmp)
        _fsync_tree(tmp)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Write the safetensors file; returns its ``weights_file`` manifest entry."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates it 0600
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}
