"""Run every bad input we test against and write what the user sees to docs/bad_inputs.md.

    .venv/bin/python scripts/bad_input_catalogue.py [--out docs/bad_inputs.md]

Each case runs on a tiny random-weight model (seconds in all). The tests that assert on
these messages live in tests/test_reliability.py, tests/test_artifact.py,
tests/compiler/test_blockwise.py, tests/compiler/test_api.py and tests/test_data.py; this script only
records the wording, so the catalogue in the docs never drifts from the code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import qqq_compile as qc  # noqa: E402
from qqq_compile.artifact import MANIFEST, WEIGHTS, load  # noqa: E402
from qqq_compile.compiler.pipeline import sqnr_db  # noqa: E402
from tests.compiler.test_blockwise import Branchy, Stack, ValueBranchBlock  # noqa: E402
from tests.conftest import tiny_calib, tiny_model  # noqa: E402
from tests.test_reliability import Odd  # noqa: E402

CALIBRATE = {"preset": "rtn", "preset_options": {"calibrate": True}}


def llama(**kw) -> nn.Module:
    return tiny_model("llama", num_hidden_layers=1, **kw)


def with_token(calib: list[torch.Tensor], i: int, j: int, value: int) -> list[torch.Tensor]:
    calib[i][0, j] = value
    return calib


def nan_model() -> nn.Module:
    m = llama()
    with torch.no_grad():
        m.model.embed_tokens.weight[5] = float("nan")
    return m


def fp16_overflow_model() -> nn.Module:
    m = llama()
    with torch.no_grad():
        m.model.layers[0].mlp.gate_proj.weight.mul_(1000)
        m.model.layers[0].mlp.up_proj.weight.mul_(1000)
    return m.half()


def padded_call() -> object:
    compiled = qc.compile(llama(), config=qc.CompileConfig(preset="rtn"), progress=False)
    x = torch.randint(0, 256, (2, 6))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    return compiled(x, attention_mask=mask)


def branchy() -> str:
    compiled = qc.compile(Branchy().eval(), tiny_calib(16), {"preset": "rtn"}, progress=False)
    return f"{type(compiled).__name__}; " + notes(compiled, "block")


def lowered(model: nn.Module, group: int) -> str:
    compiled = qc.compile(model, tiny_calib(16), {"quant": {"group_size": group}}, progress=False)
    n = sum(1 for li in compiled.linears() if li.lowered)
    x = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        db = sqnr_db(model(x).logits, compiled(x).logits)
    return f"{n} of {len(compiled.linears())} linears lowered to W4A8 (lm_head kept); logits SQNR {db:.1f} dB"


def odd_layers() -> str:
    torch.manual_seed(0)
    config = {"quant": {"group_size": 32, "skip": []}}
    compiled = qc.compile(Odd().eval(), tiny_calib(16, vocab=64), config, progress=False)
    n = sum(1 for li in compiled.linears() if li.lowered)
    return f"{n} linears lowered (fc, k2, n1, head); " + notes(compiled, "kept in float")


def notes(compiled: qc.CompiledModel, word: str) -> str:
    found = [n.message for n in compiled.report.notes if word in n.message]
    return found[0] if found else "(no note)"


def artifact_cases(root: Path) -> list[tuple[str, Callable[[], object]]]:
    good = root / "good"
    qc.compile(llama(), tiny_calib(16), {"preset": "rtn"}, progress=False).save(good)

    def damaged(name: str, damage: Callable[[Path], None]) -> Callable[[], object]:
        def run() -> object:
            path = root / name
            os.system(f"cp -r {good} {path}")
            damage(path)
            return load(path)

        return run

    def edit(**changes) -> Callable[[Path], None]:
        def f(path: Path) -> None:
            m = json.loads((path / MANIFEST).read_text())
            m.update(changes)
            (path / MANIFEST).write_text(json.dumps(m))

        return f

    def truncate(path: Path) -> None:
        data = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(data[:-100])

    def flip(path: Path) -> None:
        data = bytearray((path / WEIGHTS).read_bytes())
        data[-3] ^= 0xFF
        (path / WEIGHTS).write_bytes(bytes(data))

    return [
        ("artifact folder does not exist", lambda: load(root / "nothing")),
        ("artifact without its manifest", damaged("nomanifest", lambda p: (p / MANIFEST).unlink())),
        ("foreign folder (another tool's manifest format)", damaged("foreign", edit(format="someone.else"))),
        ("manifest that is not JSON", damaged("badjson", lambda p: (p / MANIFEST).write_text("{not json"))),
        ("artifact from a newer major format version", damaged("newer", edit(format_version="2.0"))),
        ("weights file missing", damaged("noweights", lambda p: (p / WEIGHTS).unlink())),
        ("weights file truncated", damaged("truncated", truncate)),
        ("weights file with flipped bytes", damaged("corrupt", flip)),
    ]


def cases(root: Path) -> list[tuple[str, Callable[[], object]]]:
    return [
        (
            "NaN in the calibration activations",
            lambda: qc.compile(nan_model(), with_token(tiny_calib(4), 0, 3, 5), CALIBRATE, progress=False),
        ),
        (
            "fp16 overflow inside the model during calibration",
            lambda: qc.compile(fp16_overflow_model(), tiny_calib(4), CALIBRATE, progress=False),
        ),
        (
            "float tensors given as calibration token ids",
            lambda: qc.compile(llama(), [torch.full((1, 16), float("nan"))], progress=False),
        ),
        ("empty calibration data", lambda: qc.compile(llama(), [], progress=False)),
        ("no calibration data for a preset that needs it", lambda: qc.compile(llama(), None, progress=False)),
        ("one-token calibration windows", lambda: qc.compile(llama(), torch.randint(0, 256, (8, 1)), progress=False)),
        (
            "token id outside the vocabulary",
            lambda: qc.compile(llama(), with_token(tiny_calib(4), 2, 7, 300), progress=False),
        ),
        (
            "too little calibration text (a warning; the model is built)",
            lambda: qc.compile(llama(), tiny_calib(2), CALIBRATE, progress=False),
        ),
        ("a padding mask at inference (the graph assumes none)", padded_call),
        (
            "unknown key in a config file",
            lambda: qc.CompileConfig.from_dict({"preset": "qqq", "quant": {"group_sise": 128}}),
        ),
        ("invalid group size", lambda: qc.QuantConfig(group_size=100 + 1)),
        ("model torch.export cannot capture whole (a branch on token values)", branchy),
        (
            "a decoder block that cannot be exported either",
            lambda: qc.compile(Stack(ValueBranchBlock).eval(), tiny_calib(16, vocab=64), progress=False),
        ),
        ("layers with no W4A8 rewrite (embedding, Conv2d, einsum), K=2 and N=1 linears", odd_layers),
        ("hidden size not a multiple of the group (K=96, g=64)", lambda: lowered(llama(hidden_size=96), 64)),
        *artifact_cases(root),
    ]


def outcome(fn: Callable[[], object]) -> tuple[str, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - recording what the user sees
            return type(e).__name__, str(e)
    warned = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if warned:
        return "UserWarning (model built)", warned[0]
    if isinstance(result, str):
        return "model built, report note", result
    return "model built", ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, fn in cases(Path(d)):
            kind, msg = outcome(fn)
            msg = " ".join(msg.replace(d, "<dir>").split()).replace("|", "\\|")
            rows.append(f"| {name} | {kind} | {msg[:600]} |")
            print(f"{name}: {kind}", flush=True)
    text = "\n".join(
        [
            "# Bad input: what the user sees",
            "",
            "Generated by `scripts/bad_input_catalogue.py` (tiny random-weight models); the tests that",
            "assert on each message are in `tests/test_reliability.py`, `tests/test_artifact.py`,",
            "`tests/compiler/test_blockwise.py`, `tests/compiler/test_api.py` and `tests/test_data.py`.",
            "In every error case the",
            "user's model is left unmodified and nothing half-written is left on disk.",
            "",
            "| bad input | outcome | message |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
