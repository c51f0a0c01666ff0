"""Click callbacks and stdio helpers that check user values where they enter the CLI (see runtime.user_input).

Each check raises a typed error naming the option (or stdin line) and what was expected, which the command group
prints on one line. Standard streams may be closed (``>&-``, ``<&-``) or a pipe may close early (``| head``);
these helpers turn that into a clear error or a quiet end rather than a traceback.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator, Optional, Tuple

from runtime.errors import GenerationError
from runtime.user_input import MAX_LINE_CHARS, check_text, check_threads, decode_line


def _flag(param: Any) -> str:
    return "--" + param.name.replace("_", "-") if param is not None and param.name else "option"


def threads_value(ctx: Any, param: Any, value: Optional[int]) -> Optional[int]:
    check_threads(value, _flag(param))
    return value


def text_value(ctx: Any, param: Any, value: Any) -> Any:
    """A text option (or a repeatable one) that must be valid UTF-8."""
    if value is None:
        return value
    if isinstance(value, tuple):
        return tuple(check_text(v, _flag(param)) for v in value)
    return check_text(value, _flag(param))


def require_stdout() -> None:
    """GenerationError when stdout is closed: the command's output would be lost."""
    if sys.stdout is None:
        raise GenerationError("stdout is closed; this command prints its result there (redirect it to a file)")


def flush_stdout() -> None:
    if sys.stdout is not None:
        sys.stdout.flush()


def stdin_lines() -> Iterator[Tuple[int, str]]:
    """(line number, text without the line end) of each line on stdin, decoded strictly as UTF-8 and bounded in
    length; GenerationError naming the line otherwise, or when stdin is closed."""
    if sys.stdin is None:
        raise GenerationError("stdin is closed; chat reads one message per line from it")
    stream = getattr(sys.stdin, "buffer", None)
    lineno = 0
    while True:
        lineno += 1
        if stream is None:  # a text stream without bytes underneath (tests may give one)
            raw_text = sys.stdin.readline(MAX_LINE_CHARS + 1)
            if not raw_text:
                return
            text = check_text(raw_text, f"stdin line {lineno}", max_chars=MAX_LINE_CHARS + 1)
        else:
            raw = stream.readline(4 * MAX_LINE_CHARS + 1)
            if not raw:
                return
            text = decode_line(raw, f"stdin line {lineno}")
        if len(text.rstrip("\r\n")) > MAX_LINE_CHARS or (len(text) > MAX_LINE_CHARS and not text.endswith("\n")):
            raise GenerationError(f"stdin line {lineno}: longer than {MAX_LINE_CHARS} characters")
        yield lineno, text.rstrip("\r\n")
