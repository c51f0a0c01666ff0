"""Rendering a checkpoint's jinja chat template safely, and encoding the result with message text kept as text.

The template is data from the bundle, so it is rendered in jinja's immutable sandbox with limits of our own:

- time: a trace function stops the template's own code after ``TIME_LIMIT_S`` (nested ``range`` loops cannot hang);
- size: no string or list built by ``*``, ``+``, ``%``, a filter or a method call, and no output, may exceed
  ``MAX_CHARS``; ``**`` with a huge exponent is refused;
- no ``include``, ``import`` or ``extends`` (a loader that refuses them);
- any failure inside the template (division by zero, a missing key, recursion, ...) is one TokenizerError.

String methods, filters and indexing applied to one marked message string (``content.strip()``,
``content.split('</think>')[-1]``, ``content|trim``) act on its text and mark the result again, so templates that
edit message text keep it as text too.

Chat text is data: ``encode_rendered`` receives the rendered text in which every string that came from a message
was wrapped in two Unicode noncharacters (``wrap_messages``). Special-token text is turned into ids only outside
those spans; message text between them, and the template text around it, is encoded as plain text in one run, so
ordinary messages get exactly the ids the template would give unwrapped. Python 3.8; jinja2 imported on use.
"""
import functools
import json
import re
import sys
import time
import types
from typing import Any, Dict, List, Mapping, Sequence

from runtime.errors import GenerationError, GlmExportError, TokenizerError, first_line

TIME_LIMIT_S = 5.0
MAX_CHARS = 16 * 1024**2  # characters of any string the template builds, and of its output
MAX_EXPONENT = 4096
OPEN, CLOSE = "\ufdd0", "\ufdd1"  # Unicode noncharacters: reserved for internal use, never in real text
_WIDTH = re.compile(r"%[-+ #0]*(\d+)?(?:\.(\d+))?")


class TemplateLimitError(TokenizerError):
    """A chat template ran too long or built something too large."""


def _refuse(what: str) -> None:
    raise TemplateLimitError(f"chat_template {what}; refused (limit {MAX_CHARS} characters, {TIME_LIMIT_S:g} s)")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_CHARS:
        _refuse(f"built a value of {len(value)} items")
    return value


def _check_args(args: Sequence[Any]) -> None:
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_CHARS:
            _refuse(f"passed the number {a} to a filter or method")


class _Deadline:
    """A trace function over the template's compiled code that stops it after the time limit."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.count = 0

    def _local(self, frame, event, arg):
        self.count += 1
        if self.count & 255 == 0 and time.monotonic() > self.end:
            _refuse(f"took longer than {TIME_LIMIT_S:g} s to render")
        return self._local

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename == "<template>":
            return self._local
        return None


def _environment():
    from runtime.tokenizer import _import

    jinja2 = _import("jinja2", "chat_template")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _NoLoader(jinja2.BaseLoader):
        def get_source(self, environment, template):
            raise TokenizerError(f"chat_template includes or imports {template!r}; a chat template must be "
                                 "self-contained")

    class _LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "%", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT \
                    and isinstance(left, (int, float)) and abs(left) > 1:
                _refuse(f"raised a number to the power {right}")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                        _refuse(f"repeated a value {n} times")
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if len(left) + len(right) > MAX_CHARS:
                    _refuse("joined values over the size limit")
            if operator == "%" and isinstance(left, str):
                for width, precision in _WIDTH.findall(left):
                    if int(width or 0) > MAX_CHARS or int(precision or 0) > MAX_CHARS:
                        _refuse("formatted with a width over the size limit")
            return _check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
            _check_args(args)
            _check_args(list(kwargs.values()))
            inner = _unwrapped(getattr(__obj, "__self__", None))
            if inner is not None and isinstance(__obj, types.BuiltinMethodType):
                # a str method on message text (.strip(), .split(...)): applied to the text, result marked again
                method = getattr(inner, __obj.__name__)
                return _check_size(_rewrap(super().call(__context, method, *args, **kwargs)))
            return _check_size(super().call(__context, __obj, *args, **kwargs))

        def getitem(self, obj, argument):
            inner = _unwrapped(obj)
            if inner is not None and isinstance(argument, (int, slice)):
                return _rewrap(super().getitem(inner, argument))
            return super().getitem(obj, argument)

    env = _LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], loader=_NoLoader())
    for name, f in list(env.filters.items()):
        env.filters[name] = _limited_filter(f)
    return jinja2, env


def _limited_filter(f):
    value_at = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # after the context/environment

    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def limited(*args, **kwargs):
        _check_args(args[value_at + 1:])
        _check_args(list(kwargs.values()))
        inner = _unwrapped(args[value_at]) if len(args) > value_at else None
        if inner is not None:  # a filter on message text (|trim, |replace): applied to the text, marked again
            args = args[:value_at] + (inner,) + args[value_at + 1:]
            return _check_size(_rewrap(f(*args, **kwargs)))
        return _check_size(f(*args, **kwargs))

    return limited


def _unwrapped(value: Any) -> Any:
    """The text of one marked message string, or None when ``value`` is not exactly one."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == OPEN and value[-1] == CLOSE:
        inner = value[1:-1]
        if OPEN not in inner and CLOSE not in inner:
            return inner
    return None


