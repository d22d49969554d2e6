"""The online Hadamard as one C++ kernel (``qqq_cpu::kron_transform``) and the step rewrite
that puts it in place of the rotate pass's mm/bmm chain (``fuse_hadamard``)."""

from __future__ import annotations

import math

import pytest
import torch

import qqq_compile as qc
import qqq_compile.targets.w4a8.target as w4a8_target
from qqq_compile.annotations import node_annotation
from qqq_compile.compiler.hadamard import hadamard, hadamard_factors, kron_matmul, sylvester_hadamard
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.runtime import steps
from qqq_compile.targets.w4a8.fuse_hadamard import _split_sylvester
from qqq_compile.targets.w4a8.kernels.cpu import cpp_path_counts, cpu_supports_kernels, ensure_cpp_kernels
from tests.conftest import tiny_calib, tiny_model

# Skipped only where the CPU cannot run the C++ kernels; where it can, they must be active.
pytestmark = pytest.mark.skipif(not cpu_supports_kernels(), reason="this CPU lacks AVX512-VNNI/VBMI")


@pytest.fixture(autouse=True)
def _kernels_active():
    assert ensure_cpp_kernels(), "the C++ kernels did not load (see the warning), or QQQ_CPU_KERNEL=torch is set"


aten = torch.ops.aten


def _kron(x: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([m.reshape(-1) for m in mats]).float()
    return torch.ops.qqq_cpu.kron_transform(x, flat, [m.shape[0] for m in mats])


# SmolLM2's MLP and residual, then the popular models' widths (rotate's test_rotate_widths).
@pytest.mark.parametrize("width", [1536, 576, 896, 4864, 8960, 11008, 14336, 18944])
@pytest.mark.parametrize("rows", [1, 37])
def test_kernel_equals_the_float64_transform_as_closely_as_the_fp32_chain(width, rows):
    mats = [hadamard(n) for n in hadamard_factors(width)]
    split = [s for m in mats for s in _split_sylvester(m)]
    x = torch.randn(rows, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    want = kron_matmul(x, mats)
    before = cpp_path_counts()["kron_transform"]
    got = _kron(x.float(), split).double()
    assert cpp_path_counts()["kron_transform"] == before + 1
    chain = kron_matmul(x.float(), [m.float() for m in mats]).double()  # what the graph computes
    # Measured 130-139 dB for both over these widths (fp32 sums of up to 148 terms).
    assert sqnr_db(want, got) > 125
    assert sqnr_db(want, got) > sqnr_db(want, chain) - 3


def test_a_sylvester_factor_splits_into_the_same_matrix_and_others_stay_whole():
    for p in (32, 128, 512):
        parts = _split_sylvester(sylvester_hadamard(p) / math.sqrt(p))
        assert max(m.shape[0] for m in parts) <= 16 and math.prod(m.shape[0] for m in parts) == p
        prod = parts[0]
        for m in parts[1:]:
            prod = torch.kron(prod, m)
        torch.testing.assert_close(prod, sylvester_hadamard(p) / math.sqrt(p), rtol=0, atol=1e-15)
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    assert len(_split_sylvester(q)) == 1 and len(_split_sylvester(hadamard(12))) == 1


def test_bad_input_names_the_problem():
    with pytest.raises(RuntimeError, match="product of the factor sizes"):
        _kron(torch.randn(2, 100), [torch.eye(12), torch.eye(8)])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.qqq_cpu.kron_transform(torch.randn(2, 96).double(), torch.eye(12).reshape(-1).float(), [12, 8])


# ----------------------------------------------------------------------------- the step rewrite


@pytest.fixture(scope="module")
def rotated():
    """A W4A8 model with an online Hadamard before each down_proj: MLP 384 = 12·32, so the
    32 is split (12·2·16)."""
    model = tiny_model("llama", intermediate_size=384)
    return qc.compile(model, calib=tiny_calib(), config=qc.CompileConfig(preset="qqq_rot"), progress=False)


def _chains(gm) -> int:
    """The rotate pass's chains (their last node, a view, carries the annotation; the kernel
    call that replaces one keeps it)."""
    return sum(1 for n in gm.graph.nodes if n.target is aten.view.default and node_annotation(n).online_hadamard)


def _calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is torch.ops.qqq_cpu.kron_transform.default)


def _run(step, ids):
    n = ids.shape[1]
    prefill = step(ids, torch.ones(1, n, dtype=torch.long), torch.arange(n))
    decode = step(ids[:, -1:], torch.ones(1, n + 1, dtype=torch.long), torch.tensor([n]))
    return prefill, decode


def test_the_step_runs_the_kernel_in_place_of_each_chain(rotated, monkeypatch):
    layers = rotated.model_config["num_hidden_layers"]
    assert _chains(rotated.graph_module) == layers  # the compiled model keeps the portable chain
    step = steps.build_step(rotated.graph_module, max_batch=1, max_len=64, runtime="eager", progress=False)
    gm = step.graph_module
    assert _calls(gm) == layers and _chains(gm) == 0
    assert not [n for n in gm.graph.nodes if n.target in (aten.bmm.default, aten.mm.default)]
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and "hadamard" in str(n.target)]
    assert any("2 online Hadamard transform(s) run as one C++ kernel call each" in m for m in step.notes)

    monkeypatch.setattr(w4a8_target, "fuse_online_hadamard", lambda gm: 0)
    chain = steps.build_step(rotated.graph_module, max_batch=1, max_len=64, runtime="eager", progress=False)
    assert _calls(chain.graph_module) == 0 and _chains(chain.graph_module) == layers
    ids = tiny_calib(1, 20, seed=3)[0]
    before = cpp_path_counts()["kron_transform"]
    with torch.no_grad():
        got = _run(step, ids)
        want = _run(chain, ids)
    assert cpp_path_counts()["kron_transform"] == before + 2 * layers
    for w, g in zip(want, got, strict=True):
        # Float rounding of the transform, amplified where it flips an int8 activation.
        assert sqnr_db(w, g) > 40


