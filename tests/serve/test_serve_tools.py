"""Tool calls: the parser on the exact ChatGLM3 and GLM-4 output formats, the prompt rendering on exact ids, and the
server returning ``tool_calls`` when a model is forced to emit a call (a backend whose logits spell fixed ids).
Also the queue-full (429) and shutting-down (503) answers, which need a scheduler the test controls."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from runtime.api import GlmModel
from runtime.sampling import GenerationConfig
from runtime.serve.app import ServeOptions
from runtime.serve.messages import ContextError, chat_prompt
from runtime.serve.scheduler import Scheduler, ServeRequest
from runtime.serve.tools import ToolCall, parse_tool_call
from serve_helpers import server_thread

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
NAMES = ["get_weather"]


@pytest.fixture(scope="module")
def chatglm3(tiny_models):
    with GlmModel.load(tiny_models.bundle("serve", tiny_models.checkpoint("serve", "chatglm3", "thudm")),
                       threads=1, graph="portable") as m:  # the scheduler joins Concat caches
        yield m


@pytest.fixture(scope="module")
def glm4(tiny_models):
    with GlmModel.load(tiny_models.case("glm4-thudm")[1], threads=1, graph="portable") as m:
        yield m


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text,want", [
    ("get_weather\n```python\ntool_call(location='Beijing', unit='celsius')\n```",
     ToolCall("get_weather", '{"location": "Beijing", "unit": "celsius"}')),
    ("get_weather\n```python\ntool_call(days=[1, 2], exact=True, note=None)\n```",
     ToolCall("get_weather", '{"days": [1, 2], "exact": true, "note": null}')),
    ("\nget_weather\n```python\ntool_call()\n```", ToolCall("get_weather", "{}")),
    ("get_weather\n{\"location\": \"Beijing\"}", ToolCall("get_weather", '{"location": "Beijing"}')),
], ids=["kwargs", "literals", "no-args", "json-body"])
def test_chatglm3_tool_call_output(text, want):
    assert parse_tool_call("chatglm3", text, NAMES) == want


@pytest.mark.parametrize("text,want", [
    ('get_weather\n{"location": "北京", "days": 3}', ToolCall("get_weather", '{"location": "北京", "days": 3}')),
    ('get_weather\n{\n    "location": "Beijing"\n}', ToolCall("get_weather", '{"location": "Beijing"}')),
], ids=["one-line", "indented"])
def test_glm4_tool_call_output(text, want):
    assert parse_tool_call("glm4", text, NAMES) == want


@pytest.mark.parametrize("fmt,text", [
    ("chatglm3", "get_weather\n```python\ntool_call(location=__import__('os').system('true'))\n```"),  # not literal
    ("chatglm3", "get_weather\n```python\nprint('x')\n```"),
    ("chatglm3", "get_weather\n```python\ntool_call('Beijing')\n```"),  # positional
    ("chatglm3", "get_weather\n```python\ntool_call(x={1, 2})\n```"),  # a set: no JSON for it
    ("glm4", "get_weather\n{\"location\": "),  # truncated JSON
    ("glm4", "get_weather\n[1, 2]"),  # not an object
    ("glm4", "delete_files\n{}"),  # not one of the offered tools
    ("glm4", "The weather is fine today."),  # plain reply
    ("glm4", "get_weather"),  # a name without arguments
], ids=["call-in-args", "not-tool-call", "positional", "set", "truncated", "array", "unknown-tool", "plain",
        "bare-name"])
def test_malformed_tool_output_is_plain_content(fmt, text):
    assert parse_tool_call(fmt, text, NAMES) is None


# ------------------------------------------------------------------------------------------------ rendering


def test_chatglm3_tools_render_as_the_system_message_with_tools(chatglm3):
    tok = chatglm3.tokenizer
    msgs = [{"role": "user", "content": "weather in Beijing?"}]
    ids = chat_prompt(tok, chatglm3.spec, msgs, chatglm3.context_length, 16, tools=[WEATHER]).ids
    sid = tok.token_to_id
    system = ("Answer the following questions as best as you can. You have access to the following tools:\n"
              + json.dumps([WEATHER["function"]], indent=4, ensure_ascii=False))
    want = (tok.prefix_ids() + [sid("<|system|>")] + tok.encode("\n") + tok.encode(system)
            + [sid("<|user|>")] + tok.encode("\n") + tok.encode("weather in Beijing?") + [sid("<|assistant|>")])
    assert ids == want


def test_chatglm3_call_and_result_in_history(chatglm3):
    tok = chatglm3.tokenizer
    sid = tok.token_to_id
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"location": "Beijing"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 20}'}]
    ids = chat_prompt(tok, chatglm3.spec, msgs, chatglm3.context_length, 16).ids
    want = (tok.prefix_ids() + [sid("<|user|>")] + tok.encode("\n") + tok.encode("weather?")
            + [sid("<|assistant|>")] + tok.encode("get_weather\n")
            + tok.encode("```python\ntool_call(location='Beijing')\n```")
            + [sid("<|observation|>")] + tok.encode("\n") + tok.encode('{"temperature": 20}')
            + [sid("<|assistant|>")])
    assert ids == want


def test_glm4_tools_render_as_its_tool_system_prompt(glm4):
    tok = glm4.tokenizer
    sid = tok.token_to_id
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"location": "Beijing"}'}}]},
            {"role": "tool", "content": "sunny"}]
    ids = chat_prompt(tok, glm4.spec, msgs, glm4.context_length, 16, tools=[WEATHER]).ids
    tool_prompt = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                   "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n"
                   + json.dumps(WEATHER["function"], ensure_ascii=False, indent=4)
                   + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
    want = ([sid("[gMASK]"), sid("<sop>"), sid("<|system|>")] + tok.encode("\n" + tool_prompt)
            + [sid("<|system|>")] + tok.encode("\nBe brief.")
            + [sid("<|user|>")] + tok.encode("\nweather?")
            + [sid("<|assistant|>")] + tok.encode('get_weather\n{"location": "Beijing"}')
            + [sid("<|observation|>")] + tok.encode("\nsunny") + [sid("<|assistant|>")])
    assert ids == want


def test_no_truncate_refuses_with_the_limit(chatglm3):
    tok, spec = chatglm3.tokenizer, chatglm3.spec
    msgs = [{"role": "user", "content": "tea " * 50}, {"role": "assistant", "content": "cup " * 50},
            {"role": "user", "content": "hello"}]
    full = chat_prompt(tok, spec, msgs, 4096, 16).ids
    context = len(full) - 10
    with pytest.raises(ContextError, match=f"context holds {context}"):
        chat_prompt(tok, spec, msgs, context, 16, truncate=False)
    cut = chat_prompt(tok, spec, msgs, context, 16)
    assert cut.dropped_messages == 2 and cut.ids == chat_prompt(tok, spec, msgs[2:], 4096, 16).ids


# ------------------------------------------------------------------------------------------------ end to end


class ForcedBackend:
    """Delegates to a real backend but replaces its logits so that greedy decoding spells ``script``: the last
    prefill forward gives script[0], decode step k gives script[k], then the last id repeats."""

    def __init__(self, inner, script):
        self._inner, self._script, self._k = inner, list(script), 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward(self, input_ids, attention_mask, position_ids, cache):
        logits, cache_out = self._inner.forward(input_ids, attention_mask, position_ids, cache)
        self._k = 0 if (input_ids.shape[1] > 1 or cache.length == 0) else self._k + 1
        forced = np.full_like(logits, -1e4)  # [batch, vocab]
        forced[:, self._script[min(self._k, len(self._script) - 1)]] = 1e4
        return forced, cache_out


@pytest.fixture
def forced(tiny_models):
    def make(text):
        model = GlmModel.load(tiny_models.bundle("serve", tiny_models.checkpoint("serve", "chatglm3", "thudm")),
                              threads=1, graph="portable")
        tok = model.tokenizer
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        model.backend = ForcedBackend(model.backend, ids + [tok.token_to_id("<|observation|>")])
        return model
    return make


CALL_TEXT = "get_weather\n```python\ntool_call(location='Beijing')\n```"


def test_server_returns_tool_calls_for_a_forced_call(forced):
    model = forced(CALL_TEXT)
    with server_thread(model, Scheduler(model, prefix_cache_bytes=0), ServeOptions(model_name="m")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)
        msgs = [{"role": "user", "content": "weather in Beijing?"}]
        r = client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER], temperature=0, max_tokens=64)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call-")
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"location": "Beijing"}

        chunks = list(client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER], temperature=0,
                                                     max_tokens=64, stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        calls = [d.tool_calls for d in deltas if d.tool_calls]
        assert len(calls) == 1 and calls[0][0].function.name == "get_weather" and calls[0][0].index == 0
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # without tools in the request the same output is plain text
        plain = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=64)
        assert plain.choices[0].message.content == CALL_TEXT and plain.choices[0].finish_reason == "stop"
    model.close()


def test_malformed_forced_call_comes_back_as_content(forced):
    text = "get_weather\n```python\ntool_call(location=\n```"
    model = forced(text)
    with server_thread(model, Scheduler(model, prefix_cache_bytes=0), ServeOptions(model_name="m")) as base:
        r = httpx.post(base + "/v1/chat/completions", timeout=30, json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "temperature": 0})
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == text
        assert "tool_calls" not in choice["message"]
    model.close()


def test_queue_full_is_429_and_shutdown_503(chatglm3):
    scheduler = Scheduler(chatglm3, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    with server_thread(chatglm3, scheduler, ServeOptions(model_name="m"), start_scheduler=False) as base:
        for _ in range(2):  # one for the free row, one for --max-queue 1
            scheduler.submit(ServeRequest([1, 2, 3], GenerationConfig(max_new_tokens=2), lambda e: None))
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        scheduler.stop()
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"


class SlowBackend(ForcedBackend):
    def forward(self, *args):
        import time

        time.sleep(0.03)
        return super().forward(*args)


def test_tokens_slower_than_the_disconnect_poll_still_complete(tiny_models, monkeypatch):
    """A plain (non-streamed) reply waits through many disconnect polls without losing its events."""
    from runtime.serve import app

    monkeypatch.setattr(app, "DISCONNECT_POLL_S", 0.005)
    model = GlmModel.load(tiny_models.bundle("serve", tiny_models.checkpoint("serve", "chatglm3", "thudm")),
                          threads=1, graph="portable")
    ids = model.tokenizer.encode(CALL_TEXT)
    model.backend = SlowBackend(model.backend, ids + [model.tokenizer.token_to_id("<|observation|>")])
    with server_thread(model, Scheduler(model, prefix_cache_bytes=0), ServeOptions(model_name="m")) as base:
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == CALL_TEXT
    model.close()
