"""The AOTInductor decode step: shipped with the artifact, code only, one step for every
length, the same logits as the eager reference, rebuilt once on another machine.

One AOT compile for the whole module (the ``shipped`` artifact, tens of seconds); the
other tests load its package, and those that must not compile make compiling fail."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import qqq_compile as qc
from qqq_compile.artifact import MANIFEST, load, save
from qqq_compile.compiler.pipeline import sqnr_db
from qqq_compile.runtime import aot_build, steps
from qqq_compile.runtime.generate import PREFILL_CHUNK, GenerationError
from tests.conftest import tiny_calib, tiny_model

NEW = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An empty $QQQ_CACHE for the module: no package from elsewhere is found by accident."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("qqq_cache")
    mp.setenv("QQQ_CACHE", str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def w4a8():
    model = tiny_model("llama")
    return qc.compile(model, calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)


@pytest.fixture(scope="module")
def shipped(w4a8, cache, tmp_path_factory):
    """An artifact saved with its decode step (the module's one AOT compile). The compile
    runs in a child process (``runtime.aot_build``): in this one it would fail."""
    path = tmp_path_factory.mktemp("art") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch._inductor, "aoti_compile_and_package", _not_in_this_process)
        save(w4a8, path, prepare_step=True, progress=False)
    return path


def _not_in_this_process(*args, **kwargs):
    raise AssertionError("the AOT compile ran in the test's own process")


@pytest.fixture(scope="module")
def aot_step(w4a8, cache):
    """A 2-row AOT step (the server's shape: rows join at ``cache_row``); a second compile."""
    return steps.build_step(w4a8.graph_module, max_batch=2, max_len=32, runtime="aot", progress=False), cache


@pytest.fixture
def no_compile(monkeypatch):
    """Any AOT compile fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("an AOT compile ran")

    monkeypatch.setattr(steps, "_aot_compile", boom)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", boom)


def prompt(n: int, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def fx_frames(fn) -> list[str]:
    """Names of the FX-generated functions (an eager graph's forward) that ran inside ``fn()``."""
    entered: list[str] = []

    def spy(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename.startswith("<eval_with_key>") and code.co_name == "forward":
            entered.append(frame.f_code.co_name)

    sys.setprofile(spy)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entered


def logits_along(step, seq: torch.Tensor, t: int) -> torch.Tensor:
    """The step's logits for every position after the prompt, fed the tokens of ``seq``."""
    out = [step(seq[:, :t], torch.ones(1, t, dtype=torch.long), torch.arange(t))]
    for i in range(t, seq.shape[1] - 1):
        out.append(step(seq[:, i : i + 1], torch.ones(1, i + 1, dtype=torch.long), torch.tensor([i])))
    return torch.cat(out, 1)


# ----------------------------------------------------------------------------- shipped


def test_save_ships_one_code_only_package(shipped, w4a8):
    m = json.loads((shipped / MANIFEST).read_text())
    assert m["format_version"] == "1.2"
    step = m["decode_step"]
    # The tiny llama's context is 2048 positions: the default step covers all of it.
    assert (step["folder"], step["max_batch"], step["max_len"]) == ("step", 1, 2048)
    assert (step["cpu"], step["torch"]) == (steps.cpu_id(), torch.__version__)
    (pkg,) = (shipped / "step").glob("*.pt2")
    assert pkg.name == step["package"]
    # No weight in the package: a package that embeds its constants stores their raw bytes.
    with zipfile.ZipFile(pkg) as z:
        blob = b"".join(z.read(n) for n in z.namelist())
    for name in ("qqq_lm_head_int8", "qqq_model_layers_0_mlp_down_proj_qweight"):
        weight = getattr(w4a8.graph_module, name).contiguous().view(torch.uint8).numpy().tobytes()
        assert len(weight) >= 4096 and weight[:4096] not in blob


def test_the_package_calls_the_cpp_kernels_through_their_c_shims(shipped):
    """AOTInductor calls a custom op through its proxy executor (an IValue stack built from the
    op's schema and a boxed dispatcher call, per op and token) unless the op is given a C shim:
    with the C++ kernels loaded, every qqq kernel in the step is a direct C call."""
    from qqq_compile.targets.w4a8.kernels import cpu

    if not cpu.ensure_cpp_kernels():
        pytest.skip("the C++ kernels are not loaded: the package calls the torch kernels through the proxy executor")
    (pkg,) = (shipped / "step").glob("*.pt2")
    with zipfile.ZipFile(pkg) as z:
        code = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    for fn in ("w4a8_linear", "w8a8_linear", "attention_f32kv", "attention_mask"):
        assert f"AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_{fn}(" in code, fn
    assert "proxy_executor_call_function(" not in code


def test_only_cpu_graphs_call_the_c_shims(w4a8):
    """AOTInductor names a shim after the device (``aoti_torch_cuda_*`` on a GPU graph) and the
    shims are CPU code: a graph elsewhere keeps the proxy executor."""
    from qqq_compile.targets.w4a8.kernels import cpu

    if not cpu.ensure_cpp_kernels():
        pytest.skip("the C++ kernels are not loaded: no graph calls C shims")
    assert torch.ops.qqq.w4a8_linear.default in aot_build.c_shims(w4a8.graph_module)
    assert aot_build.c_shims(copy.deepcopy(w4a8.graph_module).to("meta")) == {}


def test_load_then_generate_runs_the_shipped_package_without_compiling(shipped, no_compile):
    compiled = load(shipped)
    out = None

    def run():
        nonlocal out
        out = compiled.generate(prompt(7), max_new_tokens=NEW, eos_token_id=[], return_dict_in_generate=True)

    frames = fx_frames(run)  # default runtime: "auto"
    (step,) = compiled.decode_steps
    assert out.runtime == step.runtime == "aot" and isinstance(step.fn, steps._Runner)
    assert Path(step.package_path).parent == shipped / "step" and not step.compiled
    assert step.calls == NEW and out.sequences.shape == (1, 7 + NEW)
    assert frames == []  # the eager graph never ran: the calls went to the AOT runner
    assert "decode steps: aot 1x2048" in repr(compiled)
    # The spy does see an eager step run (so the empty list above means something).
    eager = compiled.prepare_generation(runtime="eager")
    assert fx_frames(lambda: eager(prompt(3), torch.ones(1, 3, dtype=torch.long), torch.arange(3)))


def test_preparing_a_shorter_step_takes_the_shipped_one(shipped, no_compile):
    """``prepare_generation(max_len=640)`` on an artifact shipping 2048 positions gets the
    shipped package (it serves every shorter length), not a compile; eager steps, other row
    counts and other cache dtypes are built as asked."""
    compiled = load(shipped)
    step = compiled.prepare_generation(max_len=640, runtime="aot", progress=False)
    assert step.runtime == "aot" and step.spec.max_len == 2048 and not step.compiled
    assert Path(step.package_path).parent == shipped / "step"
    out = compiled.generate(prompt(9), max_new_tokens=3, eos_token_id=[], return_dict_in_generate=True)
    assert out.runtime == "aot" and step.calls == 3
    assert compiled.prepare_generation(max_len=64, runtime="eager").spec.max_len == 64


def test_longer_requests_reuse_the_one_step(shipped, no_compile):
    compiled = load(shipped)
    requests = ((5, 4), (300, 40), (1900, 100), (2000, 48))
    for n, new in requests:
        out = compiled.generate(prompt(n), max_new_tokens=new, eos_token_id=[], return_dict_in_generate=True)
        assert out.runtime == "aot" and out.new_tokens == new
    (step,) = compiled.decode_steps
    # Per request: one call per PREFILL_CHUNK prompt tokens, then one per new token after the first.
    assert step.calls == sum(-(-n // PREFILL_CHUNK) + new - 1 for n, new in requests)


def test_requests_past_the_context_and_empty_prompts_are_refused(shipped, no_compile):
    compiled = load(shipped)
    with pytest.raises(GenerationError, match=r"2060 positions, more than this model's context of 2048: shorten"):
        compiled.generate(prompt(2040), max_new_tokens=20)
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.tensor([], dtype=torch.long)):
        with pytest.raises(GenerationError, match="at least one prompt token"):
            compiled.generate(empty, max_new_tokens=4)
    assert compiled.decode_steps == []  # refused before any step was built


def test_aot_and_eager_agree(shipped, no_compile):
    compiled = load(shipped)
    ids = prompt(9, seed=5)
    a = compiled.generate(ids, max_new_tokens=10, eos_token_id=[], runtime="aot", return_dict_in_generate=True)
    e = compiled.generate(ids, max_new_tokens=10, eos_token_id=[], runtime="eager", return_dict_in_generate=True)
    assert (a.runtime, e.runtime) == ("aot", "eager")
    by_runtime = {s.runtime: s for s in compiled.decode_steps}
    assert by_runtime["aot"].calls == by_runtime["eager"].calls == 10
    got = logits_along(by_runtime["aot"], a.sequences, 9)
    want = logits_along(by_runtime["eager"], a.sequences, 9)
    assert got.shape == (1, 10, 256)
    # Inductor fuses the float epilogues (RMSNorm, RoPE, SiLU) in another order: float
    # rounding only (measured ~130 dB on this model). Tokens can differ on real models
    # (int8 activation rounding amplifies those differences; FINDINGS.md), not at 100+ dB
    # on this one, whose top-2 logit margins are far wider.
    assert sqnr_db(want, got) > 100
    assert torch.equal(a.sequences, e.sequences)


def test_the_runner_reads_the_graphs_weights_and_writes_its_kv_cache(shipped, no_compile):
    compiled = load(shipped)
    step = compiled.prepare_generation(runtime="aot")
    ids = prompt(10)
    mask, pos = torch.ones(1, 10, dtype=torch.long), torch.arange(10)
    first = step(ids, mask, pos)
    k0 = step.graph_module.get_buffer("qqq_k_cache_0")
    assert k0[:, :, :10].abs().sum() > 0 and k0[:, :, 10:].abs().sum() == 0  # written in place, ours
    scale = compiled.graph_module.get_buffer("qqq_lm_head_int8_scale")
    with torch.no_grad():
        scale.mul_(2)
        try:
            doubled = step(ids, mask, pos)
        finally:
            scale.div_(2)
    torch.testing.assert_close(doubled, 2 * first, rtol=1e-6, atol=0)  # the runner read our tensor


def test_steps_hold_one_copy_of_each_weight(shipped):
    compiled = load(shipped)
    x = prompt(12)
    with torch.no_grad():
        before = compiled(x).logits
    a = compiled.prepare_generation(runtime="eager")
    b = compiled.prepare_generation(runtime="eager", max_len=64)
    q = compiled.graph_module.get_buffer("qqq_model_layers_0_self_attn_q_proj_qweight")
    fused = [s.graph_module.get_buffer("qqq_fused0_qweight") for s in (a, b)]
    assert q.untyped_storage().data_ptr() == fused[0].untyped_storage().data_ptr()
    assert fused[1].untyped_storage().data_ptr() == fused[0].untyped_storage().data_ptr()
    with torch.no_grad():
        assert torch.equal(compiled(x).logits, before)


# ----------------------------------------------------------------------------- other machines


def test_a_package_built_elsewhere_is_rebuilt_once_with_a_note(shipped, tmp_path, monkeypatch, capsys):
    art = tmp_path / "art"
    shutil.copytree(shipped, art)
    (built_here,) = (art / "step").glob("*.pt2")
    monkeypatch.setattr(steps, "cpu_id", lambda: "Other CPU Model|0123456789abcdef")
    builds: list[Path] = []

    def fake_compile(cached, spec, path):  # stands in for the compile: the same code would come out
        builds.append(path)
        shutil.copyfile(built_here, path)

    monkeypatch.setattr(steps, "_aot_compile", fake_compile)
    compiled = load(art)
    out = compiled.generate(prompt(6), max_new_tokens=3, eos_token_id=[], return_dict_in_generate=True)
    assert out.runtime == "aot" and len(builds) == 1 and builds[0].parent == art / "step"
    printed = capsys.readouterr().out
    assert "building the decode step for this CPU and torch" in printed and "Other CPU Model" in printed
    notes = [n.message for n in compiled.report.notes]
    assert any(
        "rebuilding the decode step once for this machine" in m
        and f"this is torch {torch.__version__} on Other CPU" in m
        for m in notes
    )
    again = load(art)
    again.generate(prompt(6), max_new_tokens=3, eos_token_id=[])
    assert len(builds) == 1 and len(list((art / "step").glob("*.pt2"))) == 2  # kept beside the artifact

    # A read-only artifact: the rebuilt package goes to $QQQ_CACHE instead.
    monkeypatch.setattr(steps, "cpu_id", lambda: "A Third CPU|0")
    monkeypatch.setattr(steps, "_writable", lambda folder: not str(folder).startswith(str(art)))
    load(art).generate(prompt(6), max_new_tokens=3, eos_token_id=[])
    assert len(builds) == 2 and builds[1].parent == steps.default_package_dir()


def test_a_rebuild_from_a_newer_graph_replaces_the_superseded_package_and_keeps_the_others(
    shipped, tmp_path, monkeypatch
):
    art = tmp_path / "art"
    shutil.copytree(shipped, art)
    step_dir = art / "step"
    (old,) = step_dir.glob("*.pt2")
    record = json.loads(old.with_suffix(".json").read_text())
    assert record["cache_dtype"] == "float32" and record["max_len"] > 0
    # Beside it: the bf16 cache's step, and a package whose record predates the cache dtype.
    for name, info in {
        "b" * 24: {**record, "cache_dtype": "bfloat16"},
        "c" * 24: {k: v for k, v in record.items() if k != "cache_dtype"},
    }.items():
        shutil.copyfile(old, step_dir / f"{name}.pt2")
        (step_dir / f"{name}.json").write_text(json.dumps(info))
    # A newer qqq_compile: another key for the same step.
    monkeypatch.setattr(steps, "_PACKAGE_FORMAT", steps._PACKAGE_FORMAT + "+next")
    monkeypatch.setattr(steps, "_aot_compile", lambda cached, spec, path: shutil.copyfile(old, path))
    compiled = load(art)
    out = compiled.generate(prompt(6), max_new_tokens=3, eos_token_id=[], return_dict_in_generate=True)
    assert out.runtime == "aot"
    left = sorted(p.stem for p in step_dir.glob("*.pt2"))
    assert old.stem not in left and not old.with_suffix(".json").exists()
    assert "b" * 24 in left and "c" * 24 in left and len(left) == 3
    assert any("removed 1 superseded package" in n.message for n in compiled.report.notes)


def test_the_other_cache_dtypes_package_is_no_reason_given_for_a_rebuild(shipped, tmp_path, monkeypatch):
    art = tmp_path / "art"
    shutil.copytree(shipped, art)
    (only,) = (art / "step").glob("*.pt2")
    record = json.loads(only.with_suffix(".json").read_text())
    # The folder holds the bf16 cache's step only (same rows and positions, another key).
    bf16 = only.with_name("b" * 24 + ".pt2")
    only.rename(bf16)
    only.with_suffix(".json").unlink()
    bf16.with_suffix(".json").write_text(json.dumps({**record, "cache_dtype": "bfloat16"}))
    monkeypatch.setattr(steps, "_aot_compile", lambda cached, spec, path: shutil.copyfile(bf16, path))
    compiled = load(art)
    compiled.generate(prompt(6), max_new_tokens=3, eos_token_id=[])
    notes = [n.message for n in compiled.report.notes]
    assert any("compiled the AOT package" in m for m in notes)
    assert not any("rebuilding the decode step" in m for m in notes), notes  # not "another graph"
    assert bf16.is_file()  # not superseded either: another kind of step


def test_auto_falls_back_to_eager_with_a_warning(w4a8, monkeypatch, tmp_path):
    monkeypatch.setenv("QQQ_CACHE", str(tmp_path))  # no package of this graph anywhere

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(steps, "_aot_compile", broken)
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*no C\\+\\+ compiler here"):
            out = w4a8.generate(prompt(5), max_new_tokens=3, eos_token_id=[], return_dict_in_generate=True)
        assert out.runtime == "eager"
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            w4a8.prepare_generation(runtime="aot", progress=False)
    finally:
        w4a8._steps = []


def test_package_key_follows_code_size_inlined_values_torch_and_cpu_not_weights(w4a8, monkeypatch):
    gm, _, _ = steps.step_graph(w4a8.graph_module, 1, 64)
    key = steps.package_key(gm, 1, 64)
    assert steps.package_key(gm, 1, 128) != key
    weight = gm.get_buffer("qqq_lm_head_int8")
    with torch.no_grad():
        weight.add_(1)
        try:
            assert steps.package_key(gm, 1, 64) == key  # a weight is handed over at load, not compiled in
        finally:
            weight.sub_(1)
    inv_freq = gm.get_buffer("model.rotary_emb.inv_freq")  # 8 values: Inductor inlines them into the code
    assert inv_freq.shape == (8,)
    with torch.no_grad():
        inv_freq.mul_(2)
        try:
            assert steps.package_key(gm, 1, 64) != key
        finally:
            inv_freq.div_(2)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert steps.package_key(gm, 1, 64) != key
    monkeypatch.undo()
    monkeypatch.setattr(steps, "cpu_id", lambda: "another cpu")
    assert steps.package_key(gm, 1, 64) != key


def test_aot_step_runs_the_cpp_kernels_without_python_per_op(shipped, no_compile):
    from qqq_compile.targets.w4a8.kernels import cpp_call_counts

    step = load(shipped).prepare_generation(runtime="aot")
    before = cpp_call_counts()["w4a8_linear"]
    entered: list[str] = []

    def spy(frame, event, arg):
        if event == "call" and "qqq_compile" in frame.f_code.co_filename:
            entered.append(frame.f_code.co_name)

    sys.setprofile(spy)
    try:
        step.fn(torch.randint(0, 256, (1, 1)), torch.ones(1, 5, dtype=torch.long), torch.tensor([4]), torch.tensor(0))
    finally:
        sys.setprofile(None)
    # 2 layers x 4 calls (q/k/v fused, o, gate/up fused, down: fuse_linears), each one C++
    # kernel call, and no Python of ours in between (_Runner.__call__ is the only frame).
    assert cpp_call_counts()["w4a8_linear"] - before == 8
    assert entered == ["__call__"]


def test_unknown_runtime_is_refused(w4a8):
    with pytest.raises(ValueError, match="runtime='jit' is not known"):
        steps.build_step(w4a8.graph_module, max_batch=1, max_len=8, runtime="jit")


@pytest.mark.parametrize("which", ["eager", "aot"])
def test_cache_row_prefills_one_row_while_the_other_keeps_its_cache(w4a8, aot_step, which):
    """A request joining a running batch (the server's continuous batching): row 1 is
    prefilled alone (``cache_row=1``) at positions ending where row 0 is, then both rows
    decode in one call. Each row's logits equal those of the row run alone at the same
    positions (row 1 left-padded). Were ``cache_row`` ignored, the join would overwrite row
    0's cache and row 1 would decode from an empty row."""
    step = aot_step[0] if which == "aot" else steps.build_step(w4a8.graph_module, max_batch=2, max_len=32)
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, 256, (1, 12), generator=g), torch.randint(0, 256, (1, 5), generator=g)
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731
    pad = torch.zeros(1, 11, dtype=torch.long)
    pad[:, 6:] = 1  # row 1's prompt sits at positions 6..10

    def row0_alone():
        step(a[:, :10], ones(10), torch.arange(10))
        step(a[:, 10:11], ones(11), torch.tensor([10]))
        return step(a[:, 11:12], ones(12), torch.tensor([11]))

    want0 = row0_alone()
    ids1 = torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)
    want1_prefill = step(ids1, pad, torch.arange(11))  # row 1 alone, in cache row 0
    nxt = want1_prefill[:, -1].argmax(-1, keepdim=True)
    want1 = step(nxt, torch.cat([pad, ones(1)], 1), torch.tensor([11]))

    step(a[:, :10], ones(10), torch.arange(10))  # the running request, row 0
    step(a[:, 10:11], ones(11), torch.tensor([10]))
    got1_prefill = step(b, pad, torch.arange(6, 11), cache_row=1)  # joins in row 1
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :6] = 0
    both = step(torch.cat([a[:, 11:12], nxt]), mask, torch.tensor([11]))
    for got, want in ((got1_prefill, want1_prefill), (both[:1], want0), (both[1:], want1)):
        assert sqnr_db(want, got) > 100  # batch-of-2 vs one row: float rounding at most
    with pytest.raises(ValueError, match="outside the 2 rows"):
        step(b, pad, torch.arange(6, 11), cache_row=2)


def test_aot_step_of_a_rotated_model_whose_mlp_hadamard_is_a_kronecker_chain(cache):
    """The default preset rotates; an MLP width that is not a power of two (SmolLM2's 1536 =
    12·128; here 192 = 12·16) gets its online Hadamard as a chain of Kronecker factors. The
    decode step exports with a prompt length that may be 1, which a broadcasting ``Fᵀ·X``
    matmul guarded away ("length != 1": every AOT build of the default SmolLM2 failed)."""
    model = tiny_model("llama", intermediate_size=192)
    passes = [{"name": "rotate"}, {"name": "quantize_rtn"}, {"name": "lower"}]
    compiled = qc.compile(model, calib=tiny_calib(), passes=passes, progress=False)
    assert "width 192" in " ".join(n.message for n in compiled.report.notes)
    aot = steps.build_step(compiled.graph_module, max_batch=1, max_len=32, runtime="aot", progress=False)
    eager = steps.build_step(compiled.graph_module, max_batch=1, max_len=32, runtime="eager")
    ids = prompt(9, seed=2)
    for s in (aot, eager):
        s.out = [s(ids, torch.ones(1, 9, dtype=torch.long), torch.arange(9))]
        s.out.append(s(ids[:, :1], torch.ones(1, 10, dtype=torch.long), torch.tensor([9])))  # one token
    for a, e in zip(aot.out, eager.out, strict=True):
        assert sqnr_db(e, a) > 100  # float rounding only (Inductor's fusion order)
