"""Hugging Face style safetensors files: one ``model.safetensors`` or shards of at most
``max_shard_size`` plus ``model.safetensors.index.json``, with tensors converted on demand
so that only one shard's worth is in memory at a time."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * f)
    return int(s)


@dataclass
class Item:
    """Tensors written together, produced on demand so that only one shard's worth of
    converted weights is in memory at a time (the packed model itself stays as it is)."""

    nbytes: int
    make: Callable[[], dict[str, torch.Tensor]]


def write_safetensors(
    items: list[Item], folder: Path, max_shard_size: int | str = "5GB", progress: bool = False
) -> list[str]:
    """Write ``items`` as ``model.safetensors`` or HF-style shards plus an index."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    limit = _parse_size(max_shard_size)
    shards: list[list[Item]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    bar = tqdm(total=len(items), desc="Writing safetensors", unit="tensor", disable=not progress)
    for name, shard in zip(names, shards, strict=True):
        tensors, seen = {}, set()
        for it in shard:
            bar.update(1)
            for k, t in it.make().items():
                t = t.detach().contiguous()
                if t.numel() and t.data_ptr() in seen:
                    t = t.clone()  # safetensors refuses two names for one storage
                seen.add(t.data_ptr())
                tensors[k] = t
                total += t.numel() * t.element_size()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
