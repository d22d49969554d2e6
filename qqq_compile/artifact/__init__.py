"""Save and load compiled models: safetensors plus a versioned JSON manifest, never pickle.

An artifact is a folder::

    qqq_manifest.json   format name + version, qqq_compile/torch/transformers versions, the
                        CompileConfig, the pipeline (pass names, the exact pass configs,
                        records, notes, replay state), the per-linear report, the HF model
                        class + config, the tensor table and a fingerprint of the lowered
                        graph (ops it calls, with counts)
    model.safetensors   every tensor the lowered graph reads (packed int4 weights, scales,
                        norms, embeddings, ...), each stored once (tied tensors are aliases)
    graph.json          the lowered graph itself (nodes, targets, arguments; no code, no pickle)
    source_graph.txt    the readable graph before the pipeline (for reports)
    tokenizer/          optional: ``tokenizer.save_pretrained``
    step/               the AOTInductor decode step, ``<key>.pt2`` + ``<key>.json`` (code only:
                        the weights come from model.safetensors at load); one per CPU + torch,
                        a rebuilt one is added beside the shipped one (format 1.2)

Writes are atomic (:mod:`.files`): the folder is built and fsynced in a hidden sibling, then
swapped into place, so a crash leaves the earlier artifact whole.

Loading needs no calibration data and no original weights (:mod:`.load`). It reads the
lowered graph from ``graph.json`` and sets its tensors: no model is built and nothing is
captured. When the graph file is absent (format 1.0), was written by another torch
release, or names an op this torch lacks, it rebuilds the model skeleton from the saved HF
config, captures it, sets every saved tensor and **replays** the pipeline
(:mod:`.replay`): the driver rebuilds each pass from its saved config and runs it as its
``replay_mode`` declares:

* ``"rerun"``: the rewrite is deterministic given the graph, its annotations and the pass
  config; it runs again with no calibration data (``lower``, ``fuse_norm_quant``,
  ``rotate``, ``cast_float``);
* ``"state"`` (a ``replay(gm, ctx, state)`` method): the pass rebuilds its structure from
  the JSON-able state it recorded at compile time with
  :func:`qqq_compile.annotations.set_replay_state`;
* ``"tensors"``: nothing to rebuild; the pass only annotated, or only changed tensor
  values (those come from the safetensors file).

Either way the graph must read exactly the saved tensors, with the saved shapes, and call
the same ops as the saved graph; otherwise :class:`ArtifactError` names the passes that
changed the structure without declaring how to replay it. Pass wall times are not saved,
so the same model, data and seed give byte-identical artifacts.
"""

from __future__ import annotations

from qqq_compile.artifact.load import load, load_tokenizer
from qqq_compile.artifact.manifest import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH,
    MANIFEST,
    SOURCE_GRAPH,
    TOKENIZER_DIR,
    WEIGHTS,
    read_manifest,
)
from qqq_compile.artifact.save import save
from qqq_compile.errors import ArtifactError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "GRAPH",
    "MANIFEST",
    "SOURCE_GRAPH",
    "TOKENIZER_DIR",
    "WEIGHTS",
    "ArtifactError",
    "load",
    "load_tokenizer",
    "read_manifest",
    "save",
]
