"""Format-neutral pieces of the exporters: output-path checks and sharded safetensors writing
(:mod:`.shards`). Each target's exporters live with the target (:mod:`qqq_compile.targets`)."""

from __future__ import annotations

import os
from pathlib import Path

from qqq_compile.errors import QQQError


class OutputExistsError(QQQError, FileExistsError):
    """The export would replace an existing file or folder the user did not ask to replace."""


def check_new_file(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as a Path; raises :class:`OutputExistsError` when it exists and ``overwrite``
    is off (the CLI's ``--force``), so that no export silently replaces a file."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(
            f"{p} already exists; choose another --out, or pass --force (overwrite=True) to replace it"
        )
    return p


__all__ = ["OutputExistsError", "check_new_file"]
