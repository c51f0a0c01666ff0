"""glm-export serve as a real process on 127.0.0.1, through real clients (the openai package and raw httpx): replies
equal `glm-export run` greedy output, the stream is OpenAI's SSE, usage counts, every error case, 32 concurrent
streaming clients, and clients that drop mid-stream."""
from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from click.testing import CliRunner

from exporter.cli import main
from runtime.api import GlmModel
from runtime.sampling import GenerationConfig
from serve_helpers import metrics, server_process

openai = pytest.importorskip("openai")

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny-glm"
SYSTEM = "You are a helpful assistant."
WORDS = ["hello", "world", "the", "model", "green", "tea", "cup", "of", "text", "chat"]


@pytest.fixture(scope="module")
def bundle(tiny_models):
    return tiny_models.bundle("serve", tiny_models.checkpoint("serve", "chatglm3", "thudm"))


@pytest.fixture(scope="module")
def model(bundle):
    with GlmModel.load(bundle, threads=1, graph="portable") as m:  # the scheduler joins Concat caches
        yield m


@pytest.fixture(scope="module")
def server(bundle):
    with server_process(bundle, "--api-key", KEY, "--model-name", NAME, "--max-batch", "8") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def cli_chat(bundle, prompt, max_new, system=None):
    args = ["run", "--model", bundle, "--chat", "--prompt", prompt, "--greedy", "--max-new-tokens", str(max_new),
            "--threads", "1", "--json"]
    if system is not None:
        args += ["--system", system]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_chat_plain_and_streamed_equal_cli_greedy(bundle, client):
    want = cli_chat(bundle, "hello the model", 24, system=SYSTEM)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello the model"}]
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.model == NAME and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[want["finish_reason"]]
    assert r.usage.prompt_tokens == len(want["prompt_ids"])
    assert r.usage.completion_tokens == len(want["generated_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["generated_ids"])
    assert chunks[-1].usage.prompt_tokens == len(want["prompt_ids"])


def test_sse_chunks_have_openai_shape_and_end_with_done(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "green tea"}], "temperature": 0,
            "max_tokens": 10, "stream": True}
    events = []
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith(":") or not line:
                continue  # comments (keep-alive pings) and event separators
            assert line.startswith("data: "), line
            events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == NAME and isinstance(c["created"], int)
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_equal_cli_run(bundle, client):
    r = CliRunner().invoke(main, ["run", "--model", bundle, "--prompt", "the model", "--max-new-tokens", "12",
                                  "--threads", "1", "--json"], catch_exceptions=False)
    want = json.loads(r.stdout)
    got = client.completions.create(model=NAME, prompt="the model", max_tokens=12, temperature=0)
    assert got.choices[0].text == want["text"]
    assert got.usage.prompt_tokens == len(want["prompt_ids"])
    assert got.usage.completion_tokens == len(want["generated_ids"])
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="the model", max_tokens=12,
                                                                     temperature=0, stream=True)]
    assert "".join(pieces) == want["text"]
    ids = client.completions.create(model=NAME, prompt=want["prompt_ids"], max_tokens=12, temperature=0)
    assert ids.choices[0].text == want["text"]


def test_seeded_sampling_reproduces(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "chat of text"}], temperature=0.9, top_p=0.9,
              seed=7, max_tokens=16)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server + "/health", timeout=5).json()["status"] == "ok"
    m = metrics(server, AUTH)
    for name in ("glm_queue_depth", "glm_active_rows", "glm_generated_tokens_total", "glm_tokens_per_second",
                 'glm_time_to_first_token_seconds{quantile="0.5"}', "glm_time_to_first_token_seconds_count"):
        assert name in m, name
    assert m['glm_requests_total{endpoint="/v1/models",code="200"}'] >= 1


def _long_text(n_words):
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


