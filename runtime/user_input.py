"""Checks of values that come straight from the user, at the boundary where they enter glm-export.

- ``check_threads``: a thread count is a whole number from 1 to the cores here (onnxruntime would try to start a
  million threads, and hang, rather than refuse);
- ``check_text``: text must be valid Unicode that UTF-8 can encode. Command-line arguments and stdin that are not
  UTF-8 reach Python as lone surrogates (``surrogateescape``), which every tokenizer library chokes on; the
  error names where the text came from and the offending byte;
- ``decode_line``: one line of bytes from a file or stdin, decoded strictly, with its origin in the error.

Standard library only; Python 3.8.
"""
import os
from typing import Any, Optional, Type

from runtime.errors import GenerationError, GlmExportError

MAX_LINE_CHARS = 1 << 20  # one prompt, chat turn, calibration or evaluation line: 1 Mi characters at most


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: Any, option: str = "--threads", error_cls: Type[GlmExportError] = GenerationError) -> None:
    """None (the library's choice) or a whole number from 1 to the cores of this machine."""
    if threads is None:
        return
    n = cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= n:
        raise error_cls(f"{option}: expected a whole number of threads from 1 to {n} (the cores here), "
                        f"got {threads!r:.40}")


def check_text(text: Any, where: str, error_cls: Type[GlmExportError] = GenerationError,
               max_chars: Optional[int] = MAX_LINE_CHARS) -> str:
    """``text`` when it is a str UTF-8 can encode (and not over ``max_chars``); error naming ``where`` otherwise."""
    if not isinstance(text, str):
        raise error_cls(f"{where}: expected text, got {type(text).__name__}")
    if max_chars is not None and len(text) > max_chars:
        raise error_cls(f"{where}: {len(text)} characters, more than the {max_chars} allowed")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        code = ord(bad)
        what = (f"byte 0x{code - 0xDC00:02x} that is not valid UTF-8" if 0xDC80 <= code <= 0xDCFF
                else f"a lone surrogate U+{code:04X}")
        raise error_cls(f"{where}: {what} at character {e.start}; give UTF-8 text") from None
    return text


def decode_line(raw: bytes, where: str, error_cls: Type[GlmExportError] = GenerationError) -> str:
    """A line of bytes decoded as UTF-8; error naming ``where`` and the byte offset when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error_cls(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "give UTF-8 text") from None
