"""OpenAI chat messages -> the model's prompt ids, with history cut to fit the context.

Where it stands: ``runtime.serve.app`` validates the request (``runtime.serve.protocol``) and calls
:func:`chat_prompt`; the ids come from ``runtime.chat.build_chat_ids`` (the same code ``glm-export run --chat``
uses, so the server's prompt equals the CLI's for the same messages).

Roles: system, user, assistant (with ``tool_calls`` rendered as the model wrote them, ``runtime.serve.tools``),
tool (the model's observation role). Content is a string or a list of text parts.

History that does not fit: by default the oldest turns go first (a turn is a user message and everything after it
up to the next user message), keeping every system message and the last turn, until the prompt leaves room for
``max_tokens`` new tokens (or, when even the last turn alone does not, room for one). Truncation is the default
because chat clients resend the whole conversation every turn: a long chat should keep working, as it does with
the model's own demos; ``--no-truncate`` refuses instead (400 with the limit).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

from runtime.chat import build_chat_ids
from runtime.errors import GenerationError
from runtime.serve import tools as tool_formats


class ContextError(GenerationError):
    """The prompt does not fit the model's context (HTTP 400, naming the limit)."""


class ChatPrompt(NamedTuple):
    ids: List[int]
    dropped_messages: int  # cut from the front of the history to fit
    tool_names: List[str]  # the tools offered to the model (empty: tool calls are not parsed)


def content_text(content: Any, where: str) -> str:
    """A message's content: a string, a list of {"type": "text", "text": ...} parts, or None (empty)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise GenerationError(f"{where}.content[{i}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise GenerationError(f"{where}.content must be a string or a list of text parts")


def to_chat_messages(messages: Sequence[Mapping[str, Any]], chat_format: str) -> List[Dict[str, Any]]:
    """OpenAI messages -> runtime.chat messages (role, content, metadata)."""
    out: List[Dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        text = content_text(m.get("content"), where)
        if role in ("system", "user"):
            out.append({"role": role, "content": text})
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            if text or not calls:
                out.append({"role": "assistant", "content": text})
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise GenerationError(f"{where}.tool_calls[{j}] must have a function with a name")
                out.append(tool_formats.call_message(chat_format, fn["name"], str(fn.get("arguments") or "")))
        elif role == "tool":
            tool_formats.require_tool_format(chat_format)
            out.append({"role": "observation", "content": text})
        else:
            raise GenerationError(f"{where}.role {role!r}: expected system, user, assistant or tool")
    if not any(m["role"] == "user" for m in out):
        raise GenerationError("messages: give at least one user message")
    return out


def _turn_starts(messages: Sequence[Mapping[str, Any]]) -> List[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def chat_prompt(tokenizer, spec, messages: Sequence[Mapping[str, Any]], context_length: int, max_tokens: int,
                tools: Optional[Sequence[Mapping[str, Any]]] = None, truncate: bool = True) -> ChatPrompt:
    """Prompt ids for an OpenAI conversation (and tools), cut to fit ``context_length`` when ``truncate``."""
    functions = tool_formats.functions_of(tools or [])
    chat = to_chat_messages(messages, spec.chat_format)
    head = [tool_formats.tools_system_message(spec.chat_format, functions)] if functions else []
    names = [f["name"] for f in functions]

    def ids_of(msgs: List[Dict[str, Any]]) -> List[int]:
        return list(build_chat_ids(tokenizer, spec, head + msgs))

    ids = ids_of(chat)
    want = max(1, context_length - max_tokens)  # prompt ids that leave room for max_tokens
    if len(ids) <= want or (not truncate and len(ids) < context_length):
        return ChatPrompt(ids, 0, names)
    if not truncate:
        raise ContextError(f"the prompt is {len(ids)} tokens, but the context holds {context_length} (at most "
                           f"{context_length - 1} prompt tokens); shorten the conversation")
    dropped = 0
    kept = list(chat)
    while len(ids) > want:
        starts = _turn_starts(kept)
        if len(starts) < 2:
            break  # only the last turn is left
        cut_from, cut_to = starts[0], starts[1]
        systems = [m for m in kept[cut_from:cut_to] if m["role"] == "system"]  # system messages always stay
        dropped += cut_to - cut_from - len(systems)
        kept = kept[:cut_from] + systems + kept[cut_to:]
        ids = ids_of(kept)
    if len(ids) >= context_length:
        raise ContextError(f"the last turn alone is {len(ids)} prompt tokens, but the context holds "
                           f"{context_length} (at most {context_length - 1} prompt tokens); shorten the message")
    return ChatPrompt(ids, dropped, names)
