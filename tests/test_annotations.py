"""The one typed annotation in ``node.meta["qqq"]``: what the passes write there, copy-on-write
semantics, the legacy per-fact keys, and the JSON codec (graph-file records)."""

from __future__ import annotations

import json

import torch
from torch.fx import Graph, Node

import qqq_compile as qc
from qqq_compile.annotations import (
    KEY,
    LEGACY_NODE_KEYS,
    LinearInfo,
    NodeAnnotation,
    annotate,
    decode_node,
    encode_extras,
    encode_linear,
    encode_node,
    node_annotation,
    set_node_annotation,
)
from qqq_compile.compiler.passes.cast_float import CastFloatWeights
from qqq_compile.compiler.passes.lower import Lower
from qqq_compile.compiler.passes.quantize import QuantizeRTN
from qqq_compile.compiler.passes.rotate import Rotate
from qqq_compile.compiler.passes.smooth import Smooth, SmoothRecord
from qqq_compile.graph import info, linear_sites
from tests.conftest import tiny_calib, tiny_model


def nodes(n: int = 2) -> list[Node]:
    g = Graph()
    return [g.placeholder(f"x{i}") for i in range(n)]


def test_every_fact_lives_in_the_one_annotation():
    model = tiny_model("llama", num_hidden_layers=1)
    passes = [Rotate(), Smooth(n_grid=4), QuantizeRTN(), Lower(), CastFloatWeights("bfloat16")]
    config = {"quant": {"int8_head": False}}  # the float lm_head is what cast_float casts here
    gm = qc.compile(model, tiny_calib(8, 32), config, passes=passes, progress=False).graph_module
    anns = {n: n.meta[KEY] for n in gm.graph.nodes if KEY in n.meta}
    assert all(type(a) is NodeAnnotation and not a.is_empty() for a in anns.values())
    assert not [n.name for n in gm.graph.nodes if set(LEGACY_NODE_KEYS.values()) & set(n.meta)]
    linears = [a.linear for a in anns.values() if a.linear is not None]
    assert len(linears) == 8  # 7 lowered in the block + lm_head
    assert all(info(n) is a.linear for n, a in anns.items())
    assert sum(a.online_hadamard is not None for a in anns.values()) == 1  # before down_proj
    roles = sorted(a.rotate for a in anns.values() if a.rotate)
    # readers: q, k, v, gate, up, lm_head; writers: o_proj, down_proj (behind the online Hadamard)
    assert roles.count("reader") == 6 and roles.count("writer") == 1 and roles.count("writer+online_hadamard") == 1
    smooth = [a.smooth for a in anns.values() if a.smooth is not None]
    assert smooth and all(isinstance(r, SmoothRecord) for r in smooth)
    cast = [a for a in anns.values() if a.float_cast]
    assert [a.linear.fqn for a in cast if a.linear] == ["lm_head"] and len(cast) == 2  # lm_head and the embedding
    assert {s.name for s in linear_sites(gm) if info(s.node) is not None} == {"lm_head"}  # only it is not lowered


def test_writes_are_copy_on_write():
    a, b = nodes()
    li = LinearInfo("fc", 4, 8)
    annotate(a, linear=li, rotate="reader")
    b.meta.update(a.meta)  # what a pass does when it rebuilds a node
    annotate(b, rotate=None, online_hadamard=16)
    assert node_annotation(a) == NodeAnnotation(linear=li, rotate="reader")
    assert node_annotation(b) == NodeAnnotation(linear=li, online_hadamard=16)
    assert info(a) is info(b) is li  # the LinearInfo itself is shared, as before
    view = node_annotation(a)
    view.rotate = "writer"  # a copy: the node keeps its own
    assert node_annotation(a).rotate == "reader"
    set_node_annotation(a, NodeAnnotation())
    assert KEY not in a.meta and info(a) is None


