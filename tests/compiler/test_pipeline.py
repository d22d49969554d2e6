"""Pipeline: ordering, lint, failure naming, instruments, numeric check, registry."""

import pytest
import torch

from qqq_compile import (
    PASSES,
    CompileContext,
    DumpGraphs,
    FunctionPass,
    PassResult,
    Pipeline,
    PipelineError,
    PrintAfterPass,
    QQQPass,
    TimePasses,
    register_pass,
)
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.pipeline import NumericCheck
from qqq_compile.graph import get_weight, linear_sites, set_weight
from tests.conftest import tiny_model


@pytest.fixture
def gm():
    return capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module


def noop(gm, ctx):
    return PassResult(gm, False)


def scale_weights(factor):
    def fn(gm, ctx):
        for s in linear_sites(gm):
            set_weight(gm, s, get_weight(gm, s) * factor)
        return PassResult(gm, True)

    return FunctionPass(fn, f"scale_{factor}")


def test_failing_pass_is_named_with_the_passes_before(gm):
    def boom(gm, ctx):
        raise RuntimeError("kaboom")

    pipe = Pipeline([FunctionPass(noop, "a"), FunctionPass(noop, "b"), FunctionPass(boom, "boom")])
    with pytest.raises(PipelineError) as e:
        pipe.run(gm, CompileContext())
    assert e.value.pass_name == "boom" and e.value.before == ["a", "b"]
    assert "kaboom" in str(e.value) and "#2 'boom'" in str(e.value)


def test_graph_broken_by_a_pass_fails_lint(gm):
    def break_graph(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first = next(n for n in gm.graph.nodes if n.op == "call_function")
        out.prepend(first)  # a user before its inputs
        first.args = (out,) + tuple(first.args[1:])
        return PassResult(gm, True)

    with pytest.raises(PipelineError, match="break_graph"):
        Pipeline([FunctionPass(break_graph)]).run(gm, CompileContext())


def test_instruments_dump_print_time(gm, tmp_path):
    printed = []
    timer = TimePasses()
    pipe = Pipeline(
        [FunctionPass(noop, "noop"), scale_weights(1.0)],
        [DumpGraphs(tmp_path), PrintAfterPass(printer=printed.append), timer],
    )
    pipe.run(gm, CompileContext())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_input.txt", "01_noop.diff", "01_noop.txt", "02_scale_1.0.diff", "02_scale_1.0.txt"]
    assert "aten.linear.default" in (tmp_path / "01_noop.txt").read_text()
    assert [n for n, _ in timer.times] == ["noop", "scale_1.0"]
    assert any("after pass 1 'scale_1.0'" in p for p in printed)


def test_diff_shows_the_rewrite(gm, tmp_path):
    def relu_all(gm, ctx):
        for s in linear_sites(gm)[:1]:
            with gm.graph.inserting_after(s.node):
                r = gm.graph.call_function(torch.ops.aten.relu.default, (s.node,))
            s.node.replace_all_uses_with(r, delete_user_cb=lambda u, r=r: u is not r)
        gm.recompile()
        return PassResult(gm, True)

    Pipeline([FunctionPass(relu_all)], [DumpGraphs(tmp_path)]).run(gm, CompileContext())
    diff = (tmp_path / "01_relu_all.diff").read_text()
    assert "+" in diff and "relu" in diff


def test_numeric_check_records_and_enforces_floor(gm):
    x = {"input_ids": torch.randint(0, 256, (1, 8))}
    pipe = Pipeline([scale_weights(1.0), scale_weights(1.001)], numeric_check=NumericCheck(x))
    pipe.run(gm, CompileContext())
    assert pipe.records[0].sqnr_db == float("inf")
    assert 50 < pipe.records[1].sqnr_db < 60  # weights x1.001: measured 54.9 dB
    with pytest.raises(PipelineError, match="scale_0.0.*SQNR"):
        Pipeline([scale_weights(0.0)], numeric_check=NumericCheck(x, min_sqnr_db=10)).run(gm, CompileContext())


def test_register_pass_and_build_by_name():
    @register_pass("test_only_noop")
    class Noop(QQQPass):
        def call(self, gm, ctx):
            return PassResult(gm, False)

    assert PASSES.get("test_only_noop") is Noop and Noop.name == "test_only_noop"
    with pytest.raises(KeyError, match="unknown pass 'nope'"):
        PASSES.get("nope")


def test_non_pass_rejected():
    with pytest.raises(TypeError, match="FunctionPass"):
        Pipeline([noop])
