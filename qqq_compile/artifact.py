"""Save and load compiled models: safetensors plus a versioned JSON manifest, never pickle.

An artifact is a folder::

    qqq_manifest.json   format name + version, qqq_compile/torch/transformers versions, the
                        CompileConfig, the pipeline (pass names, records, notes, replay state),
                        the per-linear report, the HF model class + config, the tensor table
                        and a fingerprint of the lowered graph (ops it calls, with counts)
    model.safetensors   every tensor the lowered graph reads (packed int4 weights, scales,
                        norms, embeddings, ...), each stored once (tied tensors are aliases)
    tokenizer/          optional: ``tokenizer.save_pretrained``

Writes are atomic: the folder is built and fsynced in a hidden sibling, then swapped into
place (``renameat2(RENAME_EXCHANGE)`` on Linux, two renames elsewhere), so a crash leaves
the earlier artifact whole.

Loading needs no calibration data and no original weights. It rebuilds the model skeleton
from the saved HF config (no weight init), captures it, sets every saved tensor by its graph
attribute name, re-attaches each linear's packed weight (``LinearInfo.packed``, matched by
module name) and **replays** the pipeline's structural rewrites. Replay protocol, per pass
(the pass objects are rebuilt from the saved preset, or by name from the pass registry):

* ``replay_mode = "rerun"`` (class attribute): the rewrite is deterministic given the graph,
  its annotations and the pass options; it is run again with a context holding no calibration
  data (``lower``, ``fuse_norm_quant`` and ``rotate`` are treated so by default).
* a ``replay(gm, ctx, state) -> PassResult`` method: the pass rebuilds its structure from
  ``state``, the JSON-able value it stored at compile time in
  ``gm.meta["qqq_replay"][pass.name]`` (e.g. where an online Hadamard transform sits).
* otherwise the pass is skipped: it only annotated, or only changed tensor values (those
  come from the safetensors file).

After replay the graph must read exactly the saved tensors, with the saved shapes, and call
the same ops as the saved graph; otherwise :class:`ArtifactError` names the passes that
changed the structure without declaring how to replay it. Pass wall times are not saved, so
the same model, data and seed give byte-identical artifacts.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.fx import GraphModule

from .capture import capture
from .compiled import CompiledModel, Report
from .config import CompileConfig, ConfigError
from .formats import PackedW4
from .graph import LinearInfo, get_attr, info, linear_sites, set_attr
from .pipeline import PASSES, CompileContext, Note, PassRecord, QQQPass, readable_graph

FORMAT = "qqq_compile.artifact"
FORMAT_VERSION = "1.0"  # major bumps break old readers; minor bumps only add fields
MANIFEST = "qqq_manifest.json"
WEIGHTS = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
_LINEAR = "__qqq_linear__/"  # key prefix of per-linear tensors ("/" never occurs in attribute names)
# Structural passes that do not (yet) declare ``replay_mode`` themselves. All three are
# deterministic given the graph, its annotations and the pass options (no calibration).
_BUILTIN_REPLAY = {"lower": "rerun", "fuse_norm_quant": "rerun", "rotate": "rerun"}


class ArtifactError(ValueError):
    """A saved artifact is missing, corrupt, foreign, too new, or cannot be replayed."""


# ----------------------------------------------------------------------------- save


def save(compiled: CompiledModel, path: str | os.PathLike, *, tokenizer: Any = None) -> Path:
    """Write ``compiled`` (and optionally its ``tokenizer``) to the folder ``path`` atomically.

    An existing artifact at ``path`` is replaced; any other existing folder or file is refused.
    """
    if not isinstance(compiled, CompiledModel):
        raise ArtifactError(f"save expects a CompiledModel, got {type(compiled).__name__}")
    if not compiled.model_config or not compiled.model_class:
        raise ArtifactError(
            "only Hugging Face models can be saved: load() rebuilds the model from its HF config, and this "
            f"CompiledModel has none ({compiled.model_class or 'unknown model'})"
        )
    target = Path(path).expanduser().absolute()
    _check_target(target)
    gm = compiled.graph_module
    bad = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    if bad:
        raise ArtifactError(
            f"the graph still calls modules {bad[:3]} (e.g. observers left by 'observe' without 'calibrate'); "
            "only fully rewritten graphs can be saved"
        )
    graph_tensors = _graph_tensors(gm)
    layers, linear_tensors = _linear_records(gm)
    unique, aliases = _dedupe({**graph_tensors, **linear_tensors})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "model_class": compiled.model_class,
        "model_config": compiled.model_config,
        "model_dtype": _model_dtype(gm, graph_tensors),
        "input_names": compiled.input_names,
        "output_kind": compiled.output_kind,
        "compile_config": compiled.report.config,
        "pipeline": compiled.report.pipeline,
        # Without wall times: the same model, data and seed give byte-identical artifacts.
        "passes": [{k: v for k, v in vars(p).items() if k != "seconds"} for p in compiled.report.passes],
        "notes": [vars(n) for n in compiled.report.notes],
        "replay_state": gm.meta.get("qqq_replay", {}),
        "layers": layers,
        "graph_tensors": sorted(graph_tensors),
        "tensors": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in sorted(unique.items())},
        "aliases": dict(sorted(aliases.items())),
        "graph_ops": _op_counts(gm),
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.qqq-tmp-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        save_file(unique, str(tmp / WEIGHTS), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS, 0o644)  # safetensors creates it 0600
        manifest["weights_file"] = {"name": WEIGHTS, "bytes": (tmp / WEIGHTS).stat().st_size}
        manifest["weights_file"]["sha256"] = _sha256(tmp / WEIGHTS)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        text = json.dumps(_jsonable(manifest), indent=2, sort_keys=True, allow_nan=False) + "\n"
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        _fsync_tree(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_target(target: Path) -> None:
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise ArtifactError(f"{target} exists and is not a folder; choose another output path")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise ArtifactError(
            f"{target} is a non-empty folder without {MANIFEST}, so it is not a qqq_compile artifact; "
            "refusing to replace it (choose a new or empty folder)"
        )


def _graph_tensors(gm: GraphModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor the graph (and nested graph modules) reads through ``get_attr``, by target."""
    out: dict[str, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        obj = get_attr(gm, n.target)
        if isinstance(obj, torch.Tensor):
            out[prefix + n.target] = obj.detach()
        elif isinstance(obj, GraphModule):
            out.update(_graph_tensors(obj, f"{prefix}{n.target}."))
        else:
            raise ArtifactError(f"graph attribute '{prefix}{n.target}' is a {type(obj).__name__}, not a tensor")
    return out


def _linear_records(gm: GraphModule) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The per-linear report, and each linear's tensors (packed weight, observed input
    ``max |x|``, smoothing record) by key."""
    layers, extra, seen = [], {}, collections.Counter()
    for n in gm.graph.nodes:
        li = info(n)
        if not isinstance(li, LinearInfo):
            continue
        idx = seen[li.fqn]
        seen[li.fqn] += 1
        base = f"{_LINEAR}{li.fqn}#{idx}/"
        rec: dict[str, Any] = {
            "name": li.fqn,
            "occurrence": idx,
            "shape": [li.out_features, li.in_features],
            "method": li.method,
            "smoothed": li.smooth_group is not None,
            "smooth_group": li.smooth_group,
            "smooth_scale_range": li.smooth_scale_range,
            "gptq": li.gptq,
            "lowered": li.lowered,
            "skipped": li.skipped,
            "weight_sqnr_db": li.weight_sqnr_db,
            "act_samples": li.act_samples,
        }
        if li.act_absmax is not None:
            rec["act_absmax"] = extra[base + "act_absmax"] = li.act_absmax
        p = li.packed
        if p is None:
            rec.update(format="float", bits=None, group_size=None, group_scale_dtype=None, tensors=None)
        else:
            rec.update(
                format="w4a8",
                bits=4,
                act_bits=8,
                group_size=p.group_size,
                group_scale_dtype=p.group_scale_dtype,
                bits_per_weight=p.bits_per_weight(),
                tensors={k: base + k for k in p.tensors()},
            )
            extra.update({base + k: t for k, t in p.tensors().items()})
        sm = n.meta.get("qqq_smooth")  # smooth's per-group record, for the inspect plots
        if dataclasses.is_dataclass(sm) and not isinstance(sm, type):
            fields = {}
            for f in dataclasses.fields(sm):
                v = getattr(sm, f.name)
                if isinstance(v, torch.Tensor):
                    extra[f"{base}smooth/{f.name}"] = v
                    v = {"tensor": f"{base}smooth/{f.name}"}
                fields[f.name] = v
            rec["smooth_record"] = {"class": f"{type(sm).__module__}.{type(sm).__qualname__}", "fields": fields}
        if isinstance(rec.get("act_absmax"), torch.Tensor):
            rec["act_absmax"] = base + "act_absmax"
        layers.append(rec)
    return layers, extra


def _dedupe(named: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _model_dtype(gm: GraphModule, graph_tensors: dict[str, torch.Tensor]) -> str:
    """The float dtype holding most elements (the dtype the model was captured in).

    Weights ``cast_float`` stored in another dtype do not count: the skeleton must be
    built in the dtype the graph computes in, not in the storage dtype of lm_head.
    """
    cast = {
        n.target
        for n in gm.graph.nodes
        if n.op == "get_attr" and n.users and all(u.meta.get("qqq_float_cast") for u in n.users)
    }
    by_dtype: collections.Counter[str] = collections.Counter()
    for name, t in graph_tensors.items():
        if t.is_floating_point() and name not in cast:
            by_dtype[_dtype_name(t.dtype)] += t.numel()
    return by_dtype.most_common(1)[0][0] if by_dtype else "float32"


def _op_counts(gm: GraphModule) -> dict[str, int]:
    counts = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return dict(sorted(counts.items()))


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("qqq-compile", "torch", "transformers", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats as strings, tuples as lists, tensors as numbers/lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.item() if x.numel() == 1 else x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.dtype):
        return _dtype_name(x)
    return str(x)


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def _sha256(path: Path) -> str:
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


def _swap_into_place(tmp: Path, target: Path) -> None:
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


def _sweep_stale(target: Path) -> None:
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


# ----------------------------------------------------------------------------- load


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of the artifact folder ``path``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        hint = ""
        stale = sorted(root.parent.glob(f".{root.name}.qqq-old-*")) if root.parent.is_dir() else []
        if stale:
            hint = f"; an interrupted save left the previous artifact at {stale[-1]}"
        raise ArtifactError(f"artifact folder {root} does not exist{hint}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(
            f"{mpath} is missing: {root} is not a qqq_compile artifact (write one with CompiledModel.save)"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is corrupt, save it again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{mpath} describes format {fmt!r}, not {FORMAT!r}: not a qqq_compile artifact")
    version = str(manifest.get("format_version", ""))
    major = version.split(".")[0]
    supported = FORMAT_VERSION.split(".")[0]
    if not major.isdigit():
        raise ArtifactError(f"{mpath} has an unreadable format_version {version!r}")
    if int(major) > int(supported):
        writer = manifest.get("versions", {}).get("qqq-compile", "a newer release")
        raise ArtifactError(
            f"{mpath} uses artifact format {version}, written by qqq_compile {writer}; this qqq_compile "
            f"({_versions()['qqq-compile']}) reads format {supported}.x only: upgrade qqq_compile "
            "(pip install -U qqq-compile)"
        )
    if int(major) < int(supported):
        raise ArtifactError(f"{mpath} uses the old artifact format {version}; compile and save the model again")
    required = ("model_class", "model_config", "layers", "graph_tensors", "tensors", "aliases", "weights_file")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ArtifactError(f"{mpath} lacks the field(s) {missing}; the artifact is corrupt, save it again")
    return manifest


def _read_tensors(root: Path, manifest: dict[str, Any], verify: bool) -> dict[str, torch.Tensor]:
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
                if list(t.shape) != list(spec["shape"]) or _dtype_name(t.dtype) != spec["dtype"]:
                    raise ArtifactError(
                        f"shape mismatch for tensor '{key}' in {wpath}: the file holds {_dtype_name(t.dtype)} "
                        f"{list(t.shape)}, the manifest says {spec['dtype']} {spec['shape']}"
                    )
                tensors[key] = t
    except SafetensorError as e:
        raise ArtifactError(f"{wpath} is truncated or corrupt ({e}); save the artifact again") from e
    size, want = wpath.stat().st_size, manifest["weights_file"].get("bytes")
    if want is not None and size != want:
        raise ArtifactError(f"{wpath} has {size} bytes, the manifest says {want}: truncated or replaced")
    digest = manifest["weights_file"].get("sha256")
    if verify and digest and _sha256(wpath) != digest:
        raise ArtifactError(f"{wpath} does not match the checksum in {MANIFEST}: the file is corrupt")
    for alias, key in manifest["aliases"].items():
        if key not in tensors:
            raise ArtifactError(f"alias '{alias}' points at '{key}', which {wpath} lacks; the artifact is corrupt")
        tensors[alias] = tensors[key]
    return tensors


def load(path: str | os.PathLike, *, verify: bool = True) -> CompiledModel:
    """Rebuild the :class:`CompiledModel` saved at ``path`` (no calibration data needed).

    ``verify`` checks the SHA-256 of the weights file against the manifest.
    """
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    tensors = _read_tensors(root, manifest, verify)
    model = _skeleton(manifest)
    input_names = list(manifest.get("input_names") or ["input_ids"])
    vocab = int(manifest["model_config"].get("vocab_size") or 2)
    example = {}
    for name in input_names:
        if name == "input_ids":
            example[name] = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        elif name == "attention_mask":
            example[name] = torch.ones(2, 16, dtype=torch.long)
        else:
            raise ArtifactError(f"cannot rebuild a model captured with input '{name}' (only input_ids, attention_mask)")
    captured = capture(model, example)
    gm = captured.graph_module
    source_graph = readable_graph(gm)
    saved_names = set(manifest["graph_tensors"])
    _set_tensors(gm, tensors, saved_names, root)
    annotate = _Annotator(manifest, tensors)
    skipped = _replay(gm, manifest, annotate)
    annotate(gm, final=True)
    _set_tensors(gm, tensors, saved_names, root)
    _check_replayed(gm, manifest, root, skipped)
    report = Report(
        passes=[_record(PassRecord, p) for p in manifest.get("passes", [])],
        notes=[_record(Note, n) for n in manifest.get("notes", [])],
        config=manifest.get("compile_config", {}),
        pipeline=list(manifest.get("pipeline", [])),
    )
    return CompiledModel(
        gm,
        input_names=input_names,
        output_kind=manifest.get("output_kind", captured.output_kind),
        report=report,
        model_config=manifest["model_config"],
        model_class=manifest["model_class"],
        source_graph=source_graph,
    )


def _record(cls: type, d: dict[str, Any]) -> Any:
    """A report dataclass from its saved dict (fields added by later versions are dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    if "seconds" in names:
        kw.setdefault("seconds", 0.0)  # wall times are not saved
    if "sqnr_db" in kw:
        kw["sqnr_db"] = _float(kw["sqnr_db"])
    return cls(**kw)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved with the artifact at ``path``, or None if none was saved."""
    root = Path(path).expanduser()
    name = read_manifest(root).get("tokenizer")
    if not name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root / name))


def _skeleton(manifest: dict[str, Any]) -> torch.nn.Module:
    """The HF model built from the saved config, without initialising weights (all get replaced)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    cfg_dict = dict(manifest["model_config"])
    model_type = cfg_dict.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, KeyError) as e:
        raise ArtifactError(
            f"the saved config has model_type {model_type!r}, which this transformers "
            f"({transformers.__version__}) does not know: {e}"
        ) from e
    dtype = getattr(torch, str(manifest.get("model_dtype", "float32")))
    cls = getattr(transformers, str(manifest["model_class"]), None)
    with no_init_weights():
        if isinstance(cls, type) and hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped together with the init; export names tied tensors once
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # deterministic, finite values for passes that rerun before the tensors are set
    return model.eval()


