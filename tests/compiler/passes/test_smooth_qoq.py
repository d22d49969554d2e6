"""smooth(method="qoq_down"): after rotation, only the MLP output projections are smoothed
(folded into up_proj's rows), with α searched on down_proj's W4A8 output error."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from qqq_compile import CompileContext
from qqq_compile.annotations import node_annotation
from qqq_compile.compiler.api import calib_batches
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.passes.rotate import Rotate
from qqq_compile.compiler.passes.smooth import Smooth, run_w4a8_fake
from qqq_compile.compiler.pipeline import first_tensor, sqnr_db
from qqq_compile.config import ConfigError
from qqq_compile.graph import linear_sites
from tests.conftest import tiny_calib, tiny_model

CALIB = calib_batches(tiny_calib(8, 32))
EVAL = {"input_ids": torch.cat(tiny_calib(8, 32, seed=1))}
CH = [5, 33, 101]  # intermediate channels given outliers


def down_outliers(model: torch.nn.Module, factor: float = 100.0) -> torch.nn.Module:
    """Outlier channels in every down_proj's input (up_proj rows × factor, down_proj
    columns / factor): the float model is unchanged. Real LLMs show such "massive
    activations" there, and the residual rotation does not reach that space."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("mlp.up_proj"):
                mod.weight[CH] *= factor
            elif name.endswith("mlp.down_proj"):
                mod.weight[:, CH] /= factor
    return model


@functools.cache
def _captured(arch: str, outliers: bool) -> torch.fx.GraphModule:
    model = tiny_model(arch)
    return capture(down_outliers(model) if outliers else model, torch.randint(0, 256, (2, 8))).graph_module


def rotated(arch: str = "llama", outliers: bool = True, online: bool = False) -> torch.fx.GraphModule:
    gm = copy.deepcopy(_captured(arch, outliers))
    Rotate(online_down_proj=online)(gm, CompileContext(progress=False))
    return gm


def ctx() -> CompileContext:
    return CompileContext(calib=CALIB, progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_qoq_down_smooths_only_down_proj_and_keeps_the_float_model(arch):
    gm = rotated(arch)
    ref = first_tensor(gm(**EVAL)).detach()
    c = ctx()
    assert Smooth(method="qoq_down", n_grid=8)(gm, c).modified
    assert sqnr_db(ref, first_tensor(gm(**EVAL))) > 90  # float rounding (measured 110+ dB)
    smoothed = {}
    for s in linear_sites(gm):
        rec = node_annotation(s.node).smooth
        if rec is not None:
            smoothed[s.name.rsplit(".", 1)[-1]] = smoothed.get(s.name.rsplit(".", 1)[-1], 0) + (rec.param is not None)
    assert smoothed == {"down_proj": 2}, smoothed  # both layers' down_proj, nothing else
    assert any("qoq_down: smoothing the inputs of 2 MLP output projection(s) only" in n.message for n in c.notes)


def test_qoq_down_lowers_the_w4a8_error_after_rotation():
    base = rotated()
    ref = first_tensor(base(**EVAL)).detach()
    before = sqnr_db(ref, first_tensor(run_w4a8_fake(base, EVAL)))
    gm = copy.deepcopy(base)
    Smooth(method="qoq_down")(gm, ctx())
    after = sqnr_db(ref, first_tensor(run_w4a8_fake(gm, EVAL)))
    # Measured (outliers x100): 17.71 -> 18.62 dB end to end; each down_proj's relative
    # output error 0.124 -> 0.012 (the other linears' error dominates the end-to-end figure).
    assert after > before + 0.5, (before, after)
    recs = [r for s in linear_sites(gm) if (r := node_annotation(s.node).smooth) is not None]
    assert len(recs) == 2
    for rec in recs:
        assert rec.method == "qoq_down" and rec.loss_after < 0.25 * rec.loss_before, rec


def test_qoq_down_never_worsens_the_searched_loss_without_outliers():
    # End to end it is a wash here (measured -0.04 dB llama, +0.14 qwen2, +0.09 gemma):
    # a random tiny model has no outliers in down_proj's input to remove.
    gm = rotated(outliers=False)
    Smooth(method="qoq_down")(gm, ctx())
    recs = [r for s in linear_sites(gm) if (r := node_annotation(s.node).smooth) is not None]
    assert len(recs) == 2 and all(r.loss_after <= r.loss_before for r in recs)


def test_qoq_down_after_an_online_hadamard_has_nothing_to_smooth():
    gm = rotated(online=True)
    c = ctx()
    assert not Smooth(method="qoq_down")(gm, c).modified
    assert any(n.level == "warning" and "online_down_proj" in n.message for n in c.notes)


def test_unknown_method_names_the_choices():
    with pytest.raises(ConfigError, match="qoq_down"):
        Smooth(method="qoq")
