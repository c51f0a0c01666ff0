"""Chat formats of the ChatGLM family: messages -> prompt ids, and the ids that end an assistant turn.

Where this stands in the flow: the manifest's ``spec.chat_format`` names the format; ``build_chat_ids`` turns
[{"role": ..., "content": ...}, ...] into prompt ids with the bundle's tokenizer (``runtime.tokenizer``), and
``chat_stop_ids`` gives the ids that end the model's turn. Only the standard library is imported here; jinja2 is
imported by the ``template`` format alone. Runs on Python 3.8.
"""
from __future__ import annotations

import json
from typing import Any, List, Mapping, Sequence, Set, Tuple

from runtime.chat_template import encode_rendered, render, wrap_messages
from runtime.errors import GenerationError, TokenizerError
from runtime.spec import CHAT_CHATGLM1, CHAT_CHATGLM2, CHAT_CHATGLM3, CHAT_GLM4, CHAT_TEMPLATE, ModelSpec
from runtime.tokenizer import TOKENIZER_CONFIG_FILE, Tokenizer
from runtime.user_input import check_text

CHAT_ROLES = ("system", "user", "assistant", "observation")
_ROLE_ALIASES = {"tool": "observation"}  # OpenAI-style name for a tool result


# ---------------------------------------------------------------------------------------------------------------
# Chat formats
# ---------------------------------------------------------------------------------------------------------------


def _role_of(message: Any, index: int) -> str:
    """The message's role, checked; "tool" is read as "observation"."""
    if not isinstance(message, Mapping) or not isinstance(message.get("content", ""), str):
        raise GenerationError(f"chat message {index} must be a mapping with a string 'content'")
    role = _ROLE_ALIASES.get(message.get("role"), message.get("role"))
    if role not in CHAT_ROLES:
        raise GenerationError(f"chat message {index} has role {message.get('role')!r}; expected one of {CHAT_ROLES}")
    check_text(message.get("content", ""), f"chat message {index} content", max_chars=None)
    return role


def _alternating(messages: Sequence[Mapping[str, Any]], fmt: str) -> List[Tuple[str, str]]:
    """(role, content) of messages that alternate user, assistant from user (ChatGLM-6B and ChatGLM2: no system or
    observation role); GenerationError naming the first message out of turn."""
    out = []
    for i, m in enumerate(messages):
        role = _role_of(m, i)
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise GenerationError(f"{fmt} chat: message {i} is {role!r}; messages alternate user, assistant "
                                  "(no system or observation role in this format)")
        out.append((role, m.get("content", "")))
    return out