def _set_tensors(gm: GraphModule, tensors: dict[str, torch.Tensor], names: set[str], root: Path) -> None:
    """Replace every graph attribute the artifact holds, refusing shape or dtype changes."""
    present = _graph_tensors(gm)
    for name, old in present.items():
        if name not in names:
            continue
        new = tensors[name]
        if old.shape != new.shape or (old.is_floating_point() != new.is_floating_point()):
            raise ArtifactError(
                f"shape mismatch for tensor '{name}': {root / WEIGHTS} holds {_dtype_name(new.dtype)} "
                f"{list(new.shape)}, the model rebuilt from the saved config expects {_dtype_name(old.dtype)} "
                f"{list(old.shape)} (was the config in {MANIFEST} edited?)"
            )
        set_attr(gm, name, new)


class _Annotator:
    """Attaches a LinearInfo (with the packed weight) to every linear the saved graph reported.

    Called before each replayed pass (a pass may rebuild linear nodes) and once at the end;
    linears are matched by module name and occurrence, each record attached once.
    """

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]):
        self.records = {(r["name"], r.get("occurrence", 0)): r for r in manifest["layers"]}
        self.tensors = tensors
        self.attached: dict[tuple[str, int], LinearInfo] = {}

    def __call__(self, gm: GraphModule, final: bool = False) -> None:
        seen: collections.Counter[str] = collections.Counter()
        for site in linear_sites(gm):
            key = (site.name, seen[site.name])
            seen[site.name] += 1
            if key in self.records and key not in self.attached and info(site.node) is None:
                rec = self.records[key]
                site.node.meta["qqq"] = self.attached[key] = self._info(rec)
                if rec.get("smooth_record"):
                    site.node.meta["qqq_smooth"] = self._smooth_record(rec["smooth_record"])
        if final:
            present = {id(li) for n in gm.graph.nodes if isinstance(li := info(n), LinearInfo)}
            lost = [k for k in self.records if k not in self.attached or id(self.attached[k]) not in present]
            if lost:
                raise ArtifactError(
                    f"linear(s) {[k[0] for k in lost[:3]]} of the artifact are not in the model rebuilt from its "
                    "config; the config or transformers version differs from the one used to compile"
                )

    def _info(self, rec: dict[str, Any]) -> LinearInfo:
        out_f, in_f = rec["shape"]
        li = LinearInfo(rec["name"], in_f, out_f)
        li.method, li.skipped, li.gptq = rec.get("method"), rec.get("skipped"), rec.get("gptq")
        li.smooth_group = rec.get("smooth_group")
        rng = rec.get("smooth_scale_range")
        li.smooth_scale_range = tuple(rng) if rng else None
        li.weight_sqnr_db = _float(rec.get("weight_sqnr_db"))
        li.act_samples = int(rec.get("act_samples") or 0)
        if rec.get("act_absmax"):
            li.act_absmax = self.tensors[rec["act_absmax"]]
        if rec.get("tensors"):
            t = {k: self.tensors[v] for k, v in rec["tensors"].items()}
            li.packed = PackedW4(t["qweight"], t["channel_scale"], t.get("group_scale"), in_f, rec["group_size"])
        return li

    def _smooth_record(self, spec: dict[str, Any]) -> Any:
        """The smoothing record as its qqq_compile dataclass (a namespace if that class is gone)."""
        kw = {}
        for k, v in spec.get("fields", {}).items():
            if isinstance(v, dict) and set(v) == {"tensor"}:
                v = self.tensors[v["tensor"]]
            elif v in ("inf", "-inf", "nan"):
                v = float(v)
            kw[k] = v
        module, _, name = str(spec.get("class", "")).rpartition(".")
        if module.startswith("qqq_compile."):  # only our own classes are ever imported
            try:
                cls = getattr(importlib.import_module(module), name)
                names = {f.name for f in dataclasses.fields(cls)}
                return cls(**{k: v for k, v in kw.items() if k in names})
            except (ImportError, AttributeError, TypeError):
                pass
        return types.SimpleNamespace(**kw)


