"""The fast GPTQ path (issue 18): bf16 Hessians, the int8-kernel quantized forward, the
solve's memory bound, and what the batch-major block execution keeps alive."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from qqq_compile import CompileContext, QuantConfig
from qqq_compile.compiler import gptq_solve
from qqq_compile.compiler.block_runner import graph_env, run_nodes
from qqq_compile.compiler.gptq_forward import _Stashed as Stashed
from qqq_compile.compiler.gptq_solve import HessianAccumulator
from qqq_compile.compiler.passes import gptq as gptq_mod
from qqq_compile.compiler.passes.gptq import GPTQ, gptq_quantize
from qqq_compile.compiler.passes.lower import Lower as LowerW4A8
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.graph import info, linear_sites
from qqq_compile.targets.registry import QuantizedInput, get_target
from qqq_compile.targets.w4a8.formats import fake_quant_act
from qqq_compile.targets.w4a8.grid import ClipSearch, Grid
from qqq_compile.targets.w4a8.kernels.cpu import cpp_call_counts, ensure_cpp_kernels
from tests.compiler.passes.conftest import HIDDEN

W4A8 = get_target("w4a8")
quantize_input = W4A8.quantize_input


def _problem(seed: int, n: int, k: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations like a transformer's (correlated, uneven channel scales, a few outlier
    channels), the float model's version of them, and heavy-tailed weights."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 1.2 * torch.randn(k, k, generator=g) / k**0.5
    x = (torch.randn(n, k, generator=g) @ mix) * torch.linspace(0.2, 3, k)
    x[:, :4] *= 20
    x_float = x + 0.05 * x.abs().mean() * torch.randn(n, k, generator=g)
    chi = torch.randn(n_out, k, 4, generator=g).pow(2).mean(-1)
    return x, x_float, torch.randn(n_out, k, generator=g) / chi.sqrt()


def _accumulate(x, xf, dtype, chunk_rows=None):
    """H and D of the int8-quantized ``x`` (as codes and scales) against ``xf``."""
    acc = HessianAccumulator(x.shape[1], asym=True, dtype=dtype, chunk_rows=chunk_rows)
    for a, b in zip(x.split(1000), xf.split(1000), strict=True):  # batches not aligned to the chunks
        xq = quantize_input(a)
        acc.add(x_float=b, q=xq.q, scale=xq.scale)
    return acc.result()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def test_bf16_hessians_agree_with_fp32():
    """H = 2/n X̃ᵀX̃ and GPTAQ's D = 2/n (X - X̃)ᵀX̃ against float64 references."""
    k, n = 256, 8192
    x, xf, _ = _problem(0, n, k, 8)
    xq = quantize_input(x).dequantize()
    ref_h = 2 * xq.double().t() @ xq.double() / n
    ref_d = 2 * (xf.double() - xq.double()).t() @ xq.double() / n
    h32, d32 = _accumulate(x, xf, "float32")
    h16, d16 = _accumulate(x, xf, "bfloat16")
    assert _rel(h32, ref_h) < 1e-6 and _rel(d32, ref_d) < 1e-5  # measured 1.1e-7, 2.8e-7
    # Measured on torch's bf16 GEMM 3.2e-4 (H, two 4096-row chunks, the first in fp32; 1.3e-3
    # with every product rounded to bf16 whole) and 2.9e-3 (D: the small X - X̃ rounded to
    # bf16; no effect on the solve at this size, see below); with the C++ kernel (fp32 sums)
    # 2.6e-4 and 2.3e-3: what is left is the inputs' rounding to bf16.
    assert _rel(h16, ref_h) < 8e-4
    assert _rel(d16, ref_d) < 6e-3
    with pytest.raises(ValueError, match="asym=True"):
        HessianAccumulator(k, dtype="bfloat16").add(x, xf)
    # Plain GPTQ: H of raw float rows, the same bound.
    acc = HessianAccumulator(k, dtype="bfloat16", chunk_rows=1024)
    for a in x.split(1000):
        acc.add(a)
    h, d = acc.result()
    assert d is None and _rel(h, 2 * x.double().t() @ x.double() / n) < 8e-4


