"""Typed errors of the precision stage (calibration, quantization, accuracy), on top of runtime.errors.

Like every ``GlmExportError`` they are user-facing facts: the CLI prints ``str(error)`` on one line and exits 2.
"""
from runtime.errors import GlmExportError


class CalibrationDataError(GlmExportError):
    """Calibration or evaluation text is missing, unreadable, empty, malformed or too short."""


class QuantizationError(GlmExportError):
    """A precision conversion was asked for something impossible: an unknown precision, an already quantized
    bundle, a graph that is not glm-export's, a bad option value."""


class AccuracyBoundError(QuantizationError):
    """A converted bundle's measured accuracy breaks the bounds of ``runtime.tolerances.ACCURACY_BOUNDS`` and the
    user did not accept the loss (``--accept-accuracy-loss``); nothing is written."""
