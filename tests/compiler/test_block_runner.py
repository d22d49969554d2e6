"""BlockRunner: block-by-block execution equals a whole-graph run; memory is released."""

import pytest
import torch

from qqq_compile.compiler.api import calib_batches
from qqq_compile.compiler.block_runner import BlockRunner
from qqq_compile.compiler.capture import capture
from qqq_compile.graph import linear_sites
from tests.conftest import tiny_calib, tiny_model


def test_blockwise_equals_whole_graph_and_overrides_apply():
    model = tiny_model("llama")
    gm = capture(model, torch.randint(0, 256, (2, 8))).graph_module
    batches = calib_batches(tiny_calib(4), batch_size=2)
    runner = BlockRunner(gm, batches, progress=False)
    lm_head = [s for s in linear_sites(gm) if s.name == "lm_head"][0]
    live_sizes = []
    for st in runner.blocks():
        live_sizes.append(len(runner.envs[0]))
        downs = [s for s in linear_sites(gm) if s.name == st.block.name + ".mlp.down_proj"]
        # a candidate run with outputs requested does not disturb the live state
        outs = st.run(outputs=[downs[0].node], batches=[0])
        assert outs[0][0].shape == (2, 32, 64)
    logits = runner.suffix_state().run(outputs=[lm_head.node])
    for b, out in zip(batches, logits, strict=True):
        with torch.no_grad():
            ref = model(b["input_ids"]).logits
        torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
    # Advancing through the suffix (as calibrate does) keeps no graph output: the logits
    # (tokens x vocab floats per batch) die where they are made.
    runner._advance(runner.part.suffix)
    assert all(lm_head.node not in env for env in runner.envs)
    # only a handful of values stay alive between blocks (residual, rotary, mask...)
    assert max(live_sizes) < 12


def test_progress_bar_names_the_pass_the_block_and_the_step(capsys):
    """The blocks' bar (stderr, kept when done): the pass's name, block i/n with a rate and
    ETA, and what the pass said it is doing inside the block."""
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    runner = BlockRunner(gm, calib_batches(tiny_calib(2)), progress=True, desc="mypass")
    for st in runner.blocks():
        assert runner.bar is not None
        st.status(f"solving {st.index}")
    assert runner.bar is None
    err = capsys.readouterr().err
    assert "mypass" in err and "2/2" in err and "block" in err and "model.layers.1: solving 1" in err
    quiet = BlockRunner(gm, calib_batches(tiny_calib(2)), progress=False, desc="quiet")
    for st in quiet.blocks():
        st.status("nothing shown")
    assert "quiet" not in capsys.readouterr().err


def test_override_changes_what_the_next_block_sees():
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (2, 8))).graph_module
    runner = BlockRunner(gm, calib_batches(tiny_calib(2)), progress=False)
    sites = {s.name: s for s in linear_sites(gm)}
    seen = []
    for st in runner.blocks():
        if st.index == 0:
            st.overrides[sites["model.layers.0.mlp.down_proj"].node] = lambda x, w, *a: torch.zeros(
                *x.shape[:-1], w.shape[0]
            )
        else:
            q = sites["model.layers.1.self_attn.q_proj"]
            seen.append(st.run(outputs=[q.x])[0][0])
    # with layer 0's MLP zeroed, layer 1 sees a different residual than the float model
    runner2 = BlockRunner(gm, calib_batches(tiny_calib(2)), progress=False)
    for st in runner2.blocks():
        if st.index == 1:
            ref = st.run(outputs=[sites["model.layers.1.self_attn.q_proj"].x])[0][0]
    assert not torch.allclose(seen[0], ref)


def test_blocks_reuse_freed_calibration_tensors_and_compute_the_same(monkeypatch):
    """Inside ``blocks()`` the C++ extension's allocator hands a batch's freed activations
    to the next batch (targets/w4a8/kernels/cpu.py: AllocationReuse); the results equal a run with
    torch's allocator, and the allocator is removed when the loop ends."""
    from qqq_compile.targets.w4a8.kernels import cpu

    if not cpu.cpu_supports_kernels():
        pytest.skip("this CPU lacks AVX512-VNNI/VBMI: no C++ extension, nothing to reuse with")
    assert cpu.ensure_cpp_kernels()
    ext = cpu.loaded_extension()
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (1, 8))).graph_module
    # 4 x 1024 tokens: activations of 1-2.6 MB per batch, the allocator's sizes
    batches = calib_batches(tiny_calib(8, seq=1024), batch_size=4)
    lm_head = [s for s in linear_sites(gm) if s.name == "lm_head"][0]

    def run(cap: int) -> tuple[list[torch.Tensor], list[bool], int]:
        monkeypatch.setattr(cpu, "CALIB_REUSE_BYTES", cap)
        runner = BlockRunner(gm, batches, progress=False)
        reuses = ext.alloc_cache_stats()[4]
        installed = [bool(ext.alloc_cache_stats()[0]) for _ in runner.blocks()]
        logits = runner.suffix_state().run(outputs=[lm_head.node])
        return [x[0] for x in logits], installed, ext.alloc_cache_stats()[4] - reuses

    plain, installed_plain, _ = run(0)
    reused, installed, reuses = run(128 << 20)
    assert installed == [True, True] and installed_plain == [False, False]
    assert not ext.alloc_cache_stats()[0]
    assert reuses > 0  # the second batch got the first one's freed blocks
    for a, b in zip(plain, reused, strict=True):
        assert torch.equal(a, b)
