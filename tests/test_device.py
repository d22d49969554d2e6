"""The compile's device reaches the passes, the calibration runner and generation.

No GPU here: tensors on ``meta`` (or fake CUDA tensors, which raise on a CPU/CUDA mix like
real ones) stand in for an accelerator. A tensor made on the host where the data lives
elsewhere fails these tests: meta and CPU tensors refuse to mix, and the tests assert
where each result lives.

What cannot run on ``meta`` (it reads values): ``gptq_quantize`` (the Cholesky retry loop
reads ``info`` and the mean diagonal, the column loop reads each column's group with
``tolist``), the W4A8 absmax scales of int8/per-channel formats (``PackedW4.from_int4``
checks the codes' range) and every ``pack`` (the packers check codes). Their tensors are
made with ``device=`` of their inputs (the AST test below holds every factory call to it).
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import qqq_compile
from qqq_compile.compiler.block_runner import BlockRunner, graph_device
from qqq_compile.compiler.calibration import calib_batches
from qqq_compile.compiler.capture import capture
from qqq_compile.compiler.gptq_solve import HessianAccumulator, _permuted
from qqq_compile.compiler.observers import ActObserver
from qqq_compile.config import QuantConfig
from qqq_compile.runtime.compiled import CompiledModel
from qqq_compile.runtime.generate import SamplingConfig, generate
from qqq_compile.runtime.kv_cache import add_kv_cache
from qqq_compile.targets.registry import ClipSearch, get_target
from tests.conftest import tiny_calib, tiny_model

META = torch.device("meta")
PKG = Path(qqq_compile.__file__).parent

# ----------------------------------------------------------------------------- factory calls

FACTORIES = {"zeros", "ones", "empty", "arange", "full", "tensor", "eye", "randn", "rand", "linspace"}
#: Files whose factory calls make host tensors on purpose, each with the reason.
ALLOWED = {
    "compiler/hadamard.py": "matrices built once on the host in float64; passes/rotate.py moves them to the weights",
    "data.py": "token ids from the tokenizer, on the host; the block runner moves each batch to the graph's device",
    "targets/w4a8/kernels/": "the CPU target's kernels (cpu.py) and host-side kernel helpers",
    "targets/w4a8/export/": "compressed-tensors / ONNX writers: they build host files",
    "targets/gguf/export.py": "the GGUF writer: it builds a host file",
    "artifact/replay.py": "the example input of a model rebuilt on the host from an artifact's config",
    "compiler/streaming/__init__.py": "the skeleton model's placeholder parameters (the store reads the weights)",
}
#: A call on a line holding this marker makes a host tensor on purpose (file I/O, hashing).
HOST_MARK = "# host:"


def _factory_calls(tree: ast.AST) -> list[ast.Call]:
    """``torch.<factory>(...)`` calls that name no ``device=`` and are not turned into
    Python values at once (``torch.linspace(...).tolist()``: a host list, no tensor)."""
    host_values: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("tolist", "item")
            and isinstance(node.func.value, ast.Call)
        ):
            host_values.add(id(node.func.value))
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        f = node.func
        if not (isinstance(f.value, ast.Name) and f.value.id == "torch" and f.attr in FACTORIES):
            continue
        if any(k.arg == "device" for k in node.keywords) or id(node) in host_values:
            continue
        out.append(node)
    return out


def test_factory_calls_make_tensors_on_their_datas_device():
    """Every ``torch.zeros/ones/empty/arange/full/tensor/eye/randn/rand/linspace`` call in
    the package passes ``device=`` (or is a ``*_like``, a different name), outside the
    allow-listed host-side files and lines marked ``# host:``; an allow-list entry that no
    longer makes host tensors fails too (drop it)."""
    bad, used = [], set()
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        lines = path.read_text().splitlines()
        for call in _factory_calls(ast.parse(path.read_text())):
            if any(HOST_MARK in lines[i - 1] for i in range(call.lineno, (call.end_lineno or call.lineno) + 1)):
                continue
            allowed = next((a for a in ALLOWED if rel == a or (a.endswith("/") and rel.startswith(a))), None)
            if allowed is not None:
                used.add(allowed)
                continue
            bad.append(f"{rel}:{call.lineno}: {ast.unparse(call)}")
    assert not bad, "factory calls without device= (use device=x.device, a *_like, or ctx.device):\n" + "\n".join(bad)
    assert used == set(ALLOWED), f"allow-list entries with no host factory call left: {set(ALLOWED) - used}"


def test_the_factory_scan_finds_what_it_must():
    """The scan itself: a bare call is found, ``device=`` and ``.tolist()`` are not."""
    src = "torch.zeros(3)\ntorch.ones(2, device=x.device)\ntorch.linspace(0, 1, 5).tolist()\ntorch.zeros_like(x)\n"
    assert [c.lineno for c in _factory_calls(ast.parse(src))] == [1]


# ----------------------------------------------------------------------------- Hessians, grids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("asym", [False, True])
def test_hessian_sums_live_on_the_first_batchs_device(dtype, asym):
    k = 48
    acc = HessianAccumulator(k, asym=asym, dtype=dtype, chunk_rows=64)
    assert acc.device is None  # nothing made before the data is seen
    for _ in range(3):  # 3 x 40 rows through 64-row chunks: flushes with and without the estimate
        x = torch.randn(40, k, device=META)
        acc.add(x, torch.randn(40, k, device=META) if asym else None)
    assert acc.device == META
    h, d = acc.result()
    assert h.device == META and h.shape == (k, k)
    assert (d is not None) == asym and (d is None or (d.device == META and d.shape == (k, k)))


def test_hessian_from_int8_codes_and_an_explicit_device():
    k = 32
    acc = HessianAccumulator(k, dtype="bfloat16", device=META)
    assert acc.device == META and acc.sums.device == META and acc.bufs[False].device == META
    acc.add(q=torch.empty(16, k, dtype=torch.int8, device=META), scale=torch.empty(16, 1, device=META))
    h, _ = acc.result()
    assert h.device == META


def test_hessian_on_the_host_is_unchanged_by_lazy_allocation():
    """Allocating at the first batch keeps the sums bit-identical to an fp32 reference."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 24, generator=g) for _ in range(3)]
    acc = HessianAccumulator(24, dtype="float32")
    for x in xs:
        acc.add(x)
    h, _ = acc.result()
    ref = torch.zeros(24, 24)
    for x in xs:
        ref.addmm_(x.t(), x)
    torch.testing.assert_close(h, ref * (2.0 / 150), rtol=0, atol=0)
    assert h.device == xs[0].device


