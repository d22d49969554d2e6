"""The driver: one way to build a pass list from a config and run it, used by every path
(compile, blockwise, backend, replay); passes as data."""

from __future__ import annotations

import json

import pytest
import torch

import qqq_compile as qc
from qqq_compile.compiler import driver
from qqq_compile.compiler.passes.calibrate import Calibrate
from qqq_compile.compiler.passes.cast_float import CastFloatWeights
from qqq_compile.compiler.passes.gptq import GPTQ, GPTQConfig
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.observe import InsertObservers
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.compiler.passes.rotate import Rotate
from qqq_compile.compiler.passes.smooth import Smooth
from qqq_compile.compiler.pipeline import PASSES, CompileContext, PassConfig, QQQPass, pass_from_dict
from qqq_compile.config import CompileConfig, ConfigError
from qqq_compile.graph import get_attr, linear_sites
from qqq_compile.targets.registry import get_target
from qqq_compile.targets.w4a8.fuse_norm_quant import FuseNormQuant
from tests.conftest import tiny_calib, tiny_model

BF16 = {"quant": {"float_weight_dtype": "bfloat16"}}
BF16_FLOAT_HEAD = {"quant": {"float_weight_dtype": "bfloat16", "int8_head": False}}  # lm_head kept a float linear


def names(pass_list):
    return [p.name for p in pass_list]


def builtin_pass_classes(target: str | None = None) -> dict[str, type[QQQPass]]:
    """Every pass the package registers: target-neutral passes and the targets' own (only
    ``target``'s when given)."""
    import qqq_compile  # noqa: F401 - registers every built-in pass

    own = ("qqq_compile.compiler.passes.", f"qqq_compile.targets.{target + '.' if target else ''}")
    return {n: PASSES.get(n) for n in PASSES.names() if PASSES.get(n).__module__.startswith(own)}


# ----------------------------------------------------------------------------- passes as data


def test_every_builtin_pass_is_data():
    classes = builtin_pass_classes()
    assert set(classes) == {
        "observe", "calibrate", "rotate", "smooth", "gptq", "quantize_rtn", "lower", "fuse_norm_quant", "cast_float",
        "int8_head", "gguf_check", "gguf_head",
    }  # fmt: skip
    for name, cls in classes.items():
        p = cls()
        assert issubclass(cls.config_class, PassConfig) and isinstance(p.config, cls.config_class)
        spec = json.loads(json.dumps(p.to_dict()))
        assert spec["name"] == name and pass_from_dict(spec) == p
        assert p.effective_replay_mode() in ("rerun", "state", "tensors")
        with pytest.raises(ConfigError, match="unknown key"):
            pass_from_dict({"name": name, "options": {"no_such_option": 1}})


def test_options_read_and_write_through_the_config():
    g = GPTQ(damp=0.05, group_size=64)
    assert g.damp == 0.05 and g.config == GPTQConfig(damp=0.05, group_size=64)
    g.damp = 0.1  # re-validated, and the config (what the manifest stores) follows
    assert g.config.damp == 0.1 and g.to_dict()["options"]["damp"] == 0.1
    with pytest.raises(ConfigError, match="damp must be >= 0"):
        g.damp = -1
    with pytest.raises(ConfigError, match="group_size"):
        QuantizeRTN(group_size=3)
    with pytest.raises(ValueError, match="not known"):  # ConfigError is a ValueError
        Smooth(method="bogus")
    assert repr(Rotate(online_down_proj=False)) == "Rotate(online_down_proj=False, seed=0, head_rotation=False)"


# ----------------------------------------------------------------------------- build_passes


def test_build_passes_from_preset_explicit_and_specs():
    # the config's default int8_head appends its pass to the preset and to explicit lists alike
    # (the default preset is qqq_rot: rotation first, no smoothing)
    assert names(driver.build_passes(None)) == ["rotate", "gptq", "quantize_rtn", "lower", "int8_head"]
    assert names(driver.build_passes({"preset": "rtn"})) == ["quantize_rtn", "lower", "int8_head"]
    float_head = {"preset": "rtn", "quant": {"int8_head": False}}
    assert names(driver.build_passes(float_head)) == ["quantize_rtn", "lower"]
    specs = [{"name": "rotate", "options": {"online_down_proj": False}}, QuantizeRTN(32), {"name": "lower"}]
    built = driver.build_passes(CompileConfig(), specs)
    assert names(built) == ["rotate", "quantize_rtn", "lower", "int8_head"]
    assert built[0].online_down_proj is False and built[1].group_size == 32
    # ... to lists that lower to W4A8: one that lowers nothing keeps the float head
    assert names(driver.build_passes(CompileConfig(), [])) == []
    assert names(driver.build_passes(CompileConfig(), [{"name": "rotate"}])) == ["rotate"]


