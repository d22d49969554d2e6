"""BlockRunner: block-by-block execution equals a whole-graph run; memory is released."""

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
    runner._advance(runner.part.suffix)
    for b, env in zip(batches, runner.envs, strict=True):
        with torch.no_grad():
            ref = model(b["input_ids"]).logits
        torch.testing.assert_close(env[lm_head.node], ref, rtol=1e-5, atol=1e-5)
    # only a handful of values stay alive between blocks (residual, rotary, mask...)
    assert max(live_sizes) < 12


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
