"""Bad input gets a clear error that names the problem and the fix: the cases the rest of
the suite does not cover (issue 17's list), through the public API and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import qqq_compile as qc
from qqq_compile.cli.main import main
from qqq_compile.compiler.passes.observe import InsertObservers
from qqq_compile.errors import ArtifactError, PipelineError
from qqq_compile.export import OutputExistsError
from qqq_compile.targets.w4a8.export import ExportError
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny RTN artifact and its compiled model."""
    root = tmp_path_factory.mktemp("errors")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    compiled = qc.compile(tiny_model("llama", num_hidden_layers=1), [ids], {"preset": "rtn"}, progress=False)
    compiled.save(str(root / "art"))
    return root, compiled


def edited(root, change) -> str:
    """A copy of the saved artifact with its manifest changed by ``change(manifest)``."""
    out = root / f"edit{len(list(root.iterdir()))}"
    shutil.copytree(root / "art", out)
    path = out / "qqq_manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return str(out)


def test_unknown_model_type_names_it_and_the_fix(saved):
    root, _ = saved
    path = edited(root, lambda m: m["model_config"].update(model_type="no_such_model"))
    with pytest.raises(ArtifactError) as e:
        qc.load(path)  # the config no longer matches the graph file: load rebuilds from it
    msg = str(e.value)
    assert "model_type 'no_such_model'" in msg and "pip install -U transformers" in msg
    assert len(msg) < 600  # not transformers' list of every architecture


@pytest.mark.parametrize(
    ("version", "match"),
    [
        ("x.y", r"unreadable format_version 'x.y'.*save the model again"),
        ("0.9", r"old artifact format 0.9; compile and save the model again"),
        ("2.0", r"artifact format 2.0.*upgrade qqq_compile \(pip install -U qqq-compile\)"),
    ],
)
def test_unreadable_old_and_new_format_versions(saved, version, match):
    root, _ = saved
    with pytest.raises(ArtifactError, match=match):
        qc.load(edited(root, lambda m: m.update(format_version=version)))


def test_saving_a_model_with_observers_is_refused_and_writes_nothing(saved, tmp_path):
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    half_done = qc.compile(tiny_model("llama", num_hidden_layers=1), [ids], passes=[InsertObservers()], progress=False)
    with pytest.raises(ArtifactError, match=r"observers left by 'observe' without 'calibrate'"):
        half_done.save(str(tmp_path / "obs"))
    assert not (tmp_path / "obs").exists()


def test_a_truncated_checkpoint_fails_streaming_naming_the_file(tmp_path):
    folder = tmp_path / "hf"
    tiny_model("llama", num_hidden_layers=2).save_pretrained(folder)
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    with pytest.raises(PipelineError, match=rf"{shard.name} ends early: the file is truncated"):
        qc.compile(str(folder), [ids], {"preset": "rtn"}, streaming=True, progress=False)


def test_compressed_tensors_export_refuses_a_non_empty_folder(saved, tmp_path):
    _, compiled = saved
    out = tmp_path / "ct"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file")
    with pytest.raises(ExportError, match="exists and is not empty; pass overwrite=True or choose another folder"):
        qc.export_compressed_tensors(compiled, str(out))
    assert (out / "keep.txt").read_text() == "the user's file"
    onnx_out = tmp_path / "m.onnx"
    onnx_out.write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):  # every exporter: no silent replace
        compiled.target.export("onnx", compiled, str(onnx_out))


def test_cli_rejects_zero_calibration_windows_and_unknown_presets(capsys):
    assert main(["quantize", "demo", "--n-calib", "0", "--out", "unused"]) == 2
    assert "--n-calib must be at least 1, got 0" in capsys.readouterr().err
    assert main(["quantize", "demo", "--preset", "nope", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "qqq_rot" in err  # the valid names are listed


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_on_missing_or_corrupt_artifacts(saved, tmp_path, capsys, command):
    root, _ = saved
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, str(tmp_path / "missing"), *extra]) == 2
    assert f"artifact folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "art", corrupt)
    (corrupt / "qqq_manifest.json").write_text("{not json")
    assert main([command, str(corrupt), *extra]) == 2
    err = capsys.readouterr().err
    assert "qqq_manifest.json is not valid JSON" in err and "the artifact is corrupt, save it again" in err