def test_gptq_permutation_buffer_follows_the_hessian():
    h = torch.empty(40, 40, device=META)
    perm = torch.arange(40, device=META)
    assert _permuted(h, perm).device == META


def test_observer_statistics_follow_the_activations():
    obs = ActObserver(16, hessian=True)  # made on the host, fed on "the accelerator"
    obs(torch.randn(3, 5, 16, device=META))
    assert obs.absmax.device == META and obs.hessian.device == META and obs.n == 15


@pytest.mark.parametrize(
    "target,group_size,gs_dtype,clip",
    [
        ("w4a8", -1, "int8", ClipSearch(3, 0.7)),
        ("w4a8", 32, "int8", ClipSearch(3, 0.7)),
        ("w4a8", 32, "float16", None),
        ("w4a8", 32, "float16", ClipSearch(3, 0.7)),
        ("gguf", None, "int8", None),
        ("gguf", None, "int8", ClipSearch(3, 0.7)),
    ],
)
def test_grid_scales_live_on_the_weights_device(target, group_size, gs_dtype, clip):
    """(W4A8's absmax scales of int8/per-channel formats read values: see the module docstring.)"""
    t = get_target(target)
    quant = t.resolve(QuantConfig(target=target, group_size=group_size, group_scale_dtype=gs_dtype))
    w = torch.empty(64, 128, device=META)
    col_weight = None if clip is None else torch.empty(128, device=META)
    grid = t.grid(w, quant, quant.group_size, clip=clip, col_weight=col_weight)
    scales = {k: v for k, v in vars(grid).items() if isinstance(v, torch.Tensor)}
    assert scales and all(v.device == META for v in scales.values()), {k: v.device for k, v in scales.items()}
    assert grid.col_group().device == META
    q, deq = grid.quantize(w[:, 0], 0)
    assert q.device == META and deq.device == META
    q, deq = grid.quantize_all(w)
    assert q.device == META and deq.device == META


# ----------------------------------------------------------------------------- calibration runner


def _meta_graph() -> torch.fx.GraphModule:
    """A tiny LM captured on ``meta``, as a model on an accelerator is captured there (the
    graph's own factory nodes name that device)."""
    model = tiny_model("llama").to(META)
    return capture(model, torch.randint(0, 256, (2, 8), device=META)).graph_module


