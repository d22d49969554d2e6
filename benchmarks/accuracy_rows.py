"""Rows of ``benchmarks/accuracy.py`` as data, and the child process that measures one.

A row is a :class:`Row`: a preset name, a ``QuantConfig`` dict and preset options (or an
explicit pass list), plus a ``mode`` that says which side is quantized:

* ``w4a8``: the compiled model, lowered ``torch.ops.qqq.w4a8_linear`` kernels.
* ``w4a16``: weights only. The row's pipeline runs up to (not including) ``lower``; every
  annotated linear's float weight is replaced by exactly what its packed int4 weight
  decodes to (``PackedW4.dequantize()``), activations stay float.
* ``w16a8``: activations only. Same pipeline minus ``lower`` and minus ``gptq`` (it only
  annotates, and its weights would be thrown away here): the linears keep their float32
  weights (after rotation/smoothing, which do change them) and read per-token int8
  fake-quantized inputs (``formats.fake_quant_act``, the values the kernels quantize to).
* ``fake``: both of the above at once: W4A8 by fake quantization, a check that the two
  split rows decompose what the kernels compute. Per linear it matches the kernels to
  ~3e-7 relative on SmolLM2's own activations (RTN g128), but end to end the per-token
  int8 rounding amplifies those float differences layer after layer: the logits of one
  window differed by 7% relative (against 43% for W4A8 vs FP32), and perplexity by
  0.4-1.6% on 4-window smoke splits. Differences of that size between rows are noise.

The built-in rows were measured with the lm_head in float, before the int8 lm_head
(``QuantConfig.int8_head``) became the default: their ``QuantConfig`` dicts say
``"int8_head": False`` so that their figures stay reproducible. A row without the key
(an ``--extra-row``) gets the default, the int8 head.

``NAME:MODE`` derives a row from any row (``rot_gptq_g128:w4a16``). The split-error
rewrite is :func:`split_error`; it runs on the graph ``compile`` returns, so no pass and
no option of the package is involved.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

MODES = ("w4a8", "w4a16", "w16a8", "fake")
MODE_LABEL = {
    "w4a16": "W4A16 (weights only)",
    "w16a8": "W16A8 (activations only; fp32 weights)",
    "fake": "W4A8 by fake quantization",
}
SPLITS = ("val", "eval", "lee")


@dataclass(frozen=True)
class Row:
    """One measured configuration. ``preset`` None (and no ``passes``) is the FP32 model.

    ``passes``: an explicit pass list (``{"name", "options"}`` specs) instead of the
    preset, for options no preset exposes. ``candidate``: may be picked as the default
    (None: every own W4A8 row with a quantizer).
    """

    label: str
    preset: str | None = None
    quant: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] | None = None
    mode: str = "w4a8"
    candidate: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        if self.mode != "w4a8" and self.is_fp32:
            raise ValueError(f"mode={self.mode!r} needs a quantizing row (a preset or passes), not the FP32 one")

    @property
    def is_fp32(self) -> bool:
        return self.preset is None and self.passes is None

    @property
    def is_candidate(self) -> bool:
        return (not self.is_fp32 and self.mode == "w4a8") if self.candidate is None else self.candidate

    def config(self) -> dict[str, Any]:
        """The ``CompileConfig`` dict ``qqq_compile.compile`` gets."""
        options = {} if self.passes is not None else self.options
        return {"preset": self.preset or "qqq", "quant": self.quant, "preset_options": options}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(d) - known:
            raise ValueError(f"unknown row key(s) {sorted(unknown)}; a row has {sorted(known)}")
        return cls(**d)


#: What the built-in rows were measured with (see the module docstring).
FLOAT_HEAD: dict[str, Any] = {"int8_head": False}


def _rot(gs: int) -> Row:
    name = "per-channel" if gs < 0 else f"g{gs}"
    opts = {"rotation": True, "smoothing": None}
    return Row(f"Rotation + GPTQ W4A8 {name}", "qqq", {"group_size": gs, **FLOAT_HEAD}, opts)


OWN_ROWS: dict[str, Row] = {
    "fp32": Row("FP32 (reference)"),
    "rtn_pc": Row("RTN W4A8 per-channel", "rtn", {"group_size": -1, **FLOAT_HEAD}),
    "rtn_g128": Row("RTN W4A8 g128", "rtn", {"group_size": 128, **FLOAT_HEAD}),
    "smoothquant_pc": Row("SmoothQuant + RTN W4A8 per-channel", "smoothquant", {"group_size": -1, **FLOAT_HEAD}),
    "gptq_pc": Row("GPTQ W4A8 per-channel", "gptq", {"group_size": -1, **FLOAT_HEAD}),
    "gptq_g128": Row("GPTQ W4A8 g128", "gptq", {"group_size": 128, **FLOAT_HEAD}),
    "qqq_pc": Row("QQQ W4A8 per-channel", "qqq", {"group_size": -1, **FLOAT_HEAD}),
    "qqq_g128": Row("QQQ W4A8 g128", "qqq", {"group_size": 128, **FLOAT_HEAD}),
    "qqq_g128_fp16": Row(
        "QQQ W4A8 g128 (fp16 group scales)",
        "qqq",
        {"group_size": 128, "group_scale_dtype": "float16", **FLOAT_HEAD},
    ),
    "qqq_rot_pc": Row("QQQ + rotation W4A8 per-channel", "qqq", {"group_size": -1, **FLOAT_HEAD}, {"rotation": True}),
    "rot_gptq_pc": _rot(-1),
    "rot_gptq_g128": _rot(128),
    # No preset option reaches RotateConfig yet: the explicit pass list of the qqq preset.
    "rot_gptq_g128_no_online": Row(
        "Rotation (no online down_proj Hadamard) + GPTQ W4A8 g128",
        passes=[
            {"name": "rotate", "options": {"online_down_proj": False}},
            {"name": "gptq", "options": {"group_size": 128}},
            {"name": "quantize_rtn", "options": {"group_size": 128}},
            {"name": "lower"},
        ],
        quant={"group_size": 128, **FLOAT_HEAD},
    ),
}
# Rows that split the error of the rotation + GPTQ pipelines (and of plain per-token
# activations, without any transform), derived by NAME:MODE.
SPLIT_ROWS = ["rot_gptq_g128:w4a16", "rot_gptq_g128:w16a8", "rot_gptq_pc:w4a16", "rtn_pc:w16a8"]

# name: (label, venv folder, runner script, runner arguments)
PEER_ROWS: dict[str, tuple[str, str, str, list[str]]] = {
    "llmc_gptq_pc": ("llm-compressor GPTQ W4A8 per-channel", "venv-llmc", "run_llmcompressor.py", ["--scheme", "gptq"]),
    "llmc_sq_gptq_pc": (
        "llm-compressor SmoothQuant+GPTQ W4A8 per-channel",
        "venv-llmc",
        "run_llmcompressor.py",
        ["--scheme", "smoothquant_gptq"],
    ),
    "torchao_8da4w_pc": ("torchao 8da4w per-channel", "venv-torchao", "run_torchao.py", ["--group-size", "-1"]),
    "torchao_8da4w_g64": ("torchao 8da4w g64", "venv-torchao", "run_torchao.py", ["--group-size", "64"]),
    "torchao_8da4w_g128": ("torchao 8da4w g128", "venv-torchao", "run_torchao.py", ["--group-size", "128"]),
}
DEFAULT_ROWS = [r for r in OWN_ROWS if r not in ("qqq_g128_fp16",)] + SPLIT_ROWS + list(PEER_ROWS)


def parse_extra_row(text: str) -> tuple[str, Row]:
    """``NAME=JSON`` (the :class:`Row` fields; ``label`` defaults to NAME) -> (name, row)."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name or ":" in name:
        raise ValueError(f"--extra-row {text!r}: expected NAME=JSON with a NAME without ':'")
    try:
        d = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"--extra-row {name}: the JSON does not parse ({e}); quote it for the shell") from e
    if not isinstance(d, dict):
        raise ValueError(f"--extra-row {name}: expected a JSON object of row fields, got {type(d).__name__}")
    return name, Row.from_dict({"label": name, **d})