def _replay_passes(manifest: dict[str, Any]) -> list[tuple[str, QQQPass | None]]:
    """(name, pass object or None) for every pass of the saved pipeline, in order."""
    from . import passes
    from .presets import get_preset

    # Register every built-in pass (one per module), also those no preset imports.
    for mod in pkgutil.iter_modules(passes.__path__):
        importlib.import_module(f"{passes.__name__}.{mod.name}")
    names = list(manifest.get("pipeline", []))
    try:
        cfg = CompileConfig.from_dict(manifest.get("compile_config") or {})
        preset = get_preset(cfg.preset, **cfg.preset_options)
        if [p.name for p in preset] == names:
            return list(zip(names, preset, strict=True))
    except (ConfigError, KeyError, TypeError):
        pass  # a custom pass list: rebuild each pass by name below
    out: list[tuple[str, QQQPass | None]] = []
    for n in names:
        try:
            out.append((n, PASSES.get(n)()))
        except (KeyError, TypeError):
            out.append((n, None))
    return out


def _replay(gm: GraphModule, manifest: dict[str, Any], annotate: _Annotator) -> list[str]:
    """Replay the pipeline's structural rewrites; returns the modifying passes it skipped."""
    try:
        quant = CompileConfig.from_dict(manifest.get("compile_config") or {}).quant
    except ConfigError as e:
        raise ArtifactError(f"the CompileConfig in {MANIFEST} is invalid: {e}") from e
    ctx = CompileContext(calib=[], quant=quant, progress=False)
    states = manifest.get("replay_state") or {}
    modified = {p["name"] for p in manifest.get("passes", []) if p.get("modified")}
    skipped = []
    for name, p in _replay_passes(manifest):
        mode = getattr(p, "replay_mode", None) or _BUILTIN_REPLAY.get(name)
        try:
            if p is not None and callable(getattr(p, "replay", None)):
                annotate(gm)
                p.replay(gm, ctx, states.get(name))
            elif p is not None and mode == "rerun":
                annotate(gm)
                p.call(gm, ctx)
            elif name in modified:
                skipped.append(name)  # assumed to change tensor values only; checked afterwards
        except ArtifactError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised naming the pass
            raise ArtifactError(f"replaying pass '{name}' failed: {type(e).__name__}: {e}") from e
    gm.meta["qqq_replay"] = states
    return skipped