def test_block_runner_moves_host_batches_to_the_graphs_device():
    """Token ids tokenized on the host feed a graph whose weights live elsewhere: the
    runner moves each batch once, and every block then runs there."""
    gm = _meta_graph()
    assert graph_device(gm) == META
    batches = calib_batches(tiny_calib(2, 16), batch_size=1)
    assert batches[0]["input_ids"].device.type != "meta"
    runner = BlockRunner(gm, batches, progress=False)
    assert runner.device == META
    assert all(v.device == META for env in runner.envs for v in env.values())
    n = 0
    for st in runner.blocks():
        st.run(batches=[0])  # runs the block's nodes on meta (a host input would fail here)
        n += 1
    assert n == 2
    runner._advance(runner.part.suffix)


def test_block_runner_takes_an_explicit_device():
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    runner = BlockRunner(gm, calib_batches(tiny_calib(1, 8), batch_size=1), progress=False, device="meta")
    assert all(v.device == META for env in runner.envs for v in env.values())


def test_graph_device_of_a_graph_without_tensors_is_the_default():
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    assert graph_device(gm) == torch.get_default_device()


# ----------------------------------------------------------------------------- generation


def _lm_graph() -> torch.fx.GraphModule:
    return capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module


def test_compiled_model_device_is_its_graphs():
    gm = _lm_graph()
    cm = CompiledModel(gm, input_names=["input_ids"], output_kind="hf")
    assert cm.device == next(gm.parameters()).device
    gm.to(META)
    assert cm.device == META
    empty = CompiledModel(torch.fx.symbolic_trace(torch.nn.ReLU()), input_names=["input"], output_kind="tensor")
    assert empty.device == torch.get_default_device()


def test_kv_cache_and_its_slot_indices_live_with_the_weights():
    cached, _ = add_kv_cache(_meta_graph(), max_batch=2, max_len=16)
    caches = {n: b for n, b in cached.named_buffers() if "_cache_" in n}
    assert caches and all(b.device == META for b in caches.values())
    aranges = [n for n in cached.graph.nodes if n.target is torch.ops.aten.arange.default]
    assert aranges and all(n.kwargs.get("device") == META for n in aranges)


class _SpyStep:
    """Stands in for a DecodeStep on another device: records where its inputs live."""

    runtime = "spy"

    def __init__(self, device: torch.device, vocab: int = 11):
        self.device, self.vocab = device, vocab
        self.spec = SimpleNamespace(max_batch=4, max_len=64)
        self.seen: list[set[torch.device]] = []

    def __call__(self, ids, mask, positions, cache_row=0):
        self.seen.append({ids.device, mask.device, positions.device})
        return torch.zeros(ids.shape[0], ids.shape[1], self.vocab, device=ids.device)


@pytest.mark.parametrize("with_mask", [False, True])
def test_generate_makes_ids_masks_and_positions_on_the_steps_device(with_mask):
    step = _SpyStep(META)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])  # tokenized on the host
    mask = torch.ones_like(ids) if with_mask else None
    out = generate(step, ids, mask, SamplingConfig(max_new_tokens=4, pad_token_id=0))
    assert len(step.seen) == 4  # one prefill, three decode steps
    assert all(s == {META} for s in step.seen), step.seen
    assert out.sequences.device == META


def test_decode_step_device_and_cache_row_follow_the_graph_and_inputs():
    from qqq_compile.runtime.steps import build_step

    step = build_step(_lm_graph(), max_batch=1, max_len=16, runtime="eager", progress=False)
    assert step.device == next(step.graph_module.parameters()).device
    step.graph_module.to(META)
    assert step.device == META
    seen = []
    step.fn = lambda *a: seen.append([t.device for t in a])
    ids = torch.zeros(1, 2, dtype=torch.long, device=META)
    step(ids, torch.ones(1, 2, dtype=torch.long, device=META), torch.arange(2, device=META))
    assert seen == [[META] * 4]  # input_ids, attention_mask, cache_position, cache_row


def test_streaming_reads_weights_to_the_compile_device():
    """``compile_from_disk(device=...)`` reaches the store every streamed weight is read into."""
    from qqq_compile.compiler.streaming import StreamWeights

    assert StreamWeights({}, {}, device="meta").store.device == torch.device("meta")
    assert StreamWeights({}, {}).store.device == torch.get_default_device()
