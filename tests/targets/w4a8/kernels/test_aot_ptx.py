"""Ahead-of-time compilation of every shipped kernel configuration for sm_80 and sm_90.

No GPU is needed: ``triton.compile`` with a ``GPUTarget`` produces PTX and a cubin here.
The GEMMs must use int8 tensor-core MMAs (``mma``/``wgmma`` with ``.s8``) and no kernel
may touch local memory: neither in the PTX nor in the SASS (register spills, as reported
by ``cuobjdump -res-usage`` on the cubin).

Compilation runs in a subprocess without ``TRITON_INTERPRET`` (the test process runs
in interpreter mode, where Triton's own ``tl.sum``/``tl.max`` cannot be compiled).
``python tests/targets/w4a8/kernels/test_aot_ptx.py`` prints the table of shared memory, registers and
spills per configuration.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]  # the repository
CAPABILITIES = (80, 90)
# Shared memory per block available with the opt-in Triton applies: A100 and H100.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MMA_S8 = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*\.s8\b")
PTX_LOCAL = re.compile(r"\.local\b|\bld\.local|\bst\.local")


def compile_all(capabilities: tuple[int, ...] = CAPABILITIES) -> list[dict]:
    """Compile every shipped configuration; returns one summary dict per (config, target)."""
    from qqq_compile.targets.w4a8.kernels import act_quant, w4a8_gemm, w8a8_gemm

    results = []
    for cap in capabilities:
        for spec in w4a8_gemm.aot_specs() + w8a8_gemm.aot_specs() + act_quant.aot_specs():
            r = act_quant.aot_compile(spec, cap)
            ptx = r.pop("ptx")
            r["mma_s8"] = sorted(set(m.group(0) for m in MMA_S8.finditer(ptx)))
            r["ptx_local"] = bool(PTX_LOCAL.search(ptx))
            results.append(r)
    return results


def format_table(results: list[dict]) -> str:
    lines = [f"{'sm':>3} {'shared B':>9} {'regs':>4} {'spill B':>7}  {'int8 mma':<22} config"]
    for r in results:
        mma = "-"
        if r["mma_s8"]:
            shape = re.search(r"m\d+n\d+k\d+", r["mma_s8"][0])
            mma = f"{r['mma_s8'][0].split('.')[0]} {shape.group(0) if shape else ''} s8"
        spill = r["stack"] + r["local"]
        lines.append(f"{r['capability']:>3} {r['shared']:>9} {r['registers']:>4} {spill:>7}  {mma:<22} {r['name']}")
    return "\n".join(lines)


def expected_names() -> set[str]:
    from qqq_compile.targets.w4a8.kernels import act_quant, w4a8_gemm, w8a8_gemm

    return {s["name"] for s in w4a8_gemm.aot_specs() + w8a8_gemm.aot_specs() + act_quant.aot_specs()}


@pytest.fixture(scope="module")
def aot_results() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"AOT worker failed:\n{proc.stderr[-6000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\n" + format_table(results))  # shown with -s / -rA: shared memory per config
    return results


def test_every_shipped_config_compiles_for_each_target(aot_results):
    names = expected_names()
    for cap in CAPABILITIES:
        assert {r["name"] for r in aot_results if r["capability"] == cap} == names


def test_gemms_use_int8_tensor_cores(aot_results):
    gemms = [r for r in aot_results if r["name"].startswith(("w4a8_gemm", "w8a8_gemm"))]
    assert {r["name"][:9] for r in gemms} == {"w4a8_gemm", "w8a8_gemm"}
    for r in gemms:
        assert r["mma_s8"], f"no .s8 mma in the PTX of {r['name']} for sm_{r['capability']}"
    # Hopper runs the warpgroup MMA once a tile is at least 64 rows.
    assert any(m.startswith("wgmma") for r in gemms if r["capability"] == 90 for m in r["mma_s8"])


def test_no_local_memory_or_spills(aot_results):
    for r in aot_results:
        where = f"{r['name']} on sm_{r['capability']}"
        assert not r["ptx_local"], f"PTX of {where} uses local memory"
        assert r["stack"] == 0 and r["local"] == 0, f"{where} spills ({r['stack']} B stack, {r['local']} B local)"


def test_shared_memory_recorded_and_within_limits(aot_results):
    for r in aot_results:
        assert 0 < r["shared"] <= SHARED_LIMIT[r["capability"]], r


if __name__ == "__main__":
    res = compile_all()
    print(json.dumps(res) if "--json" in sys.argv else format_table(res))