def resolve_row(name: str, rows: dict[str, Row]) -> Row:
    """The row ``name`` names: a key of ``rows``, or ``BASE:MODE`` derived from one."""
    base, _, mode = name.partition(":")
    if base not in rows:
        raise KeyError(name)
    row = rows[base]
    if not mode:
        return row
    if mode not in MODES or row.mode != "w4a8":
        raise ValueError(f"row {name!r}: the mode after ':' is one of {MODES}, on a w4a8 row")
    return dataclasses.replace(row, label=f"{row.label} — {MODE_LABEL.get(mode, mode)}", mode=mode, candidate=False)


# ----------------------------------------------------------------------------- child


def split_error(gm: Any, mode: str) -> int:
    """Rewrite a graph compiled *without* ``lower`` so that only one side is quantized
    (``w4a16``: packed weights decoded to float; ``w16a8``: fake-quantized inputs;
    ``fake``: both). Touches exactly the linears that carry a packed weight; returns
    their number."""
    from qqq_compile.graph import info, linear_sites, set_weight
    from qqq_compile.targets.w4a8.formats import fake_quant_act

    if mode not in ("w4a16", "w16a8", "fake"):
        raise ValueError(f"split_error: mode={mode!r} is not 'w4a16', 'w16a8' or 'fake'")
    count = 0
    for site in linear_sites(gm):
        li = info(site.node)
        if li is None or li.packed is None or li.lowered:
            continue
        if mode in ("w4a16", "fake"):
            set_weight(gm, site, li.packed.dequantize())
        if mode in ("w16a8", "fake"):
            with gm.graph.inserting_before(site.node):
                xq = gm.graph.call_function(fake_quant_act, (site.x,))
            site.node.replace_input_with(site.x, xq)
        count += 1
    gm.recompile()
    return count