@pytest.mark.parametrize("staging", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batches_without_the_float_run_add_to_h_only(dtype, staging, monkeypatch):
    """GPTAQ on every other batch (what ``GPTQ(asym_tokens=...)`` does): H over every row, D over the rows
    given with their float input only (2/n_D), against float64 references; batches of
    1000 rows across 1024-row chunks, so chunks switch between the two kinds."""
    from qqq_compile.compiler import gptq_solve

    if staging == "torch":
        monkeypatch.setattr(gptq_solve, "_cpp_stage", lambda *a: None)
    k, n = 256, 8000
    x, xf, _ = _problem(3, n, k, 8)
    xq = quantize_input(x).dequantize().double()
    acc = HessianAccumulator(k, asym=True, dtype=dtype, chunk_rows=1024)
    with_d = []
    for i, (a, b) in enumerate(zip(x.split(1000), xf.split(1000), strict=True)):
        q = quantize_input(a)
        acc.add(x_float=b if i % 2 == 0 else None, q=q.q, scale=q.scale)
        with_d += [i % 2 == 0] * a.shape[0]
    h, d = acc.result()
    rows = torch.tensor(with_d)
    ref_h = 2 * xq.t() @ xq / n
    ref_d = 2 * (xf.double()[rows] - xq[rows]).t() @ xq[rows] / int(rows.sum())
    bound_h, bound_d = (1e-6, 1e-5) if dtype == "float32" else (8e-4, 6e-3)
    assert _rel(h, ref_h) < bound_h and _rel(d, ref_d) < bound_d
    # Not the D of every row (what a D that ignored the skipped batches' absence would give).
    ref_all = 2 * (xf.double() - xq).t() @ xq / n
    assert _rel(d, ref_all) > 10 * bound_d


def _record_flushes(monkeypatch) -> list[tuple[int, bool]]:
    """(rows, with_d) of every bf16 chunk the accumulators flush from now on."""
    seen: list[tuple[int, bool]] = []
    real = HessianAccumulator._flush

    def flush(self, with_d):
        if self.fills[with_d]:
            seen.append((self.fills[with_d], with_d))
        real(self, with_d)

    monkeypatch.setattr(HessianAccumulator, "_flush", flush)
    return seen


def test_alternating_batches_fill_whole_chunks(monkeypatch):
    """GPTAQ on every other batch: rows with and without their float input fill separate
    buffers, so no chunk is flushed part-filled when the kind switches (the one buffer
    before flushed at every switch: about half of SmolLM2's chunks were part-filled)."""
    k, rows = 64, 512
    seen = _record_flushes(monkeypatch)
    acc = HessianAccumulator(k, asym=True, chunk_rows=rows)
    g = torch.Generator().manual_seed(0)
    for i in range(12):  # batches of 300 rows: not aligned to the chunks
        x = torch.randn(300, k, generator=g)
        acc.add(x, x + 0.1 if i % 2 == 0 else None)
    acc.result()
    assert sum(f[0] for f in seen) == 12 * 300 and {f[1] for f in seen} == {False, True}
    # Every chunk is full except the last one of each kind (flushed by result()).
    assert [f[0] for f in seen[:-2]] == [rows] * (len(seen) - 2), seen


def test_later_chunks_grow_to_the_rows_seen_and_keep_the_precision(monkeypatch):
    """Wide K: the first chunk of each sum keeps its 16 MiB size, each later chunk takes as
    many rows as the sums have seen (up to the buffer), so there are fewer flushes (each
    flush makes a few passes over the K x K sums: K = 11008, 8000 rows, 18.6 -> 12.2 s), and
    H and D stay as close to float64 as with fixed chunks (measured at K = 3072 / 4864:
    H 7.8e-4 -> 8.0e-4, 1.10e-3 -> 1.14e-3). Scaled down here: first chunks of 256 rows
    (measured: H 3.26e-4 -> 3.38e-4, D 2.92e-3 -> 3.08e-3). Torch's bf16 GEMM only: the
    C++ kernel has no expectation to measure against and takes whole buffers."""
    k, n = 256, 8000

    def torch_gemm_with(first: int, chunk_min: int) -> None:
        monkeypatch.setattr(gptq_solve, "_cpp_gemm", lambda *a: None)
        monkeypatch.setattr(gptq_solve, "FIRST_CHUNK", first)
        monkeypatch.setattr(gptq_solve, "CHUNK_MIN", chunk_min)

    torch_gemm_with(256 * 2 * k, 1024)
    x, xf, _ = _problem(5, n, k, 8)
    xq = quantize_input(x).dequantize().double()
    ref_h = 2 * xq.t() @ xq / n
    ref_d = 2 * (xf.double() - xq).t() @ xq / n
    errs = {}
    for name, rows in (("fixed", 256), ("growing", None)):
        seen = _record_flushes(monkeypatch)
        h, d = _accumulate(x, xf, "bfloat16", chunk_rows=rows)
        monkeypatch.undo()  # the recording hook and the constants: re-set for the next run
        torch_gemm_with(256 * 2 * k, 1024)
        errs[name] = (_rel(h, ref_h), _rel(d, ref_d), [r for r, _ in seen])
    fixed, growing = errs["fixed"], errs["growing"]
    assert fixed[2] == [256] * 31 + [64]
    assert growing[2] == [256, 256, 512] + [1024] * 6 + [832], growing[2]
    assert growing[0] < 1.1 * fixed[0] and growing[1] < 1.1 * fixed[1], errs
    assert growing[0] < 8e-4 and growing[1] < 6e-3
    # Narrower sums keep fixed chunks (their first size): SmolLM2's and Qwen2.5-0.5B's
    # attention and MLP inputs (K = 576-1536 with GPTAQ, 896 without) compute what they did.
    monkeypatch.undo()
    torch_gemm_with(gptq_solve.FIRST_CHUNK, gptq_solve.CHUNK_MIN)
    for kk, asym, rows in ((576, True, 4096), (1536, True, 2730), (896, False, 4096), (4864, True, 2048)):
        acc = HessianAccumulator(kk, asym=asym, device="cpu")
        assert acc.bufs[asym].shape[0] == rows and acc._capacity(asym) == min(rows, acc._first_rows)
        acc.rows_flushed = acc.rows_flushed_d = 10**6
        assert acc._capacity(asym) == rows


@pytest.mark.parametrize(("k", "asym"), [(576, True), (896, False), (1536, True)])
def test_bf16_sums_run_the_cpp_gemm_where_the_cpu_has_bf16(k, asym, monkeypatch):
    """On CPUs with AVX512-BF16 the chunks' sums are ``qqq_cpu::hessian_gemm``'s (bf16 products,
    fp32 sums): H within 2e-5 of float64 on the same bf16-rounded rows (measured 1.4e-6 /
    1.4e-6 / 1.3e-6 at K = 576 / 896 / 1536; torch's bf16 GEMM 2.5e-4 / 3.1e-4 / 4.8e-4, so the
    floor fails if it ran), in whole buffers, and D as close as before or closer (2.3e-3
    against torch's 2.7-2.9e-3: what is left is ΔX's rounding to bf16)."""
    from qqq_compile.targets.w4a8.kernels import cpu

    if not (cpu.cpu_supports_kernels() and cpu.cpu_has_bf16() and ensure_cpp_kernels()):
        pytest.skip("this CPU lacks AVX512-BF16: torch's bf16 GEMM is the only one")
    n = 7000
    x, xf, _ = _problem(k + 1, n, k, 8)
    seen = _record_flushes(monkeypatch)
    before = cpu.cpp_path_counts()["hessian_gemm"]
    acc = HessianAccumulator(k, asym=asym)
    for a, b in zip(x.split(1000), xf.split(1000), strict=True):
        acc.add(a, b if asym else None)
    h, d = acc.result()
    assert cpu.cpp_path_counts()["hessian_gemm"] == before + len(seen)
    rows = HessianAccumulator(k, asym=asym, device="cpu").bufs[asym].shape[0]
    assert [r for r, _ in seen] == [rows] * (n // rows) + ([n % rows] if n % rows else [])
    xb = x.bfloat16().double()
    assert torch.equal(h, h.t())
    assert _rel(h, 2 * xb.t() @ xb / n) < 2e-5
    if asym:
        assert _rel(d, 2 * (xf.double() - x.double()).t() @ x.double() / n) < 6e-3


@pytest.mark.parametrize("k", [576, 896, 1536])
def test_bf16_hessians_at_model_widths(k):
    """H from upper column slabs mirrored at the end (two slabs up to K = 1024, then 512
    columns; K = 576 took one full slab before) and D in full, against float64."""
    n = 6000
    x, xf, _ = _problem(k, n, k, 8)
    acc = HessianAccumulator(k, asym=True)
    for i, (a, b) in enumerate(zip(x.split(1000), xf.split(1000), strict=True)):
        acc.add(a, b if i % 2 == 0 else None)
    h, d = acc.result()
    xd = x.double()
    rows = torch.arange(n) // 1000 % 2 == 0
    ref_h = 2 * xd.t() @ xd / n
    ref_d = 2 * (xf.double()[rows] - xd[rows]).t() @ xd[rows] / int(rows.sum())
    assert torch.equal(h, h.t())
    # Measured at K = 576 / 896 / 1536: H 5.4e-4 / 6.8e-4 / 8.7e-4, D 2.4e-3 (with one buffer
    # flushed part-filled at each switch, and one slab at K = 576: H 5.7e-4 / 7.0e-4 /
    # 9.0e-4, D 3.0e-3).
    assert _rel(h, ref_h) < 1.2e-3 and _rel(d, ref_d) < 4e-3


@pytest.mark.parametrize("stashed", [False, True], ids=["xf_fp32", "xf_bf16"])
@pytest.mark.parametrize("k", [100, 576])
def test_cpp_staging_gives_the_same_sums_as_torch(k, stashed, monkeypatch):
    """The bf16 chunks staged by ``qqq_cpu::hessian_stage`` (one pass from the int8 codes)
    give H and D bit-equal to torch's five-op staging; the path counter proves it ran. Also
    for float inputs and GPTAQ's bf16-stashed float run."""
    from qqq_compile.compiler import gptq_solve
    from qqq_compile.targets.w4a8.kernels import cpu

    if not (cpu.cpu_supports_kernels() and ensure_cpp_kernels()):
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI: torch's staging is the only one")
    x, xf, _ = _problem(seed=k, n=3000, k=k, n_out=8)
    if stashed:
        xf = xf.to(torch.bfloat16)
    before = cpu.cpp_path_counts()["hessian_stage"]
    fast = _accumulate(x, xf, "bfloat16", chunk_rows=1024)
    acc = HessianAccumulator(k, asym=True, chunk_rows=1024)
    acc.add(x, xf)  # float inputs
    fast_float = acc.result()
    assert cpu.cpp_path_counts()["hessian_stage"] > before
    monkeypatch.setattr(gptq_solve, "_cpp_stage", lambda *a: None)  # torch's ops
    slow = _accumulate(x, xf, "bfloat16", chunk_rows=1024)
    acc = HessianAccumulator(k, asym=True, chunk_rows=1024)
    acc.add(x, xf)
    slow_float = acc.result()
    for a, b in zip((*fast, *fast_float), (*slow, *slow_float), strict=True):
        assert torch.equal(a, b)


def test_bf16_hessians_solve_as_well_as_fp32():
    """GPTQ + clip search + GPTAQ from bf16 Hessians: the layer's output error against the
    float model's output matches the fp32 path's. The weights themselves differ (GPTQ is
    chaotic: 4-9% of the codes change under perturbations this small), the error does not."""
    ratios = []
    for seed in range(3):
        x, xf, w = _problem(seed, 4096, 192, 64)
        xq = quantize_input(x).dequantize()
        err = {}
        for dtype in ("float32", "bfloat16"):
            h, d = _accumulate(x, xf, dtype)
            grid = Grid(w, -1, "int8", clip=ClipSearch(), col_weight=torch.diag(h))
            res = gptq_quantize(w, h, grid, dxx=d)
            err[dtype] = ((xf @ w.t() - xq @ res.deq.t()) ** 2).sum().item()
        ratios.append(err["bfloat16"] / err["float32"])
    # Measured at K=192, 4096 rows, 6 seeds: 0.9992-1.0057 (mean 1.0012); a random fp32
    # perturbation of H of 3e-4 relative: 0.9994-1.0019 (mean 1.0006); bf16 D alone: 1.0000.
    # (Before the chunk products were taken against their expected share: mean 1.0045.)
    assert all(0.985 < r < 1.015 for r in ratios), ratios
    assert abs(statistics.mean(ratios) - 1) < 0.005, ratios


def _peak_alloc_bytes(fn) -> tuple[int, object]:
    """Peak of CPU bytes allocated (minus freed) while ``fn`` runs, from the profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()

    def walk(nodes):
        for e in nodes:
            yield e
            yield from walk(e.children)

    events = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree()) if e.tag == _EventType.Allocation]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_time_ns):
        cur += e.extra_fields.alloc_size
        peak = max(peak, cur)
    return peak, out


def test_gptq_solve_transient_is_three_hessians():
    """gptq_quantize (with GPTAQ's term) allocates at most 3 K x K float32 buffers beyond
    its inputs, plus weight-sized ones (the permuted weight, codes, decoded values, lazy
    updates). The code before issue 18 held about seven K x K copies."""
    k, n = 2048, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * k, k, generator=g) * torch.linspace(0.5, 2, k)
    h = 2 * x.t() @ x / x.shape[0]
    dxx = 0.01 * h + 1e-3 * torch.randn(k, k, generator=g)
    del x
    w = torch.randn(n, k, generator=g)
    grid = Grid(w, -1, "int8")
    peak, res = _peak_alloc_bytes(lambda: gptq_quantize(w, h, grid, dxx=dxx))
    assert res.retries == 0
    hessian, weight = k * k * 4, n * k * 4
    # Measured: 3.02 K² floats (U, the permuted D and D Uᵀ, plus a weight-sized update).
    assert peak <= 3 * hessian + 12 * weight, (peak / hessian, peak)


def _spd(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * k, k, generator=g) * torch.linspace(0.2, 3, k)
    return x.t() @ x / x.shape[0]


@pytest.mark.parametrize("k", [200, 896, 1300])
def test_inverse_factor_against_float64(k):
    """U (upper, ``Uᵀ U = (H_perm + λI)^-1``), built as ``J L⁻¹ J`` by column tiles, against
    float64's Cholesky of the inverse, with a dead input and act-order's permutation; K = 200
    is one tile, 1300 ends in a ragged tile."""
    h = _spd(k, k)
    h[7], h[:, 7] = 0.0, 0.0  # a dead input: H_ii = 1 in the solve
    dead = torch.diagonal(h) == 0
    perm = torch.argsort(torch.diagonal(h).masked_fill(dead, 1.0), descending=True, stable=True)
    u, damp, retries = gptq_solve._upper_inverse_cholesky(h, perm, dead[perm], 0.01, 4)
    a = h.double()[perm][:, perm]
    a.diagonal()[dead[perm]] = 1.0
    a.diagonal().add_(0.01 * a.diagonal().mean())
    ref = torch.linalg.cholesky(torch.linalg.inv(a), upper=True)
    assert (damp, retries) == (0.01, 0)
    assert torch.equal(u.tril(-1), torch.zeros_like(u))
    assert ((u.double() - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.parametrize("k", [200, 896, 1300])
def test_gptaq_p_against_float64(k):
    """GPTAQ's ``P = triu₁(D Uᵀ) U`` from the tiles on and above the diagonal equals the two
    full float64 products, and is exactly zero on and below the diagonal."""
    g = torch.Generator().manual_seed(k)
    u = torch.linalg.cholesky(torch.linalg.inv(_spd(k, k).double()), upper=True).float()
    d = torch.randn(k, k, generator=g)
    ref = (d.double() @ u.double().t()).triu_(diagonal=1) @ u.double()
    p = gptq_solve._gptaq_p(d.clone(), u)
    assert torch.equal(p.tril(), torch.zeros_like(p))
    assert ((p.double() - ref).norm() / ref.norm()).item() < 1e-6


# ----------------------------------------------------------------------------- the forward


@pytest.mark.parametrize("gs", [-1, 32])
def test_quantized_forward_is_the_lowered_model(captured, batches, gs):
    """The linears GPTQ runs after solving them compute exactly what the lowered model
    computes: the graph run node by node with ``W4A8.calib_linear`` for every packed
    linear gives the lowered graph's logits bit for bit; the fake-quant float product
    GPTQ used before does not (it differs by float rounding)."""
    assert ensure_cpp_kernels()
    gm = copy.deepcopy(captured)
    QuantizeRTN()(gm, CompileContext(quant=QuantConfig(group_size=gs)))
    sites = [s for s in linear_sites(gm) if info(s.node).packed is not None]
    overrides = {s.node: W4A8.calib_linear(s, info(s.node).packed) for s in sites}
    batch = batches[0]
    before = cpp_call_counts()["w4a8_linear"]
    with torch.no_grad():
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        env = run_nodes(gm, nodes, graph_env(gm, batch), overrides)
    assert cpp_call_counts()["w4a8_linear"] - before == len(sites) == 14
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    logits = env[out_node.args[0][0]]
    lowered = copy.deepcopy(gm)
    LowerW4A8()(lowered, CompileContext(quant=QuantConfig(group_size=gs)))
    with torch.no_grad():
        ref = lowered(**batch)[0]
    assert torch.equal(logits, ref)
    # An input held as int8 codes and scales goes through the same kernel, same result.
    site = sites[0]
    x = torch.randn(3, 7, HIDDEN)
    w = info(site.node).packed
    run = overrides[site.node]
    args = [x if a is site.x else None for a in site.node.args]
    y = run(*args)
    args = [quantize_input(x) if a is site.x else None for a in site.node.args]
    assert isinstance(args[0], QuantizedInput) and torch.equal(run(*args), y)
    fake = fake_quant_act(x) @ w.dequantize().t()
    torch.testing.assert_close(y, fake, rtol=1e-5, atol=1e-5)
    # Measured: max |difference| 2.4e-7 here; the fake-quant path is not the one above.
    assert not torch.equal(y, fake)


@pytest.mark.parametrize("budget", [None, 0])
def test_block_execution_keeps_one_batch_of_intermediates(captured, batches, monkeypatch, budget):
    """Batch-major segments: when GPTQ solves an input's linears, the quantized and float
    runs hold only values a later node still reads (the residual stream, rotary tables, the
    mask) and that input, which the quantized run holds as int8 codes (only the linears read
    it): no batch's intermediates survive the segment that made them. Over the float run's
    memory budget (``budget=0``) its values wait in bf16; the quantized run stays fp32."""
    if budget is not None:
        monkeypatch.setattr(gptq_mod, "FLOAT_RUN_BUDGET", budget)
    seen = {}
    real_solve, real_run = GPTQ._solve, GPTQ._run_block

    def record(self, gm, ctx, group, h, dxx, *fmt):
        seen[group[0].name] = [
            {n: v for env in envs if env is not None for n, v in env.items()} for envs in self._test_envs
        ]
        return real_solve(self, gm, ctx, group, h, dxx, *fmt)

    def run_block(self, c, nodes, envs, *args, **kw):
        self._test_envs = (envs, c.fenvs)
        return real_run(self, c, nodes, envs, *args, **kw)

    monkeypatch.setattr(GPTQ, "_solve", record)
    monkeypatch.setattr(GPTQ, "_run_block", run_block)
    gm = copy.deepcopy(captured)
    GPTQ(asym=True).call(gm, CompileContext(calib=batches, quant=QuantConfig(), progress=False))
    monkeypatch.undo()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = {s.name: s for s in linear_sites(gm)}
    assert len(seen) == 8
    for name, (held, fheld) in seen.items():
        site = sites[name]
        assert isinstance(held[site.x], QuantizedInput), name
        assert fheld[site.x].dtype == torch.bfloat16, name  # read only by the float run's bf16 linears
        for env in (held, fheld):
            for n in env:
                live = max(order[u] for u in n.users) >= order[site.node]
                assert live, (name, n.name)  # nothing dead is held
        # Tensors: the rotary tables and the mask, the residual stream, x (and sizes).
        tensors = [n.name for n, v in held.items() if not isinstance(v, int)]
        assert len(tensors) <= 5, (name, tensors)
        assert all(v.dtype == torch.float32 for v in held.values() if torch.is_tensor(v) and v.is_floating_point())
        own = [v for n, v in fheld.items() if isinstance(v, torch.Tensor | Stashed) and v is not held.get(n)]
        stashed = [v for v in own if isinstance(v, Stashed)]
        if budget == 0 and ".layers.0." not in name:  # block 0 starts from shared values: 0 bytes
            assert stashed and all(v.value.dtype == torch.bfloat16 for v in stashed), name
        elif budget is None:
            assert not stashed


def test_bf16_float_run_changes_gptaq_term_by_little(captured, batches, monkeypatch):
    """GPTAQ's float run with bf16 linears: block 0's o_proj sees the same quantized input
    either way (q/k/v solved from identical statistics), so its D differs only by the
    float run's rounding."""
    d = {}
    real = GPTQ._solve
    for dtype in ("float32", "bfloat16"):

        def record(self, gm, ctx, group, h, dxx, *fmt, dtype=dtype):
            d.setdefault(dtype, {})[group[0].name] = (h.clone(), dxx.clone())
            return real(self, gm, ctx, group, h, dxx, *fmt)

        monkeypatch.setattr(GPTQ, "_solve", record)
        GPTQ(asym=True, hessian_dtype="float32", asym_dtype=dtype).call(
            copy.deepcopy(captured), CompileContext(calib=batches, quant=QuantConfig(), progress=False)
        )
        monkeypatch.undo()
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    assert torch.equal(d["float32"][q][1], d["bfloat16"][q][1])  # the embeddings: no float linear before
    assert torch.equal(d["float32"][o][0], d["bfloat16"][o][0])  # the same X̃
    ref, got = d["float32"][o][1].double(), d["bfloat16"][o][1].double()
    rel = ((got - ref).norm() / ref.norm()).item()
    # Measured 0.028 on this random-weight model (512 tokens).
    assert 0 < rel < 0.05, rel


def test_gated_mlp_runs_as_one_silu_and_one_in_place_mul(captured, batches):
    """Each ``(g * sigmoid(g)) * u`` of the captured decoder (one per layer) is overridden as a
    whole: ``sigmoid`` and the first ``mul`` pass ``g`` through and the second computes
    ``silu(g).mul_(u)``. The block's outputs equal the graph's own ops up to float rounding,
    and the profiler sees no sigmoid and one silu per layer; a sigmoid that something else
    also reads is left alone."""
    from qqq_compile.compiler.gptq_forward import silu_mul_overrides

    gm = captured
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    ops = silu_mul_overrides(nodes)
    sigmoids = [n for n in nodes if n.target is torch.ops.aten.sigmoid.default]
    assert len(sigmoids) == 2 and len(ops) == 3 * len(sigmoids)  # two layers: sigmoid, mul, mul each
    env0 = graph_env(gm, batches[0])
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    with torch.no_grad():
        want = run_nodes(gm, nodes, dict(env0))[out_node.args[0][0]]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = run_nodes(gm, nodes, dict(env0), ops)[out_node.args[0][0]]
    names = [e.name for e in prof.events()]
    assert names.count("aten::silu") == 2 and "aten::sigmoid" not in names
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = copy.deepcopy(gm)
    s = next(n for n in g.graph.nodes if n.target is torch.ops.aten.sigmoid.default)
    with g.graph.inserting_after(s):
        g.graph.call_function(torch.ops.aten.neg.default, (s,))  # a second reader of the sigmoid
    left = silu_mul_overrides(list(g.graph.nodes))
    assert s not in left and len(left) == 3


@pytest.mark.parametrize(("asym_tokens", "float_batches"), [(None, 6), (384, 3), (192, 2), (10**6, 6)])
def test_the_float_run_covers_the_batches_asym_tokens_needs(captured, monkeypatch, asym_tokens, float_batches):
    """``GPTQ(asym=True, asym_tokens=t)`` on 6 batches of 128 tokens (768): the float run's
    linears run on every n-th batch, n = 768 // t (at least 1; None: every batch), every
    Hessian counts every batch's rows, and D those of the float run's batches."""
    from qqq_compile.compiler.calibration import calib_batches
    from tests.conftest import tiny_calib

    batches = calib_batches(tiny_calib(12, 64), batch_size=2)  # 6 batches of 2 x 64 tokens
    calls, counts = [], []
    real_override, real_result = gptq_mod.bf16_override, HessianAccumulator.result

    def counting(gm, site):
        run = real_override(gm, site)

        def wrapped(*args, **kwargs):
            calls.append(site.name)
            return run(*args, **kwargs)

        return wrapped

    def result(self):
        counts.append((self.n, self.n_d))
        return real_result(self)

    monkeypatch.setattr(gptq_mod, "bf16_override", counting)
    monkeypatch.setattr(HessianAccumulator, "result", result)
    GPTQ(asym=True, asym_tokens=asym_tokens).call(
        copy.deepcopy(captured), CompileContext(calib=batches, quant=QuantConfig(), progress=False)
    )
    assert len(batches) == 6
    per_linear = {name: calls.count(name) for name in set(calls)}
    assert len(per_linear) == 14 and set(per_linear.values()) == {float_batches}
    assert len(counts) == 8 and set(counts) == {(6 * 2 * 64, float_batches * 2 * 64)}
    with pytest.raises(ValueError, match="asym_tokens"):
        GPTQ(asym=True, asym_tokens=0)


# ------------------------------------------------------------------------ the column loop


def _grids(w: torch.Tensor, h: torch.Tensor) -> dict[str, object]:
    from qqq_compile.targets.gguf.grid import Q4_0Grid

    clip, cw = ClipSearch(), torch.diag(h)
    return {
        "channel": Grid(w, -1, "int8", clip=clip, col_weight=cw),
        "g128_int8": Grid(w, 128, "int8", clip=clip, col_weight=cw),
        "g128_fp16": Grid(w, 128, "float16", clip=clip, col_weight=cw),
        "q4_0": Q4_0Grid(w, clip=clip, col_weight=cw),
    }


@pytest.mark.parametrize("grid_name", ["channel", "g128_int8", "g128_fp16", "q4_0"])
def test_value_table_rounds_like_quantize(grid_name):
    """Each grid's value table, searched for the nearest entry, gives the decoded values and
    codes of its own ``quantize`` (rounding by division for all but fp16 group scales), on
    weights after GPTQ-like updates (values between and beyond the grid points)."""
    x, _, w = _problem(seed=3, n=2048, k=896, n_out=48)
    grid = _grids(w, 2 * x.t() @ x / x.shape[0])[grid_name]
    table, qmin = grid.value_table()
    g = torch.Generator().manual_seed(1)
    cols = w * (1 + 0.3 * torch.randn(w.shape, generator=g))
    groups = grid.col_group().tolist()
    for j in range(0, w.shape[1], 7):
        q, dq = grid.quantize(cols[:, j], groups[j])
        t = table[groups[j]]
        idx = (cols[:, j, None] - t).abs().argmin(dim=1)
        assert torch.equal(t.gather(1, idx[:, None])[:, 0], dq), j
        assert torch.equal((idx + qmin).float(), q), j


@pytest.mark.parametrize("asym", [False, True], ids=["gptq", "gptaq"])
@pytest.mark.parametrize("grid_name", ["channel", "g128_int8", "g128_fp16", "q4_0"])
def test_cpp_column_loop_matches_the_torch_loop(grid_name, asym, monkeypatch):
    """GPTQ's column loop in C++ (``qqq_cpu::gptq_block``, rows in parallel) against the
    torch loop on the same problem at a real width (K = 896, Qwen2.5-0.5B's residual), both
    on one thread: the same codes and decoded values, the same loss. The path counter proves
    the C++ loop ran, once per block."""
    from qqq_compile.compiler import gptq_solve
    from qqq_compile.targets.w4a8.kernels import cpu

    if not (cpu.cpu_supports_kernels() and ensure_cpp_kernels()):
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI: the torch loop is the only one")
    x, xf, w = _problem(seed=5, n=4096, k=896, n_out=160)
    h = 2 * x.t() @ x / x.shape[0]
    d = 2 * (xf - x).t() @ x / x.shape[0] if asym else None
    grid = _grids(w, h)[grid_name]
    before = cpu.cpp_path_counts()["gptq_block"]
    with gptq_solve.single_thread():  # the torch loop's thread count: the same lazy-update GEMMs
        fast = gptq_quantize(w, h, grid, dxx=d)
    assert cpu.cpp_path_counts()["gptq_block"] - before == 7  # one call per block of 128 columns
    monkeypatch.setattr(gptq_solve, "_cpp_column_loop", lambda w, grid: None)
    slow = gptq_quantize(w, h, grid, dxx=d)
    assert cpu.cpp_path_counts()["gptq_block"] - before == 7
    # Measured: every code equal on all eight cases, row losses within 2.5e-4 absolute (of
    # ~10-100: the update products round in another order). With two threads for the fast
    # path only, 0.25% of the codes differed: the lazy-update GEMMs round differently.
    assert torch.equal(fast.q4, slow.q4) and torch.equal(fast.deq, slow.deq)
    assert torch.allclose(fast.row_loss, slow.row_loss, rtol=1e-5, atol=0), (fast.row_loss - slow.row_loss).abs().max()


def test_cpp_column_loop_rejects_mismatched_shapes():
    """The op names what is wrong instead of reading out of bounds."""
    from qqq_compile.targets.w4a8.kernels import cpu

    if not (cpu.cpu_supports_kernels() and ensure_cpp_kernels()):
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI")
    n, b = 8, 16
    out = [torch.empty(n, b) for _ in range(3)]
    ok = dict(hinv=torch.eye(b), table=torch.zeros(1, n, 16), groups=torch.zeros(b, dtype=torch.long))
    op = torch.ops.qqq_cpu.gptq_block
    with pytest.raises(RuntimeError, match="hinv must be float32"):
        op(torch.zeros(n, b), torch.eye(b + 1), None, ok["table"], ok["groups"], -8, *out)
    with pytest.raises(RuntimeError, match="table must be"):
        op(torch.zeros(n, b), ok["hinv"], None, torch.zeros(1, n + 1, 16), ok["groups"], -8, *out)
    with pytest.raises(RuntimeError, match="out of range"):
        op(torch.zeros(n, b), ok["hinv"], None, ok["table"], torch.ones(b, dtype=torch.long), -8, *out)


def test_the_pass_solves_on_the_cpp_loop_with_torchs_threads(captured, batches, monkeypatch):
    """The GPTQ pass reaches the C++ column loop (one call per block of columns of each of the
    tiny model's 8 solves), with torch's own thread count (the whole solve used to run on one
    thread)."""
    from qqq_compile.compiler import gptq_solve
    from qqq_compile.targets.w4a8.kernels import cpu

    if not (cpu.cpu_supports_kernels() and ensure_cpp_kernels()):
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI: the torch loop is the only one")
    threads, seen = torch.get_num_threads(), []
    if threads < 2:
        pytest.skip("one torch thread: nothing tells the solve's threads from a single-threaded one")
    real = gptq_solve._cpp_column_loop

    def noting(w, grid):
        seen.append(torch.get_num_threads())
        return real(w, grid)

    monkeypatch.setattr(gptq_solve, "_cpp_column_loop", noting)
    before = cpu.cpp_path_counts()["gptq_block"]
    GPTQ().call(copy.deepcopy(captured), CompileContext(calib=batches, quant=QuantConfig(), progress=False))
    # 8 solves (q/k/v, o, gate/up, down per layer, 2 layers): K = 96 (one block) or 192 (two).
    assert len(seen) == 8 and set(seen) == {threads}
    assert cpu.cpp_path_counts()["gptq_block"] - before == 6 * 1 + 2 * 2


def _need_cpp_bf16() -> None:
    from qqq_compile.targets.w4a8.kernels import cpu

    if not (cpu.cpu_supports_kernels() and cpu.cpu_has_bf16() and ensure_cpp_kernels()):
        pytest.skip("this CPU lacks AVX512-BF16: D is summed whole by torch's bf16 GEMM")


def _accumulated(x, xf, order):
    acc = HessianAccumulator(x.shape[1], asym=True, solve_order=order)
    for a, b in zip(x.split(1000), xf.split(1000), strict=True):
        xq = quantize_input(a)
        acc.add(x_float=b, q=xq.q, scale=xq.scale)
    return (*acc.result(), acc)


@pytest.mark.parametrize(("k", "act_order"), [(576, True), (1536, True), (1536, False)])
def test_gptaq_d_in_the_solve_order_solves_bit_for_bit(k, act_order, monkeypatch):
    """Given the solve's column order (the GPTQ pass gives it), the accumulator adds H as the
    chunks come and keeps them; ``result()`` then sums D in that order over H's slab region
    only, all that GPTAQ's solve reads (0.55 of D's work at K = 4864; Qwen2.5-0.5B's down_proj
    over 16 k rows: 3.02 -> 2.40 s). H, and the solve's codes, values and losses, are bit for
    bit those from D summed whole, a dead input included."""
    _need_cpp_bf16()
    monkeypatch.setattr(gptq_solve, "DEFER_BUDGET", 100)  # keep every chunk at these small K
    x, xf, w = _problem(k + 2, 7000, k, 64)
    x[:, 7] = xf[:, 7] = 0.0
    results = {}
    for order in (None, "act" if act_order else "natural"):
        h, d, acc = _accumulated(x, xf, order)
        assert isinstance(d, gptq_solve.PermutedD) == (order is not None) and not acc.kept
        results[order] = h, gptq_quantize(w, h, Grid(w, -1, "float16"), dxx=d, act_order=act_order)
    (h0, r0), (h1, r1) = results.values()
    assert r0.dead == r1.dead == 1
    assert torch.equal(h0, h1)
    assert torch.equal(r0.q4, r1.q4) and torch.equal(r0.deq, r1.deq) and torch.equal(r0.row_loss, r1.row_loss)


def test_d_past_its_budget_is_summed_whole_as_before():
    """Kept chunks past ``DEFER_BUDGET`` x the sums' bytes (K = 1536: two chunks of 2,730 rows
    fit, the third does not) have their D added in full at once, and D comes back whole, bit
    for bit as without a solve order; the deferred chunks are released, not pooled."""
    _need_cpp_bf16()
    x, xf, _ = _problem(3, 7000, 1536, 8)
    h0, d0, _ = _accumulated(x, xf, None)
    h1, d1, acc = _accumulated(x, xf, "act")
    assert not acc.defer and not acc.kept and not acc.pool._free and isinstance(d1, torch.Tensor)
    assert torch.equal(h0, h1) and torch.equal(d0, d1)


def test_a_d_in_another_order_is_refused(monkeypatch):
    _need_cpp_bf16()
    monkeypatch.setattr(gptq_solve, "DEFER_BUDGET", 100)
    x, xf, w = _problem(4, 3000, 576, 16)
    h, d, _ = _accumulated(x, xf, "act")
    with pytest.raises(ValueError, match="another column order"):
        gptq_quantize(w, h, Grid(w, -1, "float16"), dxx=d, act_order=False)


def test_the_pass_hands_gptaq_its_d_in_the_solve_order(captured, batches, monkeypatch):
    """With GPTAQ on, every solve of the pass gets D already in its column order."""
    _need_cpp_bf16()
    monkeypatch.setattr(gptq_solve, "DEFER_BUDGET", 100)
    seen = []
    real = gptq_mod.gptq_quantize

    def noting(*args, dxx=None, **kwargs):
        seen.append(type(dxx).__name__)
        return real(*args, dxx=dxx, **kwargs)

    monkeypatch.setattr(gptq_mod, "gptq_quantize", noting)
    GPTQ(asym=True).call(copy.deepcopy(captured), CompileContext(calib=batches, quant=QuantConfig(), progress=False))
    assert seen == ["PermutedD"] * 8


def test_deferring_accumulators_hand_their_buffers_on(monkeypatch):
    """A pool shared by accumulators (the GPTQ pass gives one to all of a call's): a deferring
    accumulator returns its kept buffers and its staging buffer at ``result()``, and the next
    one of the same width stages into those very buffers (fresh ones cost page faults block
    after block), with the same sums."""
    _need_cpp_bf16()
    monkeypatch.setattr(gptq_solve, "DEFER_BUDGET", 100)
    x, xf, _ = _problem(6, 7000, 576, 8)
    pool = gptq_solve.ChunkPool()
    sums, ptrs = [], []
    for _ in range(2):
        acc = HessianAccumulator(576, asym=True, solve_order="act", pool=pool)
        for a, b in zip(x.split(1000), xf.split(1000), strict=True):
            acc.add(a, b)
        ptrs.append({t.data_ptr() for t in [acc.bufs[True], *acc._kept_bufs]})
        sums.append(acc.result())
        assert sum(len(v) for v in pool._free.values()) == 2  # the two kept chunks (4,096 + 2,904 rows), no spare
    assert ptrs[0] == ptrs[1]
    assert torch.equal(sums[0][0], sums[1][0]) and torch.equal(sums[0][1].d, sums[1][1].d)