def _rewrap(value: Any) -> Any:
    if isinstance(value, str):
        return OPEN + value + CLOSE if value else value
    if isinstance(value, (list, tuple)):
        return type(value)(_rewrap(v) for v in value)
    return value


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson filter: like jinja's, but without ASCII escaping or HTML-safe quoting."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_exception(message: str) -> None:
    raise GenerationError(f"chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


def render(template: str, where: str, **variables: Any) -> str:
    """The text ``template`` renders with ``variables``, within the limits above; TokenizerError naming ``where``
    for anything that goes wrong inside it (the template is data from the bundle: any failure is its own)."""
    if not isinstance(template, str):
        raise TokenizerError(f"{where}: chat_template must be a string")
    if len(template) > MAX_CHARS:
        raise TokenizerError(f"{where}: chat_template is {len(template)} characters, over {MAX_CHARS}")
    jinja2, env = _environment()
    env.filters["tojson"] = _limited_filter(_tojson)
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = _strftime_now
    deadline = _Deadline(TIME_LIMIT_S)
    previous = sys.gettrace()
    sys.settrace(deadline)
    try:
        out: List[str] = []
        size = 0
        for chunk in env.from_string(template).generate(**variables):
            size += len(chunk)
            if size > MAX_CHARS:
                _refuse("rendered more text than the size limit")
            out.append(chunk)
        return "".join(out)
    except GlmExportError:
        raise
    except jinja2.TemplateError as e:
        raise TokenizerError(f"{where}: chat_template failed to render ({first_line(e)})") from None
    except Exception as e:  # the template's own failure (ZeroDivisionError, RecursionError, ...), reported as such
        raise TokenizerError(f"{where}: chat_template failed to render ({type(e).__name__}: {first_line(e)})") \
            from None
    finally:
        sys.settrace(previous)


# -- message text kept as text ----------------------------------------------------------------------------------


def _wrap(value: Any, where: str) -> Any:
    if isinstance(value, str):
        if OPEN in value or CLOSE in value:
            raise GenerationError(f"{where}: contains U+FDD0 or U+FDD1, which are not characters; remove them")
        return OPEN + value + CLOSE if value else value
    if isinstance(value, Mapping):
        return {k: (v if k == "role" else _wrap(v, f"{where}.{k}")) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wrap(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def wrap_messages(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The messages with every string (except the role) wrapped in OPEN ... CLOSE marks."""
    return [_wrap(dict(m), f"chat message {i}") for i, m in enumerate(messages)]


def encode_rendered(tok, text: str) -> List[int]:
    """Ids of rendered template text whose message strings are wrapped in marks (see ``wrap_messages``).

    Template text outside the marks may hold special-token text (its own ``<|user|>``, ``[gMASK]``...), which
    becomes the special ids; everything else, message text included, is encoded as plain text in runs that end
    only at those template specials."""
    specials = tok.template_tokens()
    pattern = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")") \
        if specials else None
    ids: List[int] = []
    run: List[str] = []

    def flush() -> None:
        if run:
            ids.extend(tok.encode("".join(run)))
            run.clear()

    depth = 0
    for part in re.split("([" + OPEN + CLOSE + "])", text):
        if part == OPEN:
            depth += 1
        elif part == CLOSE:
            depth -= 1
            if depth < 0:
                raise TokenizerError("chat_template altered message text (unbalanced marks); cannot keep it as text")
        elif depth > 0 or pattern is None:
            run.append(part)
        else:
            for i, piece in enumerate(pattern.split(part)):
                if i % 2:
                    flush()
                    ids.append(specials[piece])
                elif piece:
                    run.append(piece)
    if depth != 0:
        raise TokenizerError("chat_template altered message text (unbalanced marks); cannot keep it as text")
    flush()
    return ids
