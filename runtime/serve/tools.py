"""Tool calls in the models' own formats: OpenAI ``tools`` -> the system message the model was trained with, the
model's call -> OpenAI ``tool_calls``, and a call in the history -> the assistant message the model wrote.

Where it stands: ``runtime.serve.messages`` builds the chat messages (then ``runtime.chat`` the ids) with these
pieces; ``runtime.serve.app`` parses the generated text. Formats, as THUDM published them:

ChatGLM3 (tokenizer's tool mode)::

    <|system|>\\nAnswer the following questions as best as you can. You have access to the following tools:\\n
    [ {function}, ... ]                      (json.dumps(functions, indent=4, ensure_ascii=False), by runtime.chat)
    ...
    <|assistant|>get_weather\\n```python\\ntool_call(location='Beijing')\\n```<|observation|>
    <|observation|>\\n{"temperature": 20}    (the tool's result, role "tool")

GLM-4-9B-chat (its chat template's tool system prompt)::

    <|system|>\\n你是一个名为 ChatGLM 的人工智能助手。...\\n\\n# 可用工具\\n\\n## get_weather\\n\\n{function, indent 4}
    \\n在调用上述函数时，请使用 Json 格式表示调用的参数。
    <|assistant|>get_weather\\n{"location": "Beijing"}<|observation|>

The call's first line (the assistant message's metadata) is the tool's name; what follows is its arguments. A name
that is not one of the request's tools, or arguments that do not parse, leave the text as plain content. The
ChatGLM3 ``tool_call(...)`` form is read with ``ast`` (literals only), never evaluated.
"""
from __future__ import annotations

import ast
import json
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

from runtime.errors import GenerationError
from runtime.spec import CHAT_CHATGLM3, CHAT_GLM4

CHATGLM3_TOOL_PROMPT = ("Answer the following questions as best as you can. "
                        "You have access to the following tools:")
GLM4_TOOL_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_TOOL_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
TOOL_FORMATS = (CHAT_CHATGLM3, CHAT_GLM4)


class ToolCall(NamedTuple):
    name: str
    arguments: str  # a JSON object, as OpenAI's tool_calls carry it


def functions_of(tools: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The ``function`` objects of OpenAI tools ({"type": "function", "function": {...}}), checked."""
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn, Mapping) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GenerationError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        out.append(dict(fn))
    return out


def require_tool_format(chat_format: str) -> None:
    if chat_format not in TOOL_FORMATS:
        raise GenerationError(f"this model's chat format ({chat_format}) has no tool-call format; tools work with "
                              f"{' and '.join(TOOL_FORMATS)} models")


def tools_system_message(chat_format: str, functions: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The system message that presents ``functions`` to the model in its own format."""
    require_tool_format(chat_format)
    if chat_format == CHAT_CHATGLM3:
        return {"role": "system", "content": CHATGLM3_TOOL_PROMPT, "tools": [dict(f) for f in functions]}
    text = GLM4_TOOL_PROMPT
    for f in functions:
        text += "\n\n## %s\n\n%s%s" % (f["name"], json.dumps(dict(f), ensure_ascii=False, indent=4), GLM4_TOOL_SUFFIX)
    return {"role": "system", "content": text}


def call_message(chat_format: str, name: str, arguments: str) -> Dict[str, Any]:
    """A tool call from the history (OpenAI ``tool_calls`` entry) as the assistant message the model wrote."""
    require_tool_format(chat_format)
    try:
        args = json.loads(arguments) if arguments else {}
    except ValueError:
        raise GenerationError(f"tool call {name!r}: arguments are not JSON") from None
    if not isinstance(args, dict):
        raise GenerationError(f"tool call {name!r}: arguments must be a JSON object")
    if chat_format == CHAT_CHATGLM3:
        call = "tool_call(%s)" % ", ".join("%s=%r" % (k, v) for k, v in args.items())
        return {"role": "assistant", "metadata": name, "content": "```python\n%s\n```" % call}
    return {"role": "assistant", "metadata": name, "content": json.dumps(args, ensure_ascii=False)}


def parse_tool_call(chat_format: str, text: str, names: Sequence[str]) -> Optional[ToolCall]:
    """The tool call in the model's output text, or None when it is not one (plain content)."""
    if chat_format not in TOOL_FORMATS:
        return None
    head, sep, body = text.strip().partition("\n")
    name = head.strip()
    if not sep or name not in names:
        return None
    body = body.strip()
    if chat_format == CHAT_CHATGLM3:
        args = _chatglm3_arguments(body)
    else:
        args = _json_object(body)
    if args is None:
        return None
    try:
        return ToolCall(name, json.dumps(args, ensure_ascii=False))
    except (TypeError, ValueError):  # a literal JSON cannot hold (a set, bytes, a complex number)
        return None


def _json_object(text: str) -> Optional[Dict[str, Any]]:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _chatglm3_arguments(body: str) -> Optional[Dict[str, Any]]:
    """```python\\ntool_call(a=1, b='x')\\n``` (fences optional) -> {"a": 1, "b": "x"}; a JSON object also works."""
    lines = body.split("\n")
    if lines and lines[0].startswith("```"):
        lines = lines[1:]
        if lines and lines[-1].strip().startswith("```"):
            lines = lines[:-1]
    code = "\n".join(lines).strip()
    if code.startswith("{"):
        return _json_object(code)
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
            and not call.args and all(k.arg is not None for k in call.keywords)):
        return None
    try:
        return {str(k.arg): ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, SyntaxError, TypeError):
        return None
