"""AOTInductor: an exported graph of ``qqq::*`` ops compiles to a C++ package whose generated
wrapper reaches the C++ CPU kernels through the dispatcher, with no Python per op.

FINDINGS (torch 2.13 CPU, this 2-core VM): ``aoti_compile_and_package`` of this tiny graph
(4 custom ops + relu, dynamic batch/seq) takes ~14 s alone, ~36 s with other test runs on
the machine (most of it the C++ build of the wrapper); ``aoti_load_package`` ~5 ms. Custom
ops without a C shim are emitted as
``aoti_torch_proxy_executor_call_function(proxy_executor, i, ...)`` with their schema
serialized in ``<wrapper>.json``; the proxy executor calls ``c10::Dispatcher``, so the
kernel must be registered (``ensure_cpp_kernels()``) before the package runs, and a kernel
registered only in Python would be entered from C++ through the Python kernel holder.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch.export import Dim

import qqq_compile
from qqq_compile.targets.w4a8.formats import PackedW4, quantize_int8_per_row
from qqq_compile.targets.w4a8.kernels import cpu

qqq = torch.ops.qqq
PACKAGE_ROOT = Path(qqq_compile.__file__).resolve().parent  # qqq_compile/


class _Tiny(torch.nn.Module):
    """rmsnorm_quant -> w4a8_linear_q (int8 groups) -> relu -> w4a8_linear -> w8a8_linear (+bias)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        up = PackedW4.from_float(torch.randn(96, 64, generator=g), 32, "int8")
        down = PackedW4.from_float(torch.randn(64, 96, generator=g))
        self.norm_w = torch.nn.Parameter(torch.rand(64, generator=g) + 0.5, requires_grad=False)
        for name, p in (("up", up), ("down", down)):
            for key, t in p.tensors().items():
                self.register_buffer(f"{name}_{key}", t)
        w8, scale = quantize_int8_per_row(torch.randn(50, 64, generator=g))
        self.register_buffer("head_w8", w8)
        self.register_buffer("head_scale", scale)
        self.register_buffer("head_bias", torch.randn(50, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = qqq.rmsnorm_quant(x, self.norm_w, 1e-6)
        h = qqq.w4a8_linear_q(q, s, self.up_qweight, self.up_channel_scale, self.up_group_scale, None, 32, x.dtype)
        # relu is exact, so inductor's generated kernel cannot change the next op's input.
        h = torch.relu(h)
        y = qqq.w4a8_linear(h, self.down_qweight, self.down_channel_scale, None, None, -1)
        return qqq.w8a8_linear(y, self.head_w8, self.head_scale, self.head_bias)


def _python_frames_in_package(fn):
    """Run ``fn`` and return the qqq_compile Python functions entered meanwhile."""
    seen: set[str] = set()

    def prof(frame, event, arg):
        if event == "call" and Path(frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_ROOT):
            seen.add(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(prof)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, seen


def test_aoti_package_runs_cpp_kernels(tmp_path: Path, cpp_kernels: None) -> None:
    model = _Tiny().eval()
    ep = torch.export.export(model, (torch.randn(2, 5, 64),), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", min=2)},))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "tiny.pt2"))

    # The generated wrapper calls each custom op through the proxy executor (-> dispatcher),
    # never through a Python callback.
    with zipfile.ZipFile(path) as z:
        wrapper = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
        calls = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.json"))
    assert wrapper.count("aoti_torch_proxy_executor_call_function(") == 4
    for op in ("rmsnorm_quant", "w4a8_linear_q", "w4a8_linear", "w8a8_linear"):
        assert f'"target": "qqq::{op}"' in calls
    assert "PyObject" not in wrapper and "custom_op_wrapper" not in wrapper

    runner = torch._inductor.aoti_load_package(path)
    for shape in ((2, 5, 64), (3, 11, 64), (1, 2, 64)):
        x = torch.randn(shape)
        before = cpu.cpp_call_counts()
        y, frames = _python_frames_in_package(lambda x=x: runner(x))
        after = cpu.cpp_call_counts()
        assert not frames, f"Python of qqq_compile ran inside the AOTI package: {sorted(frames)}"
        assert {op: after[op] - before[op] for op in after} == {
            "quantize_act": 0,
            "rmsnorm_quant": 1,
            "w4a8_linear": 1,
            "w4a8_linear_q": 1,
            "w8a8_linear": 1,
        }
        assert torch.equal(y, model(x)), shape  # bit-identical to eager


@pytest.mark.parametrize("op", cpu.OP_NAMES)
def test_dispatch_dump_names_the_cpp_source(op: str, cpp_kernels: None) -> None:
    dump = torch._C._dispatch_dump(f"qqq::{op}")
    assert "ops_cpu.cpp" in dump.split("CPU: registered at ", 1)[1].splitlines()[0]
