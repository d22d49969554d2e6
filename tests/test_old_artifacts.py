"""Artifacts written before the package moved to ``compiler/``, ``targets/`` and ``runtime/``
(format 1.1, by the previous layout: ``tests/data/artifacts_1_1``, made with that commit's
``save()`` from tiny random LLaMAs) still load, both from their graph file and by replaying
their passes, and compute what they computed when saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qqq_compile as qc
from qqq_compile.annotations import node_annotation

DATA = Path(__file__).resolve().parent / "data" / "artifacts_1_1"


@pytest.mark.parametrize("name", ["rtn_g32", "qqq_smooth"])
@pytest.mark.parametrize("rebuild", ["graph", "replay"])
def test_an_artifact_of_the_old_layout_loads_and_computes_the_same(name, rebuild):
    expected = torch.load(DATA / f"{name}.expected.pt")
    compiled = qc.load(DATA / name, rebuild=rebuild)
    assert compiled.rebuilt_by == rebuild and compiled.target.name == "w4a8"
    with torch.no_grad():
        got = compiled(expected["ids"]).logits
    torch.testing.assert_close(got, expected["logits"], rtol=0, atol=1e-5)


def test_the_old_smoothing_records_decode_as_their_class():
    compiled = qc.load(DATA / "qqq_smooth")
    records = [node_annotation(n).smooth for n in compiled.graph_module.graph.nodes]
    records = [r for r in records if r is not None]
    assert records and all(type(r).__name__ == "SmoothRecord" for r in records)
