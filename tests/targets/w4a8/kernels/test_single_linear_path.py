"""A compiled single linear runs as one C++ packed GEMV at one token: no extra graph ops,
no unpack + ``torch._int_mm``, no Python kernel.

Guards the M = 1 latency of ``compile()`` on a one-``nn.Linear`` module structurally (not by
timing): a view/contiguous/quantize node added around the kernel, a dispatch rule that sends
one token to the unpack path, or the pure-torch fallback left registered would each fail
here. The timing itself is ``benchmarks/cpu_linear.py --compiled-only``.
"""

from __future__ import annotations

import pytest
import torch

import qqq_compile
from qqq_compile.targets.w4a8.kernels import cpu

pytestmark = pytest.mark.usefixtures("cpp_kernels")


class _OneLinear(torch.nn.Module):
    def __init__(self, k: int, n: int, bias: bool):
        super().__init__()
        self.lin = torch.nn.Linear(k, n, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.mark.parametrize("bias", [False, True])
def test_single_linear_is_one_op_and_takes_the_gemv(bias: bool) -> None:
    torch.manual_seed(0)
    k, n = 256, 512
    model = _OneLinear(k, n, bias).eval()
    cm = qqq_compile.compile(model, [torch.randn(1, 8, k)], config={"preset": "rtn"}, progress=False)

    calls = [nd for nd in cm.graph_module.graph.nodes if nd.op == "call_function"]
    assert [nd.target for nd in calls] == [torch.ops.qqq.w4a8_linear.default], cm.graph_module.graph

    x = torch.randn(1, k)
    cm(x)  # the first call may load the extension through the Python kernel
    assert cpu.cpu_kernel_source("w4a8_linear") == "cpp"
    ops0, paths0 = cpu.cpp_call_counts(), cpu.cpp_path_counts()
    with torch.no_grad():
        y = cm(x)
    assert _delta(ops0, cpu.cpp_call_counts()) == {"w4a8_linear": 1}
    taken = _delta(paths0, cpu.cpp_path_counts())
    assert taken.get("w4a8_gemv") == 1 and "w4a8_int_mm" not in taken, taken
    # Independent reference: the float linear with the fake-quantized weight is close.
    ref = model(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean())
    assert sqnr > 15, sqnr  # W4A8 RTN per-channel of a random Gaussian layer: ~20 dB measured


def test_stalled_join_backs_off_to_the_caller() -> None:
    """After a join that waited past the threshold, the next parallel GEMVs run on the
    calling thread alone ('solo'); with the back-off disabled they keep the team."""
    from qqq_compile.targets.w4a8.formats import PackedW4

    ext = torch.ops.qqq_cpu
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = PackedW4.from_float(torch.randn(1024, 1024), -1)
        x = torch.randn(1, 1024)
        ref = torch.ops.qqq.w4a8_linear(x, p.qweight, p.channel_scale, None, None, -1)

        def run() -> dict[str, int]:
            before = cpu.cpp_path_counts()
            y = torch.ops.qqq.w4a8_linear(x, p.qweight, p.channel_scale, None, None, -1)
            assert torch.equal(y, ref)
            return _delta(before, cpu.cpp_path_counts())

        prev = ext.set_stall_backoff(True)
        try:
            ext.note_join_wait(5_000_000)  # a 5 ms join: a descheduled team thread
            assert run().get("solo") == 1
            ext.set_stall_backoff(False)  # clears the back-off in progress
            ext.note_join_wait(5_000_000)
            taken = run()
            assert taken.get("team") == 1 and "solo" not in taken, taken
        finally:
            ext.set_stall_backoff(prev)
    finally:
        torch.set_num_threads(threads)
