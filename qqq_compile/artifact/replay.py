"""Rebuilding a saved graph by capture and replay (the path that needs no graph file).

The HF model is rebuilt from its saved config (no weight init) and captured; every saved
tensor is set by its graph attribute name; the saved pass list is rebuilt from its
configs (``pass_configs``) and run by the driver with each pass wrapped by its replay
mode (:func:`qqq_compile.compiler.driver.replay_passes`); before each pass, every linear gets its
saved :class:`~qqq_compile.graph.LinearInfo` back (matched by module name and occurrence).
Afterwards the graph must read exactly the saved tensors and call the same ops.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from qqq_compile.annotations import decode_linear, graph_annotation, node_annotation, set_node_annotation
from qqq_compile.artifact.manifest import MANIFEST, WEIGHTS, dtype_name
from qqq_compile.artifact.save import graph_tensors_of, op_counts
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.driver import build_context, config_passes, implied_passes, replay_passes, run_pipeline
from qqq_compile.compiler.pipeline import (
    PASSES,
    CompileContext,
    Instrument,
    PassResult,
    QQQPass,
    pass_from_dict,
)
from qqq_compile.config import CompileConfig, ConfigError
from qqq_compile.errors import ArtifactError, PipelineError
from qqq_compile.graph import LinearInfo, info, linear_sites, set_attr


def saved_pass_specs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved pipeline as pass specs. Format 1.0 stored only pass names: its passes are
    rebuilt from the saved preset when the names match (alone, or followed by the passes
    the saved config implies, such as ``int8_head``), else by name: with the options the
    config implies for an implied pass, default options for the others."""
    if "pass_configs" in manifest:
        return list(manifest["pass_configs"])
    from qqq_compile.compiler.presets import get_preset

    names = list(manifest.get("pipeline", []))
    implied: dict[str, dict[str, Any]] = {}
    try:
        cfg = CompileConfig.from_dict(manifest.get("compile_config") or {})
        implied = {p.name: p.to_dict() for p in config_passes(cfg)}
        preset = get_preset(cfg.preset, **cfg.preset_options)
        for candidate in (preset, [*preset, *implied_passes(cfg, preset)]):
            if [p.name for p in candidate] == names:
                return [p.to_dict() for p in candidate]
    except (ConfigError, KeyError, TypeError, ValueError):
        pass  # a custom pass list
    return [implied.get(n, {"name": n, "options": None}) for n in names]


class _Unknown(QQQPass):
    """Stands in for a saved pass this process has not registered: nothing is replayed."""

    replay_mode = "tensors"

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def call(self, graph_module: GraphModule, ctx: CompileContext) -> PassResult:
        return PassResult(graph_module, False)


def rebuild_passes(specs: list[dict[str, Any]]) -> list[QQQPass]:
    out: list[QQQPass] = []
    for spec in specs:
        name = spec.get("name")
        if name not in PASSES:
            out.append(_Unknown(str(name)))
            continue
        try:
            out.append(pass_from_dict(spec))
        except (ConfigError, TypeError) as e:
            raise ArtifactError(
                f"the saved pass '{name}' has options {spec.get('options')} that this qqq_compile rejects ({e}); "
                "compile the model again and save it with this version"
            ) from e
    return out


def skeleton(manifest: dict[str, Any]) -> torch.nn.Module:
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
        saved = (manifest.get("versions") or {}).get("transformers", "unknown")
        raise ArtifactError(
            f"the saved config has model_type {model_type!r}, which this transformers "
            f"({transformers.__version__}) does not know (the artifact was saved with transformers {saved}): "
            "install a transformers release that has this architecture (pip install -U transformers)"
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


def set_tensors(gm: GraphModule, tensors: dict[str, torch.Tensor], names: set[str], root: Path) -> None:
    """Replace every graph attribute the artifact holds, refusing shape or dtype changes."""
    for name, old in graph_tensors_of(gm).items():
        if name not in names:
            continue
        new = tensors[name]
        if old.shape != new.shape or (old.is_floating_point() != new.is_floating_point()):
            raise ArtifactError(
                f"shape mismatch for tensor '{name}': {root / WEIGHTS} holds {dtype_name(new.dtype)} "
                f"{list(new.shape)}, the model rebuilt from the saved config expects {dtype_name(old.dtype)} "
                f"{list(old.shape)} (was the config in {MANIFEST} edited?)"
            )
        set_attr(gm, name, new)


class Annotator(Instrument):
    """Before each replayed pass (a pass may rebuild linear nodes) and once at the end,
    attaches the saved LinearInfo (with its packed weight) to every linear the saved graph
    reported; each record once."""

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]):
        self.records = {(r["name"], r.get("occurrence", 0)): r for r in manifest["layers"]}
        self.tensors = tensors
        self.attached: dict[tuple[str, int], LinearInfo] = {}

    def before_pass(self, index: int, pass_: QQQPass, gm: GraphModule) -> None:
        self.attach(gm)

    def attach(self, gm: GraphModule) -> None:
        seen: collections.Counter[str] = collections.Counter()
        for site in linear_sites(gm):
            key = (site.name, seen[site.name])
            seen[site.name] += 1
            if key in self.records and key not in self.attached and info(site.node) is None:
                li, smooth = decode_linear(self.records[key], self.tensors)
                li.lowered = False  # the replayed lower pass lowers it (again)
                ann = node_annotation(site.node)
                ann.linear, ann.smooth = li, smooth if smooth is not None else ann.smooth
                set_node_annotation(site.node, ann)
                self.attached[key] = li

    def finish(self, gm: GraphModule) -> None:
        self.attach(gm)
        present = {id(li) for n in gm.graph.nodes if isinstance(li := info(n), LinearInfo)}
        lost = [k for k in self.records if k not in self.attached or id(self.attached[k]) not in present]
        if lost:
            raise ArtifactError(
                f"linear(s) {[k[0] for k in lost[:3]]} of the artifact are not in the model rebuilt from its "
                "config; the config or transformers version differs from the one used to compile"
            )


