"""qqq-compile generate / chat on a tiny saved artifact."""

from __future__ import annotations

import builtins
import json

from qqq_compile.cli.main import main
from tests.cli.test_cli import artifact, files, tiny_tokenizer  # noqa: F401 - shared fixtures

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
)


def test_generate_streams_text_and_reports_speed(artifact, capsys):  # noqa: F811
    argv = ["generate", str(artifact), "--prompt", "w1 w2 w3", "--max-new-tokens", "5", "--runtime", "eager"]
    assert main([*argv, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("w1 w2 w3") and len(out.split()) >= 5
    assert "3 prompt tokens, 5 new" in err and "decode" in err and "runtime eager" in err


def test_generate_sampling_is_seeded(artifact, capsys):  # noqa: F811
    argv = ["generate", str(artifact), "--prompt", "w7 w8", "--max-new-tokens", "6", "--runtime", "eager"]
    argv += ["--temperature", "0.8", "--top-k", "20", "--quiet"]
    texts = []
    for seed in ("1", "1"):
        assert main([*argv, "--seed", seed]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_chat_uses_the_template_and_keeps_the_conversation(artifact, files, tmp_path, capsys, monkeypatch):  # noqa: F811
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    lines = iter(["w10 w11", "w12", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    argv = ["chat", str(artifact), "--tokenizer", str(tmp_path / "tok"), "--max-new-tokens", "3"]
    assert main([*argv, "--runtime", "eager", "--quiet"]) == 0
    err = capsys.readouterr().err
    # Turn two's prompt holds turn one and its reply: more prompt tokens than turn one.
    counts = [int(line.split()[0].strip("[")) for line in err.splitlines() if "prompt tokens" in line]
    assert len(counts) == 2 and counts[1] > counts[0] + 3


def test_chat_without_a_template_names_the_fix(artifact, capsys):  # noqa: F811
    assert main(["chat", str(artifact), "--runtime", "eager", "--quiet"]) == 2
    assert "has no chat template" in capsys.readouterr().err


def quantize_argv(root, out, *extra):
    argv = ["quantize", str(root / "model"), "--calib", str(root / "text.txt"), "--preset", "rtn"]
    return [*argv, "--n-calib", "4", "--seq-len", "32", "--out", str(out), "--quiet", *extra]


def test_quantize_ships_the_decode_step_sized_by_max_len(files, tmp_path, monkeypatch):  # noqa: F811
    from qqq_compile.runtime import steps

    monkeypatch.setenv("QQQ_SAVE_STEP", "1")  # the default outside the test suite
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path / "cache"))
    sizes = []

    def fake_compile(cached, spec, path):  # the wiring, not the (minute-long) compile
        sizes.append((spec.max_batch, spec.max_len))
        path.write_bytes(b"package")

    monkeypatch.setattr(steps, "_aot_compile", fake_compile)
    assert main(quantize_argv(files, tmp_path / "a", "--max-len", "64")) == 0
    m = json.loads((tmp_path / "a" / "qqq_manifest.json").read_text())
    assert sizes == [(1, 64)] and (m["decode_step"]["max_batch"], m["decode_step"]["max_len"]) == (1, 64)
    assert (tmp_path / "a" / "step" / m["decode_step"]["package"]).read_bytes() == b"package"
    assert main(quantize_argv(files, tmp_path / "b", "--no-step")) == 0
    assert json.loads((tmp_path / "b" / "qqq_manifest.json").read_text())["decode_step"] is None
    assert sizes == [(1, 64)] and not (tmp_path / "b" / "step").exists()
