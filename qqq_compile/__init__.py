"""qqq_compile: compile PyTorch / Hugging Face language models to W4A8 with QQQ."""

from . import kernels  # noqa: F401 - registers torch.ops.qqq.*
from .api import calib_batches, compile
from .backend import qqq_backend
from .capture import Captured, CaptureError, capture
from .compiled import CompiledModel, Report
from .config import CalibConfig, CompileConfig, ConfigError, QuantConfig
from .pipeline import (
    PASSES,
    PRESETS,
    CompileContext,
    DumpGraphs,
    FunctionPass,
    PassResult,
    Pipeline,
    PipelineError,
    PrintAfterPass,
    QQQPass,
    TimePasses,
    register_pass,
    register_preset,
)
from .presets import get_preset, rtn_w4a8

__all__ = [
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
