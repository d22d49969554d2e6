"""The errors qqq_compile raises on purpose, in one module at the bottom of the layers.

Every module may import from here, so a low module (the runner, the residency of
streamed weights) can raise the same error class that a high one (``compile()``,
``load()``) documents, without importing upwards. Each class is also re-exported from
the module that used to define it (``qqq_compile.config.ConfigError``,
``qqq_compile.compiler.capture.CaptureError``, ``qqq_compile.compiler.pipeline.PipelineError``,
``qqq_compile.artifact.ArtifactError``, ``qqq_compile.compiler.streaming.StreamingError``), so
existing imports keep working.

All of them derive from :class:`QQQError`; each keeps the builtin base it had
(``ValueError`` or ``RuntimeError``), so ``except ValueError`` code still catches it.
Messages name the problem and the way out.
"""

from __future__ import annotations

from collections.abc import Sequence


class QQQError(Exception):
    """Base class of the errors qqq_compile raises on purpose."""


class ConfigError(QQQError, ValueError):
    """A config dict has unknown keys or values of the wrong kind."""


class CaptureError(QQQError, RuntimeError):
    """The model could not be exported; the message names the cause and the way out."""


class PipelineError(QQQError, RuntimeError):
    """A pass failed (or broke the graph); names the pass and those that ran before it."""

    def __init__(self, pass_name: str, index: int, before: Sequence[str], cause: BaseException | str):
        self.pass_name, self.index, self.before = pass_name, index, list(before)
        ran = ", ".join(self.before) if self.before else "none"
        super().__init__(f"pass #{index} '{pass_name}' failed (passes run before it: {ran}): {cause}")

    def __reduce__(self):  # noqa: ANN204 - picklable across processes despite the custom __init__
        return (type(self), (self.pass_name, self.index, self.before, str(self).split("): ", 1)[-1]))


class ArtifactError(QQQError, ValueError):
    """A saved artifact is missing, corrupt, foreign, too new, or cannot be replayed."""


class StreamingError(QQQError, RuntimeError):
    """The checkpoint cannot be streamed; the message names the problem and the way out."""


class CalibrationDataError(QQQError, ValueError):
    """Calibration data makes a statistic meaningless (NaN/Inf activations, ...)."""


__all__ = [
    "ArtifactError",
    "CalibrationDataError",
    "CaptureError",
    "ConfigError",
    "PipelineError",
    "QQQError",
    "StreamingError",
]
