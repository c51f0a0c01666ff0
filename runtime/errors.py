"""Typed errors shared by every stage of glm-export.

Each error is a user-facing fact: the CLI prints ``str(error)`` on one line and exits non-zero, without a traceback.
Messages name the file, key or option involved and what was expected.
"""


class GlmExportError(Exception):
    """Base class for every error glm-export raises on purpose."""

    exit_code = 2


class ConfigError(GlmExportError):
    """A checkpoint config.json is missing, unreadable, or describes a model we do not support."""


class UnsupportedModelError(ConfigError):
    """The config is readable but asks for a feature the exporter does not implement."""


class WeightsError(GlmExportError):
    """Checkpoint weights are missing, extra, of the wrong shape, or unreadable."""


class BundleError(GlmExportError):
    """An export bundle is missing, incomplete, corrupt, or of an unknown manifest version."""


class OutputPathError(GlmExportError):
    """The output location cannot be written, or exists and may not be replaced."""


class VerificationError(GlmExportError):
    """Exported outputs differ from the reference beyond the tolerance table."""

    def __init__(self, message: str, max_diffs=None):
        super().__init__(message)
        self.max_diffs = dict(max_diffs or {})


class GenerationError(GlmExportError):
    """Generation was asked for something impossible: an empty prompt, a prompt longer than the context..."""


class SamplingConfigError(GenerationError):
    """A sampling parameter is out of range (temperature <= 0, top-p outside (0, 1], ...)."""


class TokenizerError(GlmExportError):
    """The bundle's tokenizer files are missing, unreadable, or do not match the model."""


class BackendError(GlmExportError):
    """The requested execution backend or provider is not available here."""
