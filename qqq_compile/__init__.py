"""qqq_compile: compile PyTorch / Hugging Face language models to W4A8 with QQQ."""

from . import inspect, kernels  # noqa: F401 - kernels registers torch.ops.qqq.*
from .api import calib_batches, compile, compile_from_disk
from .artifact import load, load_tokenizer, save
from .backend import qqq_backend
from .capture import Captured, capture
from .compiled import CompiledModel
from .config import CalibConfig, CompileConfig, QuantConfig
from .driver import build_passes, run_pipeline
from .errors import ArtifactError, CaptureError, ConfigError, PipelineError, QQQError, StreamingError
from .pipeline import (
    PASSES,
    PRESETS,
    CompileContext,
    DumpGraphs,
    FunctionPass,
    PassConfig,
    PassResult,
    Pipeline,
    PrintAfterPass,
    QQQPass,
    TimePasses,
    pass_from_dict,
    register_pass,
    register_preset,
)
from .presets import get_preset, rtn_w4a8
from .report import Report


def export_onnx(compiled, path, **kwargs):
    """Export a compiled model to ONNX (see :func:`qqq_compile.export.onnx.export_onnx`)."""
    from .export.onnx import export_onnx as _export_onnx

    return _export_onnx(compiled, path, **kwargs)


def export_compressed_tensors(compiled, out_dir, **kwargs):
    """Write a compressed-tensors HF folder (see :mod:`qqq_compile.export.compressed_tensors`)."""
    from .export.compressed_tensors import export_compressed_tensors as _export

    return _export(compiled, out_dir, **kwargs)


__all__ = [
    "ArtifactError",
    "QQQError",
    "StreamingError",
    "PassConfig",
    "build_passes",
    "compile_from_disk",
    "pass_from_dict",
    "run_pipeline",
    "export_compressed_tensors",
    "export_onnx",
    "inspect",
    "load",
    "load_tokenizer",
    "save",
    "PASSES",
    "PRESETS",
    "CalibConfig",
    "CaptureError",
    "Captured",
    "CompileConfig",
    "CompileContext",
    "CompiledModel",
    "ConfigError",
    "DumpGraphs",
    "FunctionPass",
    "PassResult",
    "Pipeline",
    "PipelineError",
    "PrintAfterPass",
    "QQQPass",
    "QuantConfig",
    "Report",
    "TimePasses",
    "calib_batches",
    "capture",
    "compile",
    "get_preset",
    "qqq_backend",
    "register_pass",
    "register_preset",
    "rtn_w4a8",
]