def example_inputs(manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
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
    return example


def rebuild_by_replay(
    root: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], specs: list[dict[str, Any]]
) -> tuple[GraphModule, Any]:
    """``(graph, captured)``: the saved graph rebuilt by capture and replay."""
    try:
        config = CompileConfig.from_dict(manifest.get("compile_config") or {})
    except ConfigError as e:
        raise ArtifactError(f"the CompileConfig in {MANIFEST} is invalid: {e}") from e
    pass_list = rebuild_passes(specs)
    captured = capture(skeleton(manifest), example_inputs(manifest))
    gm = captured.graph_module
    saved_names = set(manifest["graph_tensors"])
    set_tensors(gm, tensors, saved_names, root)
    annotate = Annotator(manifest, tensors)
    states = manifest.get("replay_state") or {}
    ctx = build_context(config, progress=False)
    try:
        gm, _ = run_pipeline(gm, ctx, replay_passes(pass_list, states), [annotate])
    except PipelineError as e:
        cause = e.__cause__ or e
        if isinstance(cause, ArtifactError):
            raise cause from e
        raise ArtifactError(f"replaying pass '{e.pass_name}' failed: {type(cause).__name__}: {cause}") from e
    graph_annotation(gm).replay.update(states)
    annotate.finish(gm)
    set_tensors(gm, tensors, saved_names, root)
    modified = {p["name"] for p in manifest.get("passes", []) if p.get("modified")}
    skipped = [p.name for p in pass_list if p.effective_replay_mode() == "tensors" and p.name in modified]
    check_rebuilt(gm, manifest, root, skipped)
    return gm, captured


def check_rebuilt(gm: GraphModule, manifest: dict[str, Any], root: Path, skipped: list[str] | None) -> None:
    """The rebuilt graph must read exactly the saved tensors and call the same ops.
    ``skipped``: the modifying passes that were not replayed (None: the graph file was read)."""
    needed = set(graph_tensors_of(gm))
    saved = set(manifest["graph_tensors"])
    ops = op_counts(gm)
    want_ops = manifest.get("graph_ops", ops)
    if needed == saved and ops == want_ops:
        return
    diff = sorted(k for k in set(ops) | set(want_ops) if ops.get(k, 0) != want_ops.get(k, 0))
    details = []
    if needed - saved:
        details.append(f"tensors the artifact lacks: {sorted(needed - saved)[:5]}")
    if saved - needed:
        details.append(f"saved tensors the rebuilt graph does not read: {sorted(saved - needed)[:5]}")
    if diff:
        counts = ", ".join(f"{k} (saved {want_ops.get(k, 0)}, now {ops.get(k, 0)})" for k in diff[:5])
        details.append(f"op counts differ for {counts}")
    vers = manifest.get("versions", {})
    if skipped is None:
        raise ArtifactError(
            f"the graph file of {root} does not match its manifest ({'; '.join(details)}): the artifact is "
            "corrupt; save it again"
        )
    legacy = ""
    if "pass_configs" not in manifest:
        legacy = (
            f" This artifact uses format {manifest.get('format_version')}, which stored pass names only, so the "
            "passes were rebuilt with default options: compile the model again and save it with this qqq_compile "
            "(format 1.1 stores each pass's options)."
        )
    raise ArtifactError(
        f"the graph rebuilt from {root} differs from the saved one ({'; '.join(details)}). "
        f"Passes that changed the graph and were not replayed: {skipped or 'none'}; a pass that rewrites "
        "structure must declare replay_mode = 'rerun' or implement replay(gm, ctx, state). Saved with torch "
        f"{vers.get('torch')}, transformers {vers.get('transformers')}; running torch {torch.__version__}.{legacy}"
    )
