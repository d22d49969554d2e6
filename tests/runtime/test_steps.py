"""The AOTInductor decode step: same tokens as the eager reference, a package reused from disk."""

from __future__ import annotations

import pytest
import torch

import qqq_compile as qc
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.runtime import steps as runtime
from tests.conftest import tiny_calib, tiny_model


@pytest.fixture(scope="module")
def w4a8():
    model = tiny_model("llama")
    return qc.compile(model, calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)


@pytest.fixture(scope="module")
def aot_step(w4a8, tmp_path_factory):
    folder = tmp_path_factory.mktemp("aot")
    return runtime.build_step(
        w4a8.graph_module, max_batch=2, max_len=32, runtime="aot", package_dir=folder, progress=False
    ), folder


def test_aot_step_matches_eager_prefill_and_decode(w4a8, aot_step):
    step, _ = aot_step
    eager = runtime.build_step(w4a8.graph_module, max_batch=2, max_len=32, runtime="eager")
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(3))
    for s in (step, eager):
        s.out = [s(ids[:, :10], torch.ones(2, 10, dtype=torch.long), torch.arange(10))]
        for i in range(10, 14):
            s.out.append(s(ids[:, i : i + 1], torch.ones(2, i + 1, dtype=torch.long), torch.tensor([i])))
    got, want = torch.cat(step.out, 1), torch.cat(eager.out, 1)
    assert got.shape == (2, 5, 256)
    # Inductor fuses the float epilogues (RMSNorm, RoPE, SiLU) in another order: float
    # rounding only (measured ~130 dB on this model).
    assert sqnr_db(want, got) > 100


def test_aot_step_runs_the_cpp_kernels_without_python_per_op(aot_step):
    import sys

    from qqq_compile.targets.w4a8.kernels import cpp_call_counts

    step, _ = aot_step
    assert step.runtime == "aot" and not isinstance(step.fn, torch.fx.GraphModule)
    before = cpp_call_counts()["w4a8_linear"]
    entered: list[str] = []

    def spy(frame, event, arg):
        if event == "call" and "qqq_compile" in frame.f_code.co_filename:
            entered.append(frame.f_code.co_name)

    ids = torch.randint(0, 256, (1, 1))
    sys.setprofile(spy)
    try:
        step.fn(ids, torch.ones(1, 5, dtype=torch.long), torch.tensor([4]), torch.tensor(0))
    finally:
        sys.setprofile(None)
    # 2 layers x 4 calls (q/k/v fused, o, gate/up fused, down: fuse_linears), each one C++
    # kernel call, and no Python of ours in between.
    assert cpp_call_counts()["w4a8_linear"] - before == 8
    assert entered == []


def test_aot_package_is_reused_and_keyed_by_torch_and_cpu(w4a8, aot_step, monkeypatch):
    step, folder = aot_step
    again = runtime.build_step(w4a8.graph_module, max_batch=2, max_len=32, runtime="aot", package_dir=folder)
    assert again.package_path == step.package_path and any("reused" in n for n in again.notes)
    assert again.build_seconds < 30  # loading a package, not compiling one
    key = runtime.package_key(step.graph_module, 2, 32)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert runtime.package_key(step.graph_module, 2, 32) != key
    monkeypatch.undo()
    monkeypatch.setattr(runtime, "_cpu_id", lambda: "another cpu")
    assert runtime.package_key(step.graph_module, 2, 32) != key


def test_generate_with_aot_equals_eager_tokens(w4a8, aot_step):
    _, folder = aot_step
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    w4a8.prepare_generation(max_batch=2, max_len=32, runtime="aot", package_dir=str(folder), progress=False)
    a = w4a8.generate(ids, max_new_tokens=8, eos_token_id=[])
    w4a8.prepare_generation(max_batch=2, max_len=32, runtime="eager")
    b = w4a8.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(a, b)


def test_unknown_runtime_is_refused(w4a8):
    with pytest.raises(ValueError, match="runtime='jit' is not known"):
        runtime.build_step(w4a8.graph_module, max_batch=1, max_len=8, runtime="jit")


@pytest.mark.parametrize("which", ["eager", "aot"])
def test_cache_row_prefills_one_row_while_the_other_keeps_its_cache(w4a8, aot_step, which):
    """A request joining a running batch (the server's continuous batching): row 1 is
    prefilled alone (``cache_row=1``) at positions ending where row 0 is, then both rows
    decode in one call. Each row's logits equal those of the row run alone at the same
    positions (row 1 left-padded). Were ``cache_row`` ignored, the join would overwrite row
    0's cache and row 1 would decode from an empty row."""
    step = aot_step[0] if which == "aot" else runtime.build_step(w4a8.graph_module, max_batch=2, max_len=32)
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, 256, (1, 12), generator=g), torch.randint(0, 256, (1, 5), generator=g)
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731
    pad = torch.zeros(1, 11, dtype=torch.long)
    pad[:, 6:] = 1  # row 1's prompt sits at positions 6..10

    def row0_alone():
        step(a[:, :10], ones(10), torch.arange(10))
        step(a[:, 10:11], ones(11), torch.tensor([10]))
        return step(a[:, 11:12], ones(12), torch.tensor([11]))

    want0 = row0_alone()
    ids1 = torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)
    want1_prefill = step(ids1, pad, torch.arange(11))  # row 1 alone, in cache row 0
    nxt = want1_prefill[:, -1].argmax(-1, keepdim=True)
    want1 = step(nxt, torch.cat([pad, ones(1)], 1), torch.tensor([11]))

    step(a[:, :10], ones(10), torch.arange(10))  # the running request, row 0
    step(a[:, 10:11], ones(11), torch.tensor([10]))
    got1_prefill = step(b, pad, torch.arange(6, 11), cache_row=1)  # joins in row 1
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :6] = 0
    both = step(torch.cat([a[:, 11:12], nxt]), mask, torch.tensor([11]))
    for got, want in ((got1_prefill, want1_prefill), (both[:1], want0), (both[1:], want1)):
        assert sqnr_db(want, got) > 100  # batch-of-2 vs one row: float rounding at most
    with pytest.raises(ValueError, match="outside the 2 rows"):
        step(b, pad, torch.arange(6, 11), cache_row=2)
