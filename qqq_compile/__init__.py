"""qqq_compile: compile PyTorch / Hugging Face language models to W4A8 with QQQ."""

from qqq_compile import inspect
from qqq_compile.artifact import load, load_tokenizer, save
from qqq_compile.compiler.api import calib_batches, compile, compile_from_disk
from qqq_compile.compiler.backend import qqq_backend
from qqq_compile.compiler.capture import Captured, capture
from qqq_compile.compiler.driver import build_passes, run_pipeline
from qqq_compile.compiler.pipeline import (
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
from qqq_compile.compiler.presets import get_preset, rtn_w4a8
from qqq_compile.compiler.report import Report
from qqq_compile.config import CalibConfig, CompileConfig, QuantConfig
from qqq_compile.errors import (
    ArtifactError,
    CaptureError,
    ConfigError,
    PipelineError,
    QQQError,
    StreamingError,
)
from qqq_compile.runtime.compiled import CompiledModel
from qqq_compile.targets.w4a8 import kernels  # noqa: F401 - kernels registers torch.ops.qqq.*


def export_onnx(compiled, path, **kwargs):
    """Export a compiled model to ONNX (see :func:`qqq_compile.targets.w4a8.export.onnx.export_onnx`)."""
    from qqq_compile.targets.w4a8.export.onnx import export_onnx as _export_onnx

    return _export_onnx(compiled, path, **kwargs)


def export_compressed_tensors(compiled, out_dir, **kwargs):
    """Write a compressed-tensors HF folder (see :mod:`qqq_compile.targets.w4a8.export.compressed_tensors`)."""
    from qqq_compile.targets.w4a8.export.compressed_tensors import export_compressed_tensors as _export

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
