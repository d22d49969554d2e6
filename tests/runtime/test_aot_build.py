"""The decode step's package is compiled by a child process from the step graph without its
weights. (That the compile really runs there, and that its package agrees with the eager
step, is tested through ``tests/runtime/test_steps.py``'s ``shipped`` artifact, saved while a
compile in the test's own process would fail.)"""

from __future__ import annotations

import pytest
import torch

import qqq_compile as qc
from qqq_compile.runtime import aot_build, steps
from tests.conftest import tiny_calib, tiny_model


@pytest.fixture(scope="module")
def step_graph():
    model = qc.compile(tiny_model("llama"), calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)
    cached, spec, _ = steps.step_graph(model.graph_module, 2, 32)
    return cached, spec


def test_the_skeleton_rebuilds_the_graph_and_tensor_layouts_without_the_weights(step_graph):
    cached, spec = step_graph
    blob = aot_build.skeleton(cached, spec)
    gm, spec2 = aot_build.rebuild(blob)
    assert spec2 == spec
    assert gm.code == cached.code
    mine, theirs = aot_build.graph_tensors(gm), aot_build.graph_tensors(cached)
    used = {n.target for n in cached.graph.nodes if n.op == "get_attr"}
    assert set(mine) == used  # the tensors the graph reads; export lifts no others
    params = {name for name, _ in cached.named_parameters()}
    for name, t in mine.items():
        ref = theirs[name]
        assert (t.shape, t.stride(), t.dtype, t.device) == (ref.shape, ref.stride(), ref.dtype, ref.device), name
        assert isinstance(t, torch.nn.Parameter) == (name in params), name
        if aot_build.inlined(ref):
            assert torch.equal(t, ref), name  # written into the code: the values travel
    big = [t for t in theirs.values() if not aot_build.inlined(t) and t.numel() * t.element_size() >= 4096]
    weights = sum(t.numel() * t.element_size() for t in big)
    assert big and len(blob) < weights / 4, (len(blob), weights)
    qweight = next(t for name, t in theirs.items() if name.endswith("qweight"))
    assert qweight.numpy().tobytes()[:256] not in blob


def test_a_failing_child_raises_with_its_own_error_and_leaves_no_package(step_graph, monkeypatch, tmp_path):
    cached, spec = step_graph
    monkeypatch.setattr(aot_build, "skeleton", lambda *a: b"not a pickle")
    path = tmp_path / "step.pt2"
    with pytest.raises(aot_build.BuildError, match=r"(?s)child process \(exit 1\).*runtime='eager'") as err:
        aot_build.compile_in_child(cached, spec, path)
    assert "UnpicklingError" in str(err.value).splitlines()[0]  # the cause first: auto's warning shows it
    assert list(tmp_path.iterdir()) == []
