"""qqq-compile CLI, run in-process: help, argument errors, quantize -> eval round trip, error exits."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import types

import pytest
import torch

from qqq_compile.artifact import load
from qqq_compile.cli import main as cli
from qqq_compile.cli.main import build_parser, main
from qqq_compile.data import token_windows
from qqq_compile.eval import perplexity
from tests.conftest import tiny_model

COMMANDS = ("quantize", "eval", "inspect", "export", "bench", "demo")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny HF model folder (LLaMA + word-level tokenizer) and a text file of ~100 windows of 32 tokens."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama", num_hidden_layers=1, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    words = [f"w{min(int(rng.expovariate(0.08)), 99)}" for _ in range(3000)]
    (root / "text.txt").write_text("\n".join(" ".join(words[i : i + 12]) for i in range(0, 3000, 12)))
    return root


@pytest.fixture(scope="module")
def artifact(files):
    out = files / "w4a8"
    argv = ["quantize", str(files / "model"), "--calib", str(files / "text.txt"), "--preset", "rtn"]
    argv += ["--group-size", "32", "--n-calib", "8", "--seq-len", "32", "--out", str(out), "--quiet"]
    assert main([*argv, "--no-streaming"]) == 0  # the model loaded whole (a folder streams by default)
    return out


# ----------------------------------------------------------------------------- help and arguments


def test_help_lists_commands_and_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    assert "examples:" in out and "qqq-compile quantize demo" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help_with_an_example(command, capsys):
    assert main([command, "--help"]) == 0
    assert "example" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "usage: qqq-compile"),
        (["quantize", "demo"], "the following arguments are required: --out"),
        (["quantize", "demo", "--out", "x", "--preset", "magic"], "invalid choice: 'magic'"),
        (["eval", "x", "--n-windows", "many"], "invalid int value: 'many'"),
        (["export", "x", "--out", "y", "--format", "tflite"], "invalid choice: 'tflite'"),
    ],
)
def test_argument_errors_exit_2_with_usage(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_common_options_before_or_after_the_command():
    p = build_parser()
    assert p.parse_args(["eval", "d"]).seed == 0
    assert p.parse_args(["--seed", "3", "eval", "d"]).seed == 3
    assert p.parse_args(["--debug", "eval", "d", "--seed", "4"]).seed == 4
    assert p.parse_args(["--debug", "eval", "d"]).debug is True


def test_int8_head_is_on_unless_no_int8_head():
    from qqq_compile.cli.common import compile_config

    p = build_parser()
    for argv, want in ([], True), (["--int8-head"], True), (["--no-int8-head"], False):
        args = p.parse_args(["quantize", "demo", "--out", "x", *argv])
        assert args.int8_head is want and compile_config(args).quant.int8_head is want


# ----------------------------------------------------------------------------- quantize -> eval


def test_quantize_writes_an_artifact_with_tokenizer(artifact, capsys):
    manifest = json.loads((artifact / "qqq_manifest.json").read_text())
    assert manifest["pipeline"] == ["quantize_rtn", "lower", "int8_head"]  # the int8 lm_head is the default
    assert manifest["compile_config"]["quant"]["group_size"] == 32
    assert sum(r["format"] == "w4a8" for r in manifest["layers"]) == 7
    assert (artifact / "tokenizer" / "tokenizer.json").is_file()


def test_quantize_streaming_matches_in_memory(artifact, files, tmp_path):
    out = tmp_path / "streamed"
    argv = ["quantize", str(files / "model"), "--calib", str(files / "text.txt"), "--preset", "rtn", "--streaming"]
    argv += ["--group-size", "32", "--n-calib", "8", "--seq-len", "32", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load(out)(x).logits, load(artifact)(x).logits, rtol=0, atol=1e-5)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def _spy_streaming(monkeypatch):
    """Record each streaming compile the CLI runs (the real one runs)."""
    import qqq_compile.compiler.api as api

    calls, real = [], api.compile_from_disk

    def spy(folder, *args, **kwargs):
        calls.append((folder, kwargs.get("dtype")))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(api, "compile_from_disk", spy)
    return calls


def test_quantize_streams_a_folder_by_default(artifact, files, tmp_path, monkeypatch):
    calls = _spy_streaming(monkeypatch)
    out = tmp_path / "auto"
    argv = ["quantize", str(files / "model"), "--calib", str(files / "text.txt"), "--preset", "rtn"]
    argv += ["--group-size", "32", "--n-calib", "8", "--seq-len", "32", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    # streamed, in float32 as load_model computes (whatever dtype config.json names)
    assert calls == [(files / "model", torch.float32)]
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load(out)(x).logits, load(artifact)(x).logits, rtol=0, atol=1e-5)
    assert main([*argv[:-3], "--out", str(tmp_path / "whole"), "--quiet", "--no-streaming"]) == 0
    assert len(calls) == 1  # --no-streaming loads the model whole


def test_quantize_loads_the_model_whole_when_streaming_cannot_capture(artifact, files, tmp_path, monkeypatch, capsys):
    import qqq_compile.compiler.api as api
    from qqq_compile.errors import CaptureError

    def fail(*args, **kwargs):
        raise CaptureError("torch.export failed on the skeleton")

    monkeypatch.setattr(api, "compile_from_disk", fail)
    out = tmp_path / "fallback"
    argv = ["quantize", str(files / "model"), "--calib", str(files / "text.txt"), "--preset", "rtn"]
    argv += ["--group-size", "32", "--n-calib", "8", "--seq-len", "32", "--out", str(out)]
    assert main(argv) == 0
    assert "cannot stream this model (torch.export failed on the skeleton); loading it into memory" in (
        capsys.readouterr().out
    )
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load(out)(x).logits, load(artifact)(x).logits, rtol=0, atol=0)
    assert main([*argv, "--streaming"]) == 2  # asked for explicitly: the error, not a change of plan
    assert "torch.export failed on the skeleton" in capsys.readouterr().err


def test_quantize_streaming_needs_a_model_folder(files, tmp_path, capsys):
    argv = ["quantize", str(files / "text.txt"), "--streaming", "--out", str(tmp_path / "x"), "--quiet"]
    assert main(argv) == 2  # a usage error, like every bad argument
    assert "--streaming reads a save_pretrained folder" in capsys.readouterr().err


def test_eval_matches_perplexity_of_the_loaded_artifact(artifact, files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out_json = tmp_path / "ppl.json"
    argv = ["eval", str(artifact), "--text", str(files / "text.txt"), "--n-windows", "3", "--seq-len", "32"]
    assert main([*argv, "--fp", str(files / "model"), "--json", str(out_json), "--quiet"]) == 0
    res = json.loads(out_json.read_text())
    printed = capsys.readouterr().out
    assert f"W4A8 perplexity: {res['w4a8_ppl']:.4f}" in printed and "float perplexity" in printed
    # the same windows, evaluated here without the CLI
    windows = token_windows(tiny_tokenizer(), (files / "text.txt").read_text(), 32, n=3, select="last")
    assert res["n_windows"] == 3 and all(w[0, 0] == 1 for w in windows)  # BOS first
    assert res["w4a8_ppl"] == pytest.approx(perplexity(load(artifact), windows, progress=False), rel=1e-6)
    fp = AutoModelForCausalLM.from_pretrained(files / "model")
    assert res["fp_ppl"] == pytest.approx(perplexity(fp, windows, progress=False), rel=1e-6)
    assert res["delta_pct"] == pytest.approx(100 * (res["w4a8_ppl"] / res["fp_ppl"] - 1))
    assert abs(res["delta_pct"]) < 5  # a random tiny model: W4A8 barely moves its near-uniform predictions


# ----------------------------------------------------------------------------- error exits


def test_errors_print_one_line_without_traceback(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("qqq-compile: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]  # after the progress lines
    assert "missing does not exist" in errors[0] and "--debug" in errors[0]


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ArtifactError" in err


def test_eval_without_a_saved_tokenizer_asks_for_one(artifact, tmp_path, capsys):
    import shutil

    copy = tmp_path / "no-tok"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "qqq_manifest.json").read_text())
    manifest["tokenizer"] = None
    (copy / "qqq_manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", str(copy), "--text", "unused.txt"]) == 2
    assert "saved without a tokenizer; pass --tokenizer MODEL" in capsys.readouterr().err


def test_bad_config_and_missing_model_exit_2(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "no-model"), "--preset", "rtn", "--out", str(tmp_path / "o")]) == 2
    assert "Model path not found" in capsys.readouterr().err
    argv = ["quantize", "demo", "--preset", "rtn", "--group-size", "0", "--out", str(tmp_path / "o")]
    assert main(argv) == 2  # rejected before the model is loaded
    assert "group_size must be None, -1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- inspect / export / bench wiring


def test_inspect_calls_the_report_writer_or_says_it_is_missing(artifact, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "qqq_compile.inspect", None)
    assert main(["inspect", str(artifact), "--out", str(tmp_path / "r.html")]) == 2
    assert "the HTML report is not available" in capsys.readouterr().err
    calls = []
    fake = types.ModuleType("qqq_compile.inspect")
    fake.write_html_report = lambda compiled, path: calls.append((compiled, path)) or path
    monkeypatch.setitem(sys.modules, "qqq_compile.inspect", fake)
    monkeypatch.setattr("qqq_compile.artifact.load", lambda path: ("compiled", path))
    assert main(["inspect", str(artifact), "--out", str(tmp_path / "r.html")]) == 0
    assert calls == [(("compiled", str(artifact)), str(tmp_path / "r.html"))]


def test_export_passes_artifact_and_tokenizer(artifact, tmp_path, monkeypatch):
    calls = []
    onnx = types.ModuleType("qqq_compile.targets.w4a8.export.onnx")
    onnx.export_onnx = lambda compiled, path, *, kind="matmulnbits", **kw: calls.append(("onnx", compiled, path, kind))
    ct = types.ModuleType("qqq_compile.targets.w4a8.export.compressed_tensors")
    ct.export_compressed_tensors = lambda compiled, out_dir, tokenizer=None, **kw: calls.append(
        ("ct", compiled, tokenizer)
    )
    monkeypatch.setitem(sys.modules, "qqq_compile.targets.w4a8.export.onnx", onnx)
    monkeypatch.setitem(sys.modules, "qqq_compile.targets.w4a8.export.compressed_tensors", ct)
    from qqq_compile.targets.registry import get_target

    compiled = types.SimpleNamespace(target=get_target("w4a8"))  # export dispatches on the artifact's target
    monkeypatch.setattr("qqq_compile.artifact.load", lambda path: compiled)
    assert main(["export", str(artifact), "--format", "onnx", "--out", "m.onnx", "--onnx-kind", "dq"]) == 0
    assert main(["export", str(artifact), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    assert calls[0] == ("onnx", compiled, "m.onnx", "dq")
    assert calls[1][:2] == ("ct", compiled) and calls[1][2]("w5")["input_ids"] == [8]


def test_bench_runs_the_script_or_explains(tmp_path, monkeypatch, capfd):
    script = tmp_path / "cpu_speed.py"
    script.write_text("import sys\nprint('bench args', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "_bench_script", lambda: script)
    assert main(["bench", "--", "--quick"]) == 3
    assert "bench args ['--quick']" in capfd.readouterr().out
    monkeypatch.setattr(cli, "_bench_script", lambda: tmp_path / "absent.py")
    assert main(["bench"]) == 0
    assert "python benchmarks/cpu_speed.py" in capfd.readouterr().out


# ----------------------------------------------------------------------------- demo on the real model


def run_demo(tmp_path, capsys, preset: str) -> tuple[dict, str]:
    """The demo on 2 short calibration and evaluation windows: (its JSON, its printed table)."""
    out_json = tmp_path / "demo.json"
    argv = ["demo", "--preset", preset, "--n-calib", "2", "--n-eval", "2", "--seq-len", "128"]
    argv += ["--continuation", "6", "--runtime", "eager"]
    assert main([*argv, "--json", str(out_json), "--quiet"]) == 0
    return json.loads(out_json.read_text()), capsys.readouterr().out


@pytest.mark.slow
def test_demo_compares_fp32_and_w4a8(tmp_path, capsys):
    res, table = run_demo(tmp_path, capsys, "rtn")
    assert "| FP32 |" in table and "| W4A8 (rtn, group 128) |" in table
    assert 1 < res["fp_ppl"] < res["w4a8_ppl"] < 10 * res["fp_ppl"]
    assert res["w4a8_weight_bytes"] < 0.4 * res["fp_weight_bytes"]
    assert res["fp_prefill_tokens_per_s"] > 0 and res["w4a8_prefill_tokens_per_s"] > 0
    assert res["rtn_w4a8_ppl"] is None  # the baseline row is the method itself here
    assert "greedy continuation" in table and [c["model"] for c in res["continuations"]] == ["FP32", "W4A8"]
    assert all(c["decode_tokens_per_s"] > 0 and c["text"] for c in res["continuations"])


@pytest.mark.slow
def test_demo_shows_the_round_to_nearest_baseline(tmp_path, capsys):
    res, table = run_demo(tmp_path, capsys, "smoothquant")
    assert "| W4A8 (rtn, group 128) |" in table and "| W4A8 (smoothquant, group 128) |" in table
    assert 1 < res["fp_ppl"] < res["rtn_w4a8_ppl"] < 10 * res["fp_ppl"]
    assert res["rtn_w4a8_ppl"] != res["w4a8_ppl"]  # two different models were evaluated


PROBE = """
import ctypes, sys, torch
from qqq_compile.cli.common import return_freed_memory

class Mallinfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
def mmapped():  # MB malloc holds in mmapped chunks (given back to the system on free)
    return libc.mallinfo2().hblkhd >> 20
tuned = return_freed_memory() if sys.argv[1] == "tuned" else False
big = torch.ones(8 << 20, dtype=torch.uint8); del big  # a freed mmapped chunk raises glibc's threshold
base, tmp = mmapped(), [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(60)]  # 240 MB
while_alive = mmapped() - base
del tmp
print(tuned, while_alive, mmapped() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cli_process_returns_freed_tensor_memory():
    """Freed 4 MB tensors stay with malloc (on its heap) under glibc's default, once a freed
    larger tensor has raised its mmap threshold; with the CLI's setting each is its own
    mmapped chunk, given back to the system when freed. Counted by glibc itself
    (``mallinfo2().hblkhd``): what RSS shows also depends on the heap left by the imports."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    runs = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
        tuned, alive, after = out.stdout.split()
        runs[mode] = (tuned == "True", int(alive), int(after))
    assert runs["default"][:2] == (False, 0), runs  # on the heap: kept when freed
    assert runs["tuned"][0] and runs["tuned"][1] >= 235 and runs["tuned"][2] == 0, runs  # mmapped, then returned
