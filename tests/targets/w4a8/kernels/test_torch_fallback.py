"""The pure-torch CPU kernels: what runs when the C++ extension cannot (no AVX512-VNNI or
VBMI, no compiler, ``QQQ_CPU_KERNEL=torch``).

The dispatcher-level check runs in a fresh process with ``QQQ_CPU_KERNEL=torch``: in this
one the C++ kernels may already be registered, and a registration cannot be undone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qqq_compile.targets.w4a8.formats import PackedW4, quantize_int8_per_row
from qqq_compile.targets.w4a8.kernels import cpu
from tests.targets.w4a8 import numpy_reference as rule

ROOT = Path(__file__).resolve().parents[4]  # the repository
FORMATS = [(-1, "int8"), (128, "int8"), (128, "float16"), (48, "int8"), (20, "float16")]


def _exact(q: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    # float64 GEMM of int8 values is exact (|acc| << 2^53), and independent of _int_mm.
    return (q.double() @ w8.double().t()).to(torch.int32)


def _epilogue(acc, s, scale, bias, dtype):
    y = acc.float() * s.reshape(-1, 1) * scale
    return (y + bias.float() if bias is not None else y).to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_torch_w4a8_matches_exact_reference(fmt: tuple[int, str], m: int) -> None:
    g = torch.Generator().manual_seed(m)
    p = PackedW4.from_float(torch.randn(30, 300, generator=g), *fmt)
    x = torch.randn(m, 300, generator=g).to(torch.bfloat16)
    bias = torch.randn(30, generator=g)
    before = cpu.cpp_call_counts()
    y = cpu.w4a8_linear_torch(x, p.qweight, p.channel_scale, p.group_scale, bias, p.group_size)
    q, s = rule.act_quant(x)
    assert torch.equal(y, _epilogue(_exact(q, p.int8_weight()), s, p.channel_scale, bias, torch.bfloat16))
    yq = cpu.w4a8_linear_q_torch(q, s, p.qweight, p.channel_scale, p.group_scale, bias, p.group_size, torch.bfloat16)
    assert torch.equal(yq, y)
    assert cpu.cpp_call_counts() == before  # no C++ kernel involved


@pytest.mark.parametrize("k", [1, 64, 100])
def test_torch_w8a8_matches_exact_reference(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    w8, scale = quantize_int8_per_row(torch.randn(17, k, generator=g))
    x = torch.randn(2, 5, k, generator=g)
    y = cpu.w8a8_linear_torch(x, w8, scale, None)
    q, s = rule.act_quant(x.reshape(-1, k))
    assert torch.equal(y, _epilogue(_exact(q, w8), s, scale, None, torch.float32).reshape(2, 5, 17))


def test_torch_activation_paths() -> None:
    """The torch fallbacks against the rules written independently in NumPy."""
    x = torch.randn(4, 576) * 3
    w = torch.rand(576) + 0.5
    q, s = cpu.quantize_act_torch(x)
    qr, sr = rule.act_quant(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    q, s = cpu.rmsnorm_quant_torch(x, w, 1e-6)
    qr, sr = rule.act_quant(rule.rmsnorm(x, w, 1e-6))
    # float32 sums in another order than float64: ulp-level scales, rare one-step flips
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    diff = (q.int() - qr.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 2


def test_load_failure_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: set())
    with pytest.warns(UserWarning, match="pure-torch"):
        assert cpu._load_extension() is None
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: set(cpu._REQUIRED_FLAGS))
    # Another name, so the real build folder is never touched.
    monkeypatch.setattr(cpu, "_EXT_NAME", "qqq_test_missing_sources")
    monkeypatch.setattr(cpu, "_CSRC", cpu._CSRC.with_name("does_not_exist"))
    with pytest.warns(UserWarning, match="could not build"):
        assert cpu._load_extension() is None
    monkeypatch.setenv("QQQ_CPU_KERNEL", "torch")
    assert cpu._load_extension() is None


def test_a_build_says_so_and_a_cached_build_does_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A first build (a minute, inside whatever pass needs a kernel first) is announced on
    stderr with its folder and then its time; loading a cached build is silent; a source or
    header newer than the cached library announces the rebuild."""
    import torch.utils.cpp_extension as cpp_ext

    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "a.cpp").write_text("// a\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("QQQ_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpu, "_EXT_NAME", "qqq_test_build_note")
    monkeypatch.setattr(cpu, "_CSRC", csrc)
    monkeypatch.setattr(cpu, "_SOURCES", ("a.cpp",))
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: set(cpu._REQUIRED_FLAGS))
    monkeypatch.setattr(cpu, "_register_fakes", lambda: None)
    builds = []

    def fake_load(name: str, sources: list[str], **kwargs: object) -> None:
        # torch's load: (re)builds <build dir>/<name>.so when needed, then loads it
        lib = Path(cpp_ext._get_build_directory(name, False)) / f"{name}.so"
        if cpu._needs_build() is not None:
            lib.parent.mkdir(parents=True, exist_ok=True)
            lib.write_bytes(b"")
            builds.append(name)

    monkeypatch.setattr(cpp_ext, "load", fake_load)
    folder = tmp_path / "ext" / "qqq_test_build_note"
    assert cpu._needs_build() == folder  # nothing built yet

    cpu._load_extension()
    err = capsys.readouterr().err
    assert f"building the C++ CPU kernels once for this machine (about a minute on 2 cores; cached in {folder})" in err
    assert "C++ CPU kernels built in" in err and builds == ["qqq_test_build_note"]

    assert cpu._needs_build() is None
    cpu._load_extension()  # the cached build: no note
    assert "C++ CPU kernels" not in capsys.readouterr().err and len(builds) == 1

    later = (folder / "qqq_test_build_note.so").stat().st_mtime + 10
    (csrc / "b.h").write_text("// a header the sources include\n")
    os.utime(csrc / "b.h", (later, later))
    assert cpu._needs_build() == folder
    cpu._load_extension()
    assert "building the C++ CPU kernels" in capsys.readouterr().err and len(builds) == 2