def register_all_passes() -> None:
    """Make every built-in pass known by name, so that explicit pass lists can name any of
    them: importing the package does it (``presets`` imports every pass module)."""
    import qqq_compile.compiler.presets  # noqa: F401 - registration only


def split_passes(row: Row) -> tuple[list[Any], list[str]]:
    """The row's pass list for a split mode: cut before ``lower`` (and, for ``w16a8``,
    without ``gptq``); also the names of the passes left out."""
    from qqq_compile.compiler.driver import build_passes

    register_all_passes()
    passes = build_passes(row.config(), row.passes)
    names = [p.name for p in passes]
    if "lower" not in names:
        raise ValueError(f"row {row.label!r}: mode {row.mode} needs a pipeline with a 'lower' pass, got {names}")
    cut = names.index("lower")
    keep = [p for p in passes[:cut] if not (row.mode == "w16a8" and p.name == "gptq")]
    dropped = [p.name for p in passes if p not in keep]
    return keep, dropped


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _weight_format(cm: Any, mode: str) -> dict[str, Any]:
    """Bits per weight of the quantized linears (scales included), their count and format."""
    lin = cm.linears()
    packed = [li for li in lin if li.packed is not None]
    n_weights = sum(li.in_features * li.out_features for li in packed)
    out: dict[str, Any] = {"quantized_linears": f"{len(packed)}/{len(lin)}"}
    if mode == "w16a8" or not packed:
        out["bits_per_weight"] = 32.0  # float32 weights
        return out
    out["bits_per_weight"] = 8.0 * sum(li.packed.nbytes() for li in packed) / n_weights
    fmts = {(li.packed.group_size, li.packed.group_scale_dtype) for li in packed}
    out["format"] = ", ".join("per-channel" if g <= 0 else f"g{g} {d} group scales" for g, d in sorted(fmts))
    return out


def run_own_row(name: str, row: Row, data_path: str, threads: int) -> dict[str, Any]:
    """Quantize once, then evaluate every split in the data file (this process)."""
    import torch

    torch.set_num_threads(threads)
    import qqq_compile as qc
    from qqq_compile.eval import perplexity
    from qqq_compile.models import load_model

    register_all_passes()
    data = torch.load(data_path)
    model, _ = load_model("demo")
    out: dict[str, Any] = {"row": name, "label": row.label, "spec": row.to_dict()}
    if row.is_fp32:
        model_fn: Any = model
        out["quant_s"] = None
        out["bits_per_weight"] = 32.0
    else:
        passes, dropped = (row.passes, []) if row.mode == "w4a8" else split_passes(row)
        t0, c0 = time.perf_counter(), _cpu_s()
        cm = qc.compile(model, list(data["calib"]), row.config(), passes=passes, progress=False)
        if row.mode != "w4a8":
            out["split_linears"] = split_error(cm.graph_module, row.mode)
            out["dropped_passes"] = dropped
        out["quant_s"] = time.perf_counter() - t0
        # CPU seconds (all threads): robust to other processes sharing the machine.
        out["quant_cpu_s"] = _cpu_s() - c0
        out["passes"] = {p.name: round(p.seconds, 1) for p in cm.report.passes}
        out["notes"] = [f"{n.pass_name}: {n.message}" for n in cm.report.notes if n.level == "warning"][:10]
        out["w4a8_linears"] = sum(1 for li in cm.linears() if li.lowered)
        out.update(_weight_format(cm, row.mode))
        out["config"] = row.config()
        model_fn = cm
        del model
    out["ppl"], out["eval_s"] = {}, {}
    for split in SPLITS:
        if split in data:
            t0 = time.perf_counter()
            out["ppl"][split] = perplexity(model_fn, list(data[split]), batch_size=8, progress=False)
            out["eval_s"][split] = time.perf_counter() - t0
    out["peak_rss_mb"] = _rss_mb()
    return out