def _check_replayed(gm: GraphModule, manifest: dict[str, Any], root: Path, skipped: list[str]) -> None:
    """The replayed graph must read exactly the saved tensors and call the same ops."""
    needed = set(_graph_tensors(gm))
    saved = set(manifest["graph_tensors"])
    ops = _op_counts(gm)
    want_ops = manifest.get("graph_ops", ops)
    if needed == saved and ops == want_ops:
        return
    diff = sorted(k for k in set(ops) | set(want_ops) if ops.get(k, 0) != want_ops.get(k, 0))
    details = []
    if needed - saved:
        details.append(f"tensors the artifact lacks: {sorted(needed - saved)[:5]}")
    if saved - needed:
        details.append(f"saved tensors the replayed graph does not read: {sorted(saved - needed)[:5]}")
    if diff:
        counts = ", ".join(f"{k} (saved {want_ops.get(k, 0)}, now {ops.get(k, 0)})" for k in diff[:5])
        details.append(f"op counts differ for {counts}")
    vers = manifest.get("versions", {})
    raise ArtifactError(
        f"the graph rebuilt from {root} differs from the saved one ({'; '.join(details)}). "
        f"Passes that changed the graph and were not replayed: {skipped or 'none'}; a pass that rewrites "
        "structure must declare "
        "replay_mode = 'rerun' or implement replay(gm, ctx, state). Saved with torch "
        f"{vers.get('torch')}, transformers {vers.get('transformers')}; running torch {torch.__version__}."
    )