ERRORS = [
    ("bad-json", "/v1/chat/completions", b"{not json", 400, None),
    ("not-object", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("unknown-field", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}],
                                               "frobnicate": 1}, 400, "frobnicate"),
    ("no-messages", "/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("bad-role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "a"}]}, 400,
     "messages"),
    ("temperature", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}],
                                             "temperature": 3}, 400, "temperature"),
    ("n", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}], "n": 2}, 400, "n"),
    ("max-tokens", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}],
                                            "max_tokens": 0}, 400, "max_tokens"),
    ("stop-type", "/v1/completions", {"model": NAME, "prompt": "a", "stop": 5}, 400, "stop"),
    ("vocab", "/v1/completions", {"model": NAME, "prompt": [1, 10 ** 9]}, 400, "prompt"),
    ("unknown-model", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]},
     404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_client_mistakes_get_openai_errors(server, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + path, headers=dict(AUTH, **{"content-type": "application/json"}), timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
    assert err["param"] == param


def test_prompt_over_the_context_is_400_with_the_limit(server, model):
    limit = model.context_length
    r = httpx.post(server + "/v1/completions", headers=AUTH, timeout=30,
                   json={"model": NAME, "prompt": [5] * (limit + 3)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert str(limit) in r.json()["error"]["message"]
    # a chat whose last turn alone cannot fit is refused even with truncation on
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"model": NAME, "messages": [{"role": "user", "content": _long_text(limit)}]})
    assert r.status_code == 400 and str(limit) in r.json()["error"]["message"]


def test_long_history_is_cut_oldest_turn_first(server, model):
    """Default truncation: old turns go, the system message and the last turn stay; the header says how many."""
    turn = _long_text(120)
    messages = [{"role": "system", "content": SYSTEM}]
    for _ in range(12):
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": turn}]
    messages.append({"role": "user", "content": "hello"})
    assert len(model.chat_ids(messages)) > model.context_length
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": NAME, "messages": messages, "temperature": 0, "max_tokens": 4})
    assert r.status_code == 200, r.text
    dropped = int(r.headers["x-truncated-messages"])
    assert dropped >= 2 and dropped % 2 == 0
    kept = [messages[0]] + messages[1 + dropped:]
    assert r.json()["usage"]["prompt_tokens"] == len(model.chat_ids(kept))
    assert r.json()["usage"]["prompt_tokens"] + 4 <= model.context_length


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["missing", "wrong", "no-bearer"])
def test_api_key_required(server, headers):
    r = httpx.post(server + "/v1/chat/completions", headers=headers, timeout=10,
                   json={"model": NAME, "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/v1/models", headers=headers, timeout=10).status_code == 401
    assert httpx.get(server + "/health", timeout=10).status_code == 200  # health stays open


# ------------------------------------------------------------------------------------------------ load


def _stream_chat(server, messages, max_tokens, timeout=90):
    body = {"model": NAME, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    text, finish, done = [], None, False
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            c = json.loads(data)
            assert "error" not in c, c
            text.append(c["choices"][0]["delta"].get("content") or "")
            finish = c["choices"][0]["finish_reason"] or finish
    return "".join(text), finish, done


def test_32_concurrent_streaming_clients_equal_their_solo_runs(server, model):
    rng = random.Random(12)
    jobs = []
    for i in range(32):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 4, 12, 40, 90])))
        jobs.append(([{"role": "user", "content": prompt}], rng.randint(6, 20)))
    solo = [model.chat(m, GenerationConfig(max_new_tokens=n)).text for m, n in jobs]
    before = metrics(server, AUTH)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(_stream_chat, server, m, n) for m, n in jobs]
        results = [f.result(timeout=120) for f in futures]
    assert time.monotonic() - t0 < 120
    assert all(done for _, _, done in results)  # none lost
    assert [t for t, _, _ in results] == solo  # batching changes no result
    after = metrics(server, AUTH)
    ended = sum(after.get(f'glm_finished_total{{reason="{r}"}}', 0) - before.get(f'glm_finished_total{{reason="{r}"}}',
                                                                                  0) for r in ("eos", "length"))
    assert ended == 32
    assert after["glm_batch_size_mean"] > 1.0  # rows really shared decode steps
    assert after["glm_active_rows"] == 0 and after["glm_queue_depth"] == 0


def _prompt_without_eos(model, new_tokens):
    """A prompt whose greedy continuation runs new_tokens without an eos, so only a disconnect can end it early."""
    for words in range(1, 30):
        prompt = _long_text(words)
        if model.generate(prompt, GenerationConfig(max_new_tokens=new_tokens)).finish_reason == "length":
            return prompt
    pytest.fail("no prompt of the tiny model runs without an eos")


def test_clients_dropping_mid_stream_free_their_rows(server, model):
    body = {"model": NAME, "prompt": _prompt_without_eos(model, 400), "max_tokens": 400, "temperature": 0,
            "stream": True}
    before = metrics(server, AUTH).get('glm_finished_total{reason="cancelled"}', 0)

    def drop():
        with httpx.stream("POST", server + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    return  # one chunk arrived; leaving the block closes the connection mid-stream

    with ThreadPoolExecutor(max_workers=10) as pool:
        for f in [pool.submit(drop) for _ in range(10)]:
            f.result(timeout=90)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(server, AUTH)
        # the row leaves the batch before its finish is counted: wait for both
        if m["glm_active_rows"] == 0 and m["glm_queue_depth"] == 0 and \
                m.get('glm_finished_total{reason="cancelled"}', 0) - before >= 10:
            break
        time.sleep(0.2)
    assert m["glm_active_rows"] == 0 and m["glm_queue_depth"] == 0
    assert m['glm_finished_total{reason="cancelled"}'] - before == 10  # freed, not run to their 400 tokens
    text, _, done = _stream_chat(server, [{"role": "user", "content": "hello"}], 4)  # still serving
    assert done
