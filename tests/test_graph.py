"""Graph queries: linear spellings, norms of four kinds, blocks, networkx view."""

import pytest
import torch

from qqq_compile import capture
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