def test_the_aot_step_calls_the_kernel(rotated, tmp_path):
    eager = steps.build_step(rotated.graph_module, max_batch=1, max_len=64, runtime="eager", progress=False)
    aot = steps.build_step(
        rotated.graph_module, max_batch=1, max_len=64, runtime="aot", package_dir=tmp_path, progress=False
    )
    ids = tiny_calib(1, 20, seed=3)[0]
    before = cpp_path_counts()["kron_transform"]
    with torch.no_grad():
        got = _run(aot, ids)
    assert cpp_path_counts()["kron_transform"] == before + 2 * rotated.model_config["num_hidden_layers"]
    with torch.no_grad():
        want = _run(eager, ids)
    for w, g in zip(want, got, strict=True):
        assert sqnr_db(w, g) > 40


def test_a_two_row_step_transforms_each_row_like_a_one_row_step(rotated):
    """The server's multi-row step: leading dims pass through the kernel row by row."""
    one = steps.build_step(rotated.graph_module, max_batch=1, max_len=64, runtime="eager", progress=False)
    two = steps.build_step(rotated.graph_module, max_batch=2, max_len=64, runtime="eager", progress=False)
    assert _calls(two.graph_module) == rotated.model_config["num_hidden_layers"]
    ids = torch.cat([tiny_calib(1, 20, seed=3)[0], tiny_calib(1, 20, seed=4)[0]])
    mask = torch.ones(2, 20, dtype=torch.long)
    with torch.no_grad():
        both = two(ids, mask, torch.arange(20))
        for r in range(2):
            alone = one(ids[r : r + 1], mask[r : r + 1], torch.arange(20))
            assert sqnr_db(alone, both[r : r + 1]) > 100  # float rounding at most (as test_steps' batch test)


def test_two_different_factor_sets_of_one_shape_get_two_buffers():
    from qqq_compile.targets.w4a8.fuse_hadamard import _factor_buffer

    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    a, b = torch.ones(5), torch.zeros(5)
    assert _factor_buffer(gm, a, [2, 1]) == _factor_buffer(gm, a.clone(), [2, 1]) == "qqq_kron_2x1"
    assert _factor_buffer(gm, b, [2, 1]) == "qqq_kron_2x1_1"
    assert torch.equal(gm.qqq_kron_2x1, a) and torch.equal(gm.qqq_kron_2x1_1, b)