def test_nodes_annotated_the_old_way_are_read_and_moved_on_write():
    """Before the one annotation: a bare LinearInfo in meta["qqq"], each other fact under its own key."""
    a, b = nodes()
    li = LinearInfo("fc", 4, 8)
    rec = SmoothRecord("g", "qqq", scales=torch.ones(4), loss_before=1.0, loss_after=0.5)
    a.meta.update({"qqq": li, "qqq_smooth": rec, "qqq_rotate": "writer", "qqq_float_cast": True})
    b.meta["qqq_online_hadamard"] = 256
    b.meta["qqq_int8_head"] = {"replaced": "linear", "fqn": "lm_head"}  # the int8_head pass's own key
    assert node_annotation(a) == NodeAnnotation(linear=li, smooth=rec, rotate="writer", float_cast=True)
    assert info(a) is li and info(b) is None and node_annotation(b).online_hadamard == 256
    assert node_annotation(b).int8_head == {"replaced": "linear", "fqn": "lm_head"}
    annotate(a, rotate="reader")
    assert set(a.meta) == {KEY} and a.meta[KEY] == NodeAnnotation(li, rec, "reader", None, True)
    set_node_annotation(b, node_annotation(b))
    assert set(b.meta) == {KEY} and b.meta[KEY].online_hadamard == 256
    assert b.meta[KEY].int8_head == {"replaced": "linear", "fqn": "lm_head"}


def test_codec_round_trips_a_node_and_reads_graph_file_records_as_saved_before():
    (a,) = nodes(1)
    li = LinearInfo("fc", 4, 8, act_absmax=torch.arange(4.0), act_samples=3, smooth_group="g", method="rtn")
    rec = SmoothRecord("g", "qqq", scales=torch.full((4,), 2.0), loss_before=1.0, loss_after=float("inf"))
    annotate(a, linear=li, smooth=rec, rotate="writer+online_hadamard", float_cast=True)
    tensors: dict[str, torch.Tensor] = {}
    back = decode_node(json.loads(json.dumps(encode_node(a, "n/", tensors))), tensors)
    assert (back.rotate, back.online_hadamard, back.float_cast) == ("writer+online_hadamard", None, True)
    assert back.linear.fqn == "fc" and torch.equal(back.linear.act_absmax, li.act_absmax)
    assert type(back.smooth) is SmoothRecord and torch.equal(back.smooth.scales, rec.scales)
    assert back.smooth.loss_after == float("inf")
    # A format 1.1 graph file (as written before the facts moved into meta["qqq"]): a linear's entry
    # points at its manifest record; other nodes carry their facts; unknown (later) fields are ignored.
    layers = [encode_linear(li, "l/", tensors, rec)]
    assert encode_extras(node_annotation(a)) == {"rotate": "writer+online_hadamard", "float_cast": True}
    saved = {"layer": 0, "rotate": "reader", "added_later": 1}
    lin = decode_node(saved, tensors, layers)
    assert lin.linear.fqn == "fc" and lin.rotate == "reader" and type(lin.smooth) is SmoothRecord
    assert decode_node({"online_hadamard": 256}, tensors) == NodeAnnotation(online_hadamard=256)
    assert decode_node({"float_cast": True}, tensors) == NodeAnnotation(float_cast=True)


def test_codec_round_trips_the_int8_head_record():
    a, b = nodes()
    annotate(a, int8_head={"replaced": "linear", "fqn": "lm_head"})
    annotate(b, int8_head={"replaced": "embedding", "weight": "model.embed_tokens.weight"}, float_cast=True)
    tensors: dict[str, torch.Tensor] = {}
    for n in (a, b):
        rec = json.loads(json.dumps(encode_node(n, "n/", tensors)))
        assert rec == encode_extras(node_annotation(n)) and "int8_head" in rec
        assert decode_node(rec, tensors) == node_annotation(n)
    # a linear's graph-file entry (pointing at its manifest record) carries it too
    li = LinearInfo("lm_head", 4, 8)
    annotate(a, linear=li)
    layers = [encode_linear(li, "l/", tensors)]
    back = decode_node({"layer": 0, **encode_extras(node_annotation(a))}, tensors, layers)
    assert back.int8_head == {"replaced": "linear", "fqn": "lm_head"} and back.linear.fqn == "lm_head"
    assert decode_node({}, tensors).int8_head is None
