"""Kernel tests run the Triton kernels on CPU in the Triton interpreter.

The interpreter is chosen once per process, when ``triton`` is first imported (Triton's
own ``tl.sum``/``tl.max`` are decorated then), so ``TRITON_INTERPRET=1`` must be set
before anything imports triton, torch._inductor or qqq_compile. tests/conftest.py sets
it too; this line keeps ``pytest tests/kernels`` working should that one change.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from qqq_compile.targets.w4a8.formats import PackedW4  # noqa: E402
from qqq_compile.targets.w4a8.kernels import act_quant, cpu  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Fail loudly (never skip) when triton was imported before the variable was set.
    if not act_quant.runs_interpreted(act_quant._quantize_act_kernel):
        raise pytest.UsageError(
            "tests/kernels need TRITON_INTERPRET=1 set before triton is first imported; "
            f"it is {os.environ.get('TRITON_INTERPRET')!r} or was set too late"
        )


def _make_weight(n: int, k: int, mode: str, seed: int = 0, group_size: int = 128) -> PackedW4:
    """A random packed weight of the given format (RTN of a Gaussian matrix)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if mode == "per_channel":
        return PackedW4.from_float(w, -1)
    return PackedW4.from_float(w, group_size, "int8" if mode == "group_int8" else "float16")


def _make_act(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Activations with a few outlier channels, like a transformer's residual stream."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., :: max(1, shape[-1] // 7)] *= 20.0
    return x.to(dtype)


@pytest.fixture(scope="session")
def cpp_kernels() -> None:
    """The C++ CPU kernels, registered with the dispatcher; tests that need them must not pass
    on the torch fallback by accident: on a CPU that can run them, a failed build FAILS here."""
    if not cpu.cpu_supports_kernels():
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI: the C++ kernels cannot run here")
    if not cpu.ensure_cpp_kernels():
        pytest.fail(
            "this CPU supports the C++ kernels but they are not active: the extension did not build or load "
            "(see the warning above), or QQQ_CPU_KERNEL=torch is set (unset it; the fallback has its own tests)"
        )
    for op in cpu.OP_NAMES:
        assert cpu.cpu_kernel_source(op) == "cpp", torch._C._dispatch_dump(f"qqq::{op}")


# Session-scoped fixtures handing out the factories (hypothesis rejects function-scoped
# fixtures in its tests, and test modules should not import from conftest).
@pytest.fixture(scope="session")
def make_weight():
    return _make_weight


@pytest.fixture(scope="session")
def make_act():
    return _make_act
