"""calibrate: block-by-block statistics equal a whole-model run; NaN data is caught."""

import pytest
import torch

from qqq_compile import CompileContext
from qqq_compile.compiler.api import calib_batches
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.calibrate import Calibrate, CalibrationDataError
from qqq_compile.compiler.passes.observe import InsertObservers
from qqq_compile.graph import info, linear_sites
from tests.conftest import tiny_calib, tiny_model


def test_calibrate_fills_stats_and_removes_observers():
    model = tiny_model("llama")
    gm = capture(model, torch.randint(0, 256, (2, 8))).graph_module
    calib = tiny_calib(6)
    ctx = CompileContext(calib=calib_batches(calib, batch_size=4), progress=False)
    InsertObservers(hessian=True)(gm, ctx)
    res = Calibrate()(gm, ctx)
    assert res.modified
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    # reference: hooks on the original model's linears
    seen = {}

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            seen[name] = torch.maximum(seen.get(name, torch.zeros(x.shape[1])), x.abs().amax(0))

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        for c in calib:
            model(c)
    for s in linear_sites(gm):
        li = info(s.node)
        if s.name == "lm_head":
            assert li.act_absmax is None
            continue
        torch.testing.assert_close(li.act_absmax, seen[s.name], rtol=1e-5, atol=1e-6)
        assert li.act_samples == 6 * 32 and li.hessian.shape == (li.in_features, li.in_features)


def test_nan_in_calibration_is_caught_at_first_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    gm = capture(model, torch.randint(0, 256, (2, 8))).graph_module
    ctx = CompileContext(calib=calib_batches(tiny_calib(2)), progress=False)
    InsertObservers()(gm, ctx)
    with pytest.raises(CalibrationDataError, match="model.layers.1.mlp.down_proj.*NaN"):
        Calibrate()(gm, ctx)


def test_calibrate_without_data_says_how_to_fix():
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    InsertObservers()(gm, CompileContext())
    with pytest.raises(ValueError, match="calib="):
        Calibrate()(gm, CompileContext())
