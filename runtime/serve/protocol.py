"""The OpenAI wire format: request models (validated with pydantic), response and stream-chunk builders, error shapes.

Where it stands: ``runtime.serve.app`` parses every body with :func:`parse_request` and answers with the builders
here. Field names, defaults and shapes follow OpenAI's Chat Completions and (legacy) Completions APIs:

- ``temperature`` 0 means greedy; omitted means OpenAI's default 1.0 (sampling). ``top_p`` defaults to 1.
- ``n`` must be 1; ``logprobs``, a non-zero ``frequency_penalty``/``presence_penalty`` and ``echo`` are refused
  (400 naming the field) rather than silently ignored. ``top_k`` and ``repetition_penalty`` are accepted as
  extensions (``extra_body`` in the openai client). Unknown fields are refused, as OpenAI does.
- Errors: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status of :class:`APIError`.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.errors import GlmExportError

FINISH_TO_OPENAI = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class APIError(GlmExportError):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)  # extension
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)  # extension
    seed: Optional[int] = Field(default=None, ge=0)
    stop: Optional[Union[str, List[str]]] = None
    n: Optional[int] = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logprobs: Optional[Union[bool, int]] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise bad_request("n: only 1 choice per request is supported", "n")
        if self.logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported (use repetition_penalty)", name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")


class ChatCompletionRequest(_Sampling):
    messages: List[Dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[Dict[str, Any]] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format not in (None, {"type": "text"}):
            raise bad_request("response_format: only {\"type\": \"text\"} is supported", "response_format")
        choice = self.tool_choice
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise bad_request("tool_choice must be 'none', 'auto', 'required' or a function", "tool_choice")
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request("tool_choice must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                                  "tool_choice")
            if not any(isinstance(t, dict) and (t.get("function") or {}).get("name") == fn["name"]
                       for t in self.tools or []):
                raise bad_request(f"tool_choice names {fn['name']!r}, which is not in tools", "tool_choice")

    def offered_tools(self) -> List[Dict[str, Any]]:
        """The tools to show the model: none for tool_choice "none", only the named one for a function choice."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [t for t in self.tools if (t.get("function") or {}).get("name") == name]
        return list(self.tools)


class CompletionRequest(_Sampling):
    prompt: Union[str, List[int], List[str], List[List[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise bad_request("best_of: only 1 is supported", "best_of")

    def single_prompt(self) -> Union[str, List[int]]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (list, str)):
            if len(p) != 1:
                raise bad_request("prompt: one prompt per request is supported", "prompt")
            p = p[0]
        if isinstance(p, (str, list)) and len(p) == 0:
            raise bad_request("prompt is empty", "prompt")
        return p


def parse_request(body: bytes, model_cls):
    """Bytes -> a validated request model; APIError 400 for bad JSON, wrong types or values."""
    try:
        data = json.loads(body.decode("utf-8") if body else "")
    except (UnicodeDecodeError, ValueError) as e:
        raise bad_request(f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    try:
        req = model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = tuple(err.get("loc", ()))
        loc = ".".join(str(p) for p in where)
        param = str(where[0]) if where else None  # the request field, as OpenAI names it
        if err.get("type") == "extra_forbidden":
            raise bad_request(f"unrecognized request argument: {loc}", param) from None
        raise bad_request(f"{loc}: {err.get('msg')}", param) from None
    req.check_supported()
    return req


# ---------------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tool_calls_field(calls) -> List[Dict[str, Any]]:
    return [{"id": new_id("call"), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  calls=None) -> Dict[str, Any]:
    message: Dict[str, Any] = {"role": "assistant", "content": None if calls else text}
    if calls:
        message["tool_calls"] = tool_calls_field(calls)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: Dict[str, Any],
               finish: Optional[str] = None) -> Dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int,
                completion_tokens: int) -> Dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                        completion_tokens: int) -> Dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: Optional[str] = None) -> Dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
