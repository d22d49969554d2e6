"""Graph queries: linear spellings, norms of four kinds, blocks, networkx view."""

import pytest
import torch

from qqq_compile.compiler.capture import capture
from qqq_compile.graph import get_weight, linear_sites, norm_groups, partition, to_networkx
from tests.conftest import tiny_model


def _gm(arch):
    return capture(tiny_model(arch), torch.randint(0, 256, (2, 8))).graph_module


@pytest.mark.parametrize(
    "arch,kind,consumers",
    [
        ("llama", "rmsnorm", [3, 2]),
        ("qwen2", "rmsnorm", [3, 2]),
        ("gemma", "rmsnorm_plus_one", [3, 2]),
        ("opt", "layernorm", [3, 1]),
        ("gpt2", "layernorm", [1, 1]),
    ],
)
def test_norm_groups_found_from_the_graph(arch, kind, consumers):
    groups = norm_groups(_gm(arch))
    per_layer = [g for g in groups if ".0." in g.norm.weight.target or "h_0" in g.norm.weight.target]
    per_layer = [g for g in groups if g.sites and "lm_head" not in g.sites[0].name][:2]
    assert {g.norm.kind for g in groups} == {kind}
    assert [len(g.sites) for g in per_layer] == consumers
    if arch == "opt":
        assert all(g.norm.bias is not None for g in groups)


def test_final_norm_feeds_lm_head():
    groups = norm_groups(_gm("llama"))
    assert [s.name for s in groups[-1].sites] == ["lm_head"]


def test_gpt2_conv1d_weights_are_transposed_sites():
    gm = _gm("gpt2")
    sites = [s for s in linear_sites(gm) if s.name.endswith("c_attn")]
    assert sites and all(s.weight_t for s in sites)
    assert get_weight(gm, sites[0]).shape == (192, 64)  # [N, K] whatever the storage


def test_blocks_and_networkx_view():
    gm = _gm("llama")
    part = partition(gm)
    assert [b.name for b in part.blocks] == ["model.layers.0", "model.layers.1"]
    g = to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    import networkx as nx

    assert nx.is_directed_acyclic_graph(g)


# ----------------------------------------------------------------------------- analysis


def test_analysis_is_computed_once_per_graph_version():
    import copy

    from qqq_compile.graph import analysis, invalidate, linear_sites

    gm = _gm("llama")
    an = analysis(gm)
    assert analysis(gm) is an and len(linear_sites(gm)) == len(an.sites)
    # a rewrite (one linear's input re-wired through a new node) changes the key
    site = an.sites[0]
    with gm.graph.inserting_before(site.node):
        neg = gm.graph.call_function(torch.ops.aten.neg.default, (site.x,))
    site.node.replace_input_with(site.x, neg)
    fresh = analysis(gm)
    assert fresh is not an and fresh.sites[0].x is neg
    invalidate(gm)
    assert analysis(gm) is not fresh
    dup = copy.deepcopy(gm)  # a copy never sees the original's nodes
    assert {s.node for s in analysis(dup).sites}.isdisjoint({s.node for s in analysis(gm).sites})


def test_partition_is_a_copy_callers_may_edit():
    gm = _gm("llama")
    part = partition(gm)
    part.blocks[0].nodes.clear()
    assert partition(gm).blocks[0].nodes


def test_one_block_rule_for_graphs_and_module_trees():
    import transformers as tf

    from qqq_compile.compiler.blockwise import find_blocks
    from qqq_compile.graph import block_prefix

    torch.manual_seed(0)
    bert = tf.BertModel(
        tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ).eval()
    models = {"llama": tiny_model("llama"), "gpt2": tiny_model("gpt2"), "bert": bert}
    for name, model in models.items():
        ids = torch.randint(0, 64, (2, 8))
        gm = capture(model, ids if name != "bert" else {"input_ids": ids}).graph_module
        path, blocks = find_blocks(model)
        assert block_prefix(gm) == path, name
        assert [b.name for b in partition(gm).blocks] == blocks, name


def test_block_rule():
    from qqq_compile.graph import block_stack

    def stack(*names):
        s = block_stack([(n, 10) for n in names])
        return None if s is None else (s.path, list(s.names))

    assert stack("model.layers.0.q", "model.layers.1.q", "lm_head") == (
        "model.layers",
        ["model.layers.0", "model.layers.1"],
    )
    assert stack("heads.0", "heads.1") is None  # bare linears are not blocks
    assert stack("l.1.fc", "l.2.fc") is None  # indices must run from 0
    assert stack("0.fc", "1.fc") == ("", ["0", "1"])  # an nn.Sequential of blocks at the root
    experts = [f"layers.{i}.experts.{e}.w" for i in range(2) for e in range(4)]
    assert stack(*experts)[0] == "layers"  # the layer list holds more weight than one expert list


def test_block_io_from_dominators():
    from qqq_compile.graph import analysis

    gm = _gm("llama")
    an = analysis(gm)
    b0, b1 = partition(gm).blocks
    io0, io1 = an.block_io(b0), an.block_io(b1)
    assert io0.exit.target == torch.ops.aten.add.Tensor and io0.outputs == [io0.exit]  # the residual stream only
    assert io0.exit in io1.inputs  # block 1 reads block 0's result
    assert an.depends_on(io1.exit, io0.exit) and not an.depends_on(io0.exit, io1.exit)
