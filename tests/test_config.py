import pytest

from qqq_compile.config import CalibConfig, CompileConfig, ConfigError, QuantConfig


def test_round_trip_dict_and_json():
    cfg = CompileConfig(preset="rtn", quant=QuantConfig(group_size=128, skip=("lm_head",)), calib=CalibConfig(4, 16))
    assert CompileConfig.from_dict(cfg.to_dict()) == cfg
    assert CompileConfig.from_json(cfg.to_json()) == cfg


def test_unknown_keys_rejected_with_valid_keys_listed():
    with pytest.raises(ConfigError, match="group_sise.*valid keys"):
        QuantConfig.from_dict({"group_sise": 128})
    with pytest.raises(ConfigError, match="unknown key"):
        CompileConfig.from_dict({"quant": {"bits": 3}})


@pytest.mark.parametrize("bad", [0, -2, 127])
def test_invalid_group_size(bad):
    with pytest.raises(ConfigError, match="group_size"):
        QuantConfig(group_size=bad)


def test_invalid_scale_dtype():
    with pytest.raises(ConfigError, match="group_scale_dtype"):
        QuantConfig(group_scale_dtype="bf16")
