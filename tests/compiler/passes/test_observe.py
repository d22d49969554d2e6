"""observe: one observer per distinct linear input; lm_head skipped."""

import torch

from qqq_compile import CompileContext
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.observe import ActObserver, InsertObservers
from qqq_compile.graph import info, linear_sites
from tests.conftest import tiny_model


def _observers(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActObserver)]


def test_observers_inserted_per_distinct_input_and_graph_unchanged_numerically():
    model = tiny_model("llama")
    gm = capture(model, torch.randint(0, 256, (2, 8))).graph_module
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = gm(input_ids=x).logits
    res = InsertObservers()(gm, CompileContext())
    assert res.modified
    obs = _observers(gm)
    # per layer: qkv share one input, o, gate/up share one, down -> 4 per layer; lm_head skipped
    assert len(obs) == 2 * 4
    sites = linear_sites(gm)
    lm_head = [s for s in sites if s.name == "lm_head"][0]
    assert info(lm_head.node).skipped and lm_head.x not in obs
    with torch.no_grad():
        out = gm(input_ids=x).logits
    torch.testing.assert_close(out, ref)
    qkv = [
        s
        for s in sites
        if s.name.startswith("model.layers.0.self_attn.") and s.name[-6:] in ("q_proj", "k_proj", "v_proj")
    ]
    assert len({s.x for s in qkv}) == 1


def test_observer_statistics_match_a_direct_computation():
    obs = ActObserver(3, hessian=True)
    a, b = torch.randn(4, 5, 3), torch.randn(7, 3)
    obs(a)
    obs(b)
    flat = torch.cat([a.reshape(-1, 3), b])
    torch.testing.assert_close(obs.absmax, flat.abs().amax(0))
    torch.testing.assert_close(obs.hessian, 2 * flat.T @ flat / flat.shape[0], rtol=1e-5, atol=1e-5)
    assert obs.n == 27