def test_config_implies_cast_float_once():
    built = driver.build_passes(BF16 | {"preset": "rtn"})
    assert names(built) == ["quantize_rtn", "lower", "cast_float", "int8_head"]
    explicit = driver.build_passes(BF16_FLOAT_HEAD, [QuantizeRTN(), Lower(), CastFloatWeights("float16")])
    assert names(explicit) == ["quantize_rtn", "lower", "cast_float"] and explicit[-1].dtype == "float16"


def test_order_and_calibration_requirements_fail_before_any_work():
    with pytest.raises(qc.PipelineError, match="'calibrate'.*needs pass 'observe' to run before it"):
        driver.build_passes(None, [Calibrate(), QuantizeRTN(), Lower()])
    with pytest.raises(qc.PipelineError, match="'fuse_norm_quant'.*needs pass 'lower'"):
        driver.build_passes(None, [QuantizeRTN(), FuseNormQuant(), Lower()])
    calls = []

    class Spy(QQQPass):
        name = "spy"

        def call(self, gm, ctx):
            calls.append(1)
            return qc.PassResult(gm, False)

    gm = qc.capture(tiny_model("llama", num_hidden_layers=1), torch.randint(0, 256, (2, 8))).graph_module
    with pytest.raises(qc.PipelineError, match="'gptq' needs calibration data.*calib="):
        driver.run_pipeline(gm, CompileContext(), [Spy(), GPTQ(), QuantizeRTN(), Lower()])
    assert calls == []  # refused before the first pass ran


def test_run_pipeline_reports_the_exact_passes():
    gm = qc.capture(tiny_model("llama", num_hidden_layers=1), torch.randint(0, 256, (2, 8))).graph_module
    config = CompileConfig.from_dict({"preset": "rtn", "quant": {"int8_head": False}})
    passes = driver.build_passes(config, [InsertObservers(hessian=True), Calibrate(), QuantizeRTN(32), Lower()])
    ctx = driver.build_context(config, [{"input_ids": torch.randint(0, 256, (2, 16))}], progress=False)
    out, report = driver.run_pipeline(gm, ctx, passes, config=config)
    assert report.pipeline == ["observe", "calibrate", "quantize_rtn", "lower"]
    assert report.pass_configs[0] == {"name": "observe", "options": {"hessian": True}}
    assert [pass_from_dict(s) for s in report.pass_configs] == passes
    # the report stores the format as the target resolved it: group size and skip filled in
    resolved = config.to_dict()
    resolved["quant"]["group_size"] = get_target("w4a8").default_group_size  # the target's default
    resolved["quant"]["skip"] = list(get_target("w4a8").default_skip)
    assert config.quant.group_size is None and report.config == resolved and len(report.passes) == 4
    assert sum(n.target == torch.ops.qqq.w4a8_linear.default for n in out.graph.nodes) == 7


# ----------------------------------------------------------------------------- every path uses it


def lm_head_dtype(gm):
    head = next(s for s in linear_sites(gm) if s.name.endswith("lm_head"))
    return get_attr(gm, head.weight.target).dtype


def test_compile_and_backend_both_honour_float_weight_dtype():
    model = tiny_model("llama", num_hidden_layers=1)
    compiled = qc.compile(model, tiny_calib(2), BF16_FLOAT_HEAD | {"preset": "rtn"}, progress=False)
    assert compiled.report.pipeline[-1] == "cast_float" and lm_head_dtype(compiled.graph_module) == torch.bfloat16
    backend = qc.qqq_backend(config=CompileConfig.from_dict(BF16_FLOAT_HEAD | {"preset": "rtn"}))
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        out, ref = fn(x).logits, compiled(x).logits
    assert backend.last_report.pipeline[-1] == "cast_float"
    assert any(t.dtype == torch.bfloat16 for t in backend.last_graph.buffers())
    assert torch.equal(ref, out)  # the same pipeline as compile(), so the same numbers (measured: identical)


def test_every_builtin_pass_is_known_by_name_after_import_qqq_compile():
    # A fresh interpreter: a pass list given as data must find passes no preset imported.
    import subprocess
    import sys

    code = "import qqq_compile\nfrom qqq_compile.compiler.pipeline import PASSES\nprint(','.join(PASSES.names()))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert set(out.strip().split(",")) >= set(builtin_pass_classes())
