"""Typed errors shared by every stage of glm-export.

Each error is a user-facing fact: the CLI prints ``str(error)`` on one line and exits non-zero, without a traceback.
Messages name the file, key or option involved and what was expected. ``first_line`` and ``read_json_object`` help
keep them so: a library's message cut to one line, a JSON file read with the error type of the stage reading it.
"""
import json
from typing import Any, Dict, Type


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


class ExportError(GlmExportError):
    """The traced graph does not match what the exporter expects of it (an input that is neither contract nor
    weight, ...): the checkpoint holds something the export-friendly model does not."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to one line (library errors can span several); its type name when empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_json_object(path: str, error_cls: Type[GlmExportError], what: str = "JSON", hint: str = "") -> Dict[str, Any]:
    """The JSON object in the file at ``path``; ``error_cls`` naming the file when it cannot be read, is not JSON,
    or holds something other than an object ("PATH: unreadable WHAT (reason)", "PATH: expected a JSON object"),
    each followed by "; HINT" when a hint is given. The one JSON-object reader of the project."""
    suffix = f"; {hint}" if hint else ""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise error_cls(f"{path}: unreadable {what} ({first_line(e)}){suffix}") from None
    if not isinstance(data, dict):
        raise error_cls(f"{path}: expected a JSON object{suffix}")
    return data