_SCRIPT = r"""
import sys, torch
from qqq_compile.targets.w4a8.kernels import cpu
qqq = torch.ops.qqq
inp = torch.load(sys.argv[1])
x, w4 = inp["x"], inp["w4"]
out = {}
out["q"], out["s"] = qqq.quantize_act(x)
out["rq"], out["rs"] = qqq.rmsnorm_quant(x, inp["norm_w"], 1e-6)
out["y4"] = qqq.w4a8_linear(x, *w4)
out["y4q"] = qqq.w4a8_linear_q(out["q"], out["s"], *w4, torch.bfloat16)
out["y8"] = qqq.w8a8_linear(x, inp["w8"], inp["scale"], inp["bias"])
try:
    qqq.w8a8_linear(x, inp["w8"][:, :5], inp["scale"], None)
except ValueError as e:
    out["error"] = str(e)
out["sources"] = {op: cpu.cpu_kernel_source(op) for op in cpu.OP_NAMES}
out["cpp_active"] = cpu.ensure_cpp_kernels()
out["counts"] = cpu.cpp_call_counts()
torch.save(out, sys.argv[2])
"""


def test_ops_in_a_torch_only_process(tmp_path: Path) -> None:
    """``QQQ_CPU_KERNEL=torch``: every op runs the torch reference (no C++ kernel registered,
    none called), with the same numbers as the exact references and, where the C++ kernels
    run here, as them."""
    g = torch.Generator().manual_seed(0)
    p = PackedW4.from_float(torch.randn(40, 256, generator=g), 64, "float16")
    w8, scale = quantize_int8_per_row(torch.randn(24, 256, generator=g))
    inp = {
        "x": torch.randn(2, 3, 256, generator=g),
        "norm_w": torch.rand(256, generator=g) + 0.5,
        "w4": (p.qweight, p.channel_scale, p.group_scale, None, 64),
        "w8": w8,
        "scale": scale,
        "bias": torch.randn(24, generator=g),
    }
    torch.save(inp, tmp_path / "in.pt")
    env = {**os.environ, "QQQ_CPU_KERNEL": "torch", "PYTHONPATH": str(ROOT)}
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["sources"] == dict.fromkeys(cpu.OP_NAMES, "torch")
    assert out["cpp_active"] is False and set(out["counts"].values()) == {0}
    assert out["error"].startswith("w8 must be a 2-D int8 tensor of shape (N, 256)")

    x = inp["x"]
    q, s = rule.act_quant(x)
    assert torch.equal(out["q"], q) and torch.equal(out["s"], s)
    rq, rs = rule.act_quant(rule.rmsnorm(x, inp["norm_w"], 1e-6))
    torch.testing.assert_close(out["rs"], rs, rtol=1e-6, atol=0)
    assert int((out["rq"].int() - rq.int()).abs().max()) <= 1
    acc4 = _exact(q.reshape(-1, 256), p.int8_weight())
    assert torch.equal(out["y4"], _epilogue(acc4, s, p.channel_scale, None, torch.float32).reshape(2, 3, 40))
    assert torch.equal(out["y4q"], _epilogue(acc4, s, p.channel_scale, None, torch.bfloat16).reshape(2, 3, 40))
    y8 = _epilogue(_exact(q.reshape(-1, 256), w8), s, scale, inp["bias"], torch.float32).reshape(2, 3, 24)
    assert torch.equal(out["y8"], y8)

    if cpu.cpu_supports_kernels() and cpu.ensure_cpp_kernels():
        qqq = torch.ops.qqq
        assert torch.equal(qqq.w4a8_linear(x, *inp["w4"]), out["y4"])
        assert torch.equal(qqq.w8a8_linear(x, w8, scale, inp["bias"]), out["y8"])
        cq, _ = qqq.rmsnorm_quant(x, inp["norm_w"], 1e-6)
        assert int((cq.int() - out["rq"].int()).abs().max()) <= 1  # fused sum order: ties may flip