def _chatglm1_ids(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> List[int]:
    """ChatGLM-6B (v1), as its published ``chat`` builds the prompt: a question without history is sent as it is;
    with history, "[Round i]\n问：{q}\n答：{a}\n" for each earlier round (counted from 0), then
    "[Round n]\n问：{q}\n答："; the ids end with [gMASK] <sop> (``encode_prompt``).

    Messages alternate user/assistant starting with user; there is no system role.
    """
    rounds = []  # (question, answer or None)
    for role, content in _alternating(messages, "chatglm1"):
        if role == "user":
            rounds.append((content, None))
        else:
            rounds[-1] = (rounds[-1][0], content)
    open_question = rounds[-1][1] is None
    if open_question and len(rounds) == 1:
        text = rounds[0][0]
    else:
        text = "".join("[Round %d]\n问：%s\n答：%s\n" % (i, q, a) for i, (q, a) in enumerate(rounds) if a is not None)
        if open_question:
            text += "[Round %d]\n问：%s\n答：" % (len(rounds) - 1, rounds[-1][0])
    return tok.encode_prompt(text)


def _chatglm2_ids(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> List[int]:
    """ChatGLM2: plain text "[Round n]\\n\\n问：{q}\\n\\n答：{a}\\n\\n" from round 1, after the prefix ids.

    Messages alternate user/assistant starting with user; there is no system role. The generation prompt is the
    trailing "\\n\\n答：" of an unanswered question.
    """
    text = ""
    for i, (role, content) in enumerate(_alternating(messages, "chatglm2")):
        if role == "user":
            text += "[Round %d]\n\n问：%s" % (i // 2 + 1, content)
            if i + 1 < len(messages) or add_generation_prompt:
                text += "\n\n答："
        else:
            text += content + "\n\n"
    return tok.prefix_ids() + tok.encode(text)


def _chatglm3_ids(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> List[int]:
    """ChatGLM3: prefix, then per message <|role|> + encode(metadata + "\\n") + encode(content), role tokens by id.

    A system message's "tools" list is appended to its content as indented JSON, as THUDM's tokenizer does.
    """
    ids = tok.prefix_ids()
    for i, m in enumerate(messages):
        role, content = _role_of(m, i), m.get("content", "")
        if role == "system" and m.get("tools"):
            content = content + "\n" + json.dumps(m["tools"], indent=4, ensure_ascii=False)
        ids.append(tok.token_to_id("<|%s|>" % role))
        ids.extend(tok.encode(str(m.get("metadata") or "") + "\n"))
        ids.extend(tok.encode(content))
    if add_generation_prompt:
        ids.append(tok.token_to_id("<|assistant|>"))
    return ids


def _glm4_ids(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> List[int]:
    """GLM-4: [gMASK]<sop>, then per message <|role|> + encode(metadata + "\\n" + content), then <|assistant|>."""
    ids = tok.prefix_ids()
    for i, m in enumerate(messages):
        role, content = _role_of(m, i), m.get("content", "")
        ids.append(tok.token_to_id("<|%s|>" % role))
        ids.extend(tok.encode(str(m.get("metadata") or "") + "\n" + content))
    if add_generation_prompt:
        ids.append(tok.token_to_id("<|assistant|>"))
    return ids


def _template_ids(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> List[int]:
    """The checkpoint's own jinja chat_template, rendered; special-token text in the template becomes special ids,
    message text (user, system, tool, assistant) is encoded as plain text, whatever it contains."""
    if not tok.chat_template:
        raise TokenizerError(f"chat format 'template' but the bundle's {TOKENIZER_CONFIG_FILE} has no chat_template")
    extra = {k: tok.config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in tok.config}
    for i, m in enumerate(messages):
        _role_of(m, i)
    # message strings are wrapped in marks, so only the template's own special-token text becomes special ids
    text = render_chat_template(tok.chat_template, wrap_messages(messages), add_generation_prompt, **extra)
    return encode_rendered(tok, text)


_CHAT_BUILDERS = {
    CHAT_CHATGLM1: _chatglm1_ids,
    CHAT_CHATGLM2: _chatglm2_ids,
    CHAT_CHATGLM3: _chatglm3_ids,
    CHAT_GLM4: _glm4_ids,
    CHAT_TEMPLATE: _template_ids,
}


def build_chat_ids(
    tokenizer: Tokenizer,
    spec: ModelSpec,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
) -> List[int]:
    """Prompt ids for a conversation [{"role": ..., "content": ...}, ...] in the model's chat format.

    Roles: system, user, assistant, observation ("tool" is read as observation); an optional "metadata" string is
    used by chatglm3/glm4. GenerationError for malformed messages, TokenizerError when the bundle has no chat format.
    """
    if not messages:
        raise GenerationError("a chat needs at least one message")
    builder = _CHAT_BUILDERS.get(spec.chat_format)
    if builder is None:
        raise TokenizerError(f"the model has no chat format (chat_format {spec.chat_format!r}); use a plain prompt")
    return builder(tokenizer, list(messages), add_generation_prompt)


def chat_stop_ids(tokenizer: Tokenizer, spec: ModelSpec) -> Set[int]:
    """Ids that end an assistant turn: every eos id, plus <|user|> and <|observation|> where they exist."""
    stop = set(tokenizer.eos_ids) | {int(i) for i in spec.eos_token_ids}
    stop |= {tokenizer.special_ids[n] for n in ("<|user|>", "<|observation|>") if n in tokenizer.special_ids}
    return stop


# -- jinja rendering: runtime.chat_template (sandboxed, time and size limits, message text kept as text) ---------


def render_chat_template(
    template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **variables: Any
) -> str:
    """The text a jinja chat template renders for messages (tools, bos_token, ... may be given as variables).

    Written here rather than calling transformers' apply_chat_template because the runtime may not import
    transformers; the environment mirrors transformers' (sandboxed, trim_blocks, lstrip_blocks, loop controls,
    tojson without ASCII escaping, raise_exception, strftime_now) so templates render the same text."""
    return render(template, TOKENIZER_CONFIG_FILE, messages=[dict(m) for m in messages],
                  add_generation_prompt=add_generation_prompt, **variables)
