"""The HTTP app: OpenAI-compatible endpoints over the scheduler, on Starlette (served by uvicorn).

Where it stands: ``glm-export serve`` (``exporter.cli.serve``) loads the bundle, starts a
``runtime.serve.scheduler.Scheduler`` and serves :func:`create_app` with :func:`run_server`. Endpoints::

    POST /v1/chat/completions   messages (system/user/assistant/tool), stream, max_tokens, temperature, top_p,
                                seed, stop, n=1, tools/tool_choice; usage counts
    POST /v1/completions        prompt (text or ids), the same sampling fields
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "active": rows, "waiting": queued}
    GET  /metrics               Prometheus text (runtime.serve.metrics)

Starlette rather than FastAPI: request bodies are validated by pydantic models of our own
(``runtime.serve.protocol``), so every client mistake comes back in OpenAI's error shape with status 400 (FastAPI's
would be its own 422 shape). Streams are Server-Sent Events through sse-starlette, which also notices a client that
goes away: the handler's ``finally`` then cancels the request and the scheduler frees its row at the next step.
With ``tools`` offered, a streamed reply is held until it ends (it may turn out to be a tool call, which is sent as
one ``tool_calls`` delta); without tools, text streams token by token.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from runtime.errors import GenerationError, GlmExportError
from runtime.sampling import GenerationConfig
from runtime.serve import protocol as p
from runtime.serve.messages import chat_prompt
from runtime.serve.scheduler import (FINISH_CANCELLED, FINISH_ERROR, QueueFullError, Scheduler, ServeRequest,
                                     ShuttingDownError, StreamEvent)
from runtime.serve.tools import parse_tool_call

log = logging.getLogger("glm_export")

DEFAULT_MAX_TOKENS = 512  # chat, when the request gives none (also what history truncation leaves room for)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5


@dataclass(frozen=True)
class ServeOptions:
    model_name: str
    api_key: Optional[str] = None
    truncate: bool = True
    default_max_tokens: int = DEFAULT_MAX_TOKENS


def _import_starlette():
    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        raise GlmExportError("serving needs the serve extra: pip install 'glm-export[serve]'") from None


def generation_config(req, max_new_tokens: int) -> GenerationConfig:
    """The request's sampling fields as a GenerationConfig (temperature 0: greedy; omitted: OpenAI's 1.0)."""
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    kwargs: Dict[str, Any] = {}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=req.top_p if req.top_p is not None else 1.0,
                      top_k=req.top_k or 0, seed=req.seed)
    if req.repetition_penalty is not None:
        kwargs["repetition_penalty"] = req.repetition_penalty
    return GenerationConfig(max_new_tokens=max_new_tokens, stop=tuple(req.stop or ()), **kwargs)


class _Pending:
    """One submitted request as the handler sees it: events arrive on an asyncio queue from the scheduler thread."""

    def __init__(self, scheduler: Scheduler, ids: List[int], config: GenerationConfig, extra_eos, rid: str):
        self.loop = asyncio.get_running_loop()
        self.queue: "asyncio.Queue[StreamEvent]" = asyncio.Queue()
        self.req = ServeRequest(list(ids), config, self._sink, extra_eos=extra_eos, request_id=rid)
        self.scheduler = scheduler
        self.done = False

    def _sink(self, event: StreamEvent) -> None:  # scheduler thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def submit(self) -> None:
        try:
            self.scheduler.submit(self.req)
        except QueueFullError as e:
            raise p.APIError(429, f"the server is busy: {e}; retry later", "requests", code="rate_limit_exceeded",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDownError as e:
            raise p.APIError(503, str(e), "server_error", code="service_unavailable",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    async def events(self) -> AsyncIterator[StreamEvent]:
        while not self.done:
            event = await self.queue.get()
            if event.finish_reason is not None:
                self.done = True
            yield event

    def close(self) -> None:
        if not self.done:
            self.req.cancel()

    @property
    def completion_tokens(self) -> int:
        return len(self.req.seq.generated_ids) if self.req.seq is not None else 0


def _event_error(event: StreamEvent) -> p.APIError:
    if event.finish_reason == FINISH_CANCELLED:
        return p.APIError(503, "the request was cancelled", "server_error", code="cancelled")
    return p.APIError(500, f"generation failed: {event.error}", "server_error")


def create_app(model, scheduler: Scheduler, options: ServeOptions):
    """The Starlette app serving ``model`` (a ``runtime.api.GlmModel``) through ``scheduler``."""
    _import_starlette()
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    metrics = scheduler.metrics
    created = int(time.time())
    chat_stop = _chat_stop_ids(model)

    def error_response(e: p.APIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_auth(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise p.APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), options.api_key.encode())
        if not ok:
            raise p.APIError(401, "incorrect API key", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != options.model_name:
            raise p.APIError(404, f"model {name!r} does not exist; this server serves {options.model_name!r}",
                             param="model", code="model_not_found")

    def endpoint(path: str, handler):
        async def wrapped(request: Request) -> Response:
            try:
                if path != "/health":
                    check_auth(request)
                response = await handler(request)
            except p.APIError as e:
                response = error_response(e)
            except GlmExportError as e:  # a GenerationError, SamplingConfigError, TokenizerError: the client's
                response = error_response(p.bad_request(str(e)))
            except Exception:  # a bug: logged with its traceback, answered without one
                log.exception("%s failed", path)
                response = error_response(p.APIError(500, "internal error (see the server log)", "server_error"))
            metrics.request(path, response.status_code)
            return response
        return wrapped

    # ------------------------------------------------------------------------------------------------ GET

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "active": scheduler.active, "waiting": scheduler.waiting})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": options.model_name, "object": "model", "created": created, "owned_by": "glm-export"}]})

    async def metrics_text(request: Request) -> Response:
        pc = scheduler.prefix_cache
        return PlainTextResponse(metrics.exposition(pc.hits, pc.misses),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------------------------------------ POST

    async def chat_completions(request: Request) -> Response:
        req = p.parse_request(await request.body(), p.ChatCompletionRequest)
        check_model(req.model)
        try:
            model.require_chat()
        except GlmExportError as e:
            raise p.bad_request(str(e)) from None
        max_tokens = req.max_completion_tokens or req.max_tokens or options.default_max_tokens
        config = generation_config(req, max_tokens)
        offered = req.offered_tools()
        try:
            prompt = chat_prompt(model.tokenizer, model.spec, req.messages, model.context_length, max_tokens,
                                 tools=offered, truncate=options.truncate)
        except GenerationError as e:
            raise p.bad_request(str(e), "messages", code="context_length_exceeded"
                                if "context" in str(e) else None) from None
        rid = p.new_id("chatcmpl")
        pending = _Pending(scheduler, prompt.ids, config, chat_stop, rid)
        headers = {"X-Truncated-Messages": str(prompt.dropped_messages)} if prompt.dropped_messages else {}
        pending.submit()
        n_prompt = len(prompt.ids)
        names = prompt.tool_names

        if not req.stream:
            text, finish = await _collect(pending, request)
            calls = _tool_calls(model, text, names)
            body = p.chat_response(rid, options.model_name, text, "tool_calls" if calls else finish, n_prompt,
                                   pending.completion_tokens, calls)
            return JSONResponse(body, headers=headers)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def chunks() -> AsyncIterator[Dict[str, str]]:
            t0 = int(time.time())
            held: List[str] = []
            try:
                yield _data(p.chat_chunk(rid, options.model_name, t0, {"role": "assistant", "content": ""}))
                async for ev in pending.events():
                    if ev.finish_reason in (FINISH_CANCELLED, FINISH_ERROR):
                        yield _data(_event_error(ev).body())
                        break
                    if ev.text:
                        if names:
                            held.append(ev.text)
                        else:
                            yield _data(p.chat_chunk(rid, options.model_name, t0, {"content": ev.text}))
                    if ev.finish_reason is not None:
                        finish = p.FINISH_TO_OPENAI[ev.finish_reason]
                        calls = _tool_calls(model, "".join(held), names)
                        if calls:
                            finish = "tool_calls"
                            delta = {"tool_calls": [dict(c, index=i) for i, c in
                                                    enumerate(p.tool_calls_field(calls))]}
                            yield _data(p.chat_chunk(rid, options.model_name, t0, delta))
                        elif held:
                            yield _data(p.chat_chunk(rid, options.model_name, t0, {"content": "".join(held)}))
                        yield _data(p.chat_chunk(rid, options.model_name, t0, {}, finish))
                        if include_usage:
                            yield _data(p.usage_chunk(rid, options.model_name, t0, "chat.completion.chunk",
                                                      n_prompt, pending.completion_tokens))
                yield {"data": "[DONE]"}
            finally:
                pending.close()

        return EventSourceResponse(chunks(), sep="\n", headers=headers)

    async def completions(request: Request) -> Response:
        req = p.parse_request(await request.body(), p.CompletionRequest)
        check_model(req.model)
        prompt = req.single_prompt()
        ids = model.encode(prompt)  # text: the model's prompt prefix is added, as `glm-export run --prompt`
        bad = [t for t in ids if t < 0 or t >= model.spec.vocab_size]
        if bad:
            raise p.bad_request(f"prompt has token id {bad[0]} outside the vocabulary [0, {model.spec.vocab_size})",
                                "prompt")
        if len(ids) >= model.context_length:
            raise p.bad_request(f"the prompt is {len(ids)} tokens, but the context holds {model.context_length} "
                                f"(at most {model.context_length - 1} prompt tokens)", "prompt",
                                code="context_length_exceeded")
        config = generation_config(req, req.max_tokens or DEFAULT_COMPLETION_TOKENS)
        rid = p.new_id("cmpl")
        pending = _Pending(scheduler, ids, config, (), rid)
        pending.submit()
        if not req.stream:
            text, finish = await _collect(pending, request)
            return JSONResponse(p.completion_response(rid, options.model_name, text, finish, len(ids),
                                                      pending.completion_tokens))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def chunks() -> AsyncIterator[Dict[str, str]]:
            t0 = int(time.time())
            try:
                async for ev in pending.events():
                    if ev.finish_reason in (FINISH_CANCELLED, FINISH_ERROR):
                        yield _data(_event_error(ev).body())
                        break
                    finish = p.FINISH_TO_OPENAI[ev.finish_reason] if ev.finish_reason else None
                    if ev.text or finish:
                        yield _data(p.completion_chunk(rid, options.model_name, t0, ev.text, finish))
                    if finish and include_usage:
                        yield _data(p.usage_chunk(rid, options.model_name, t0, "text_completion", len(ids),
                                                  pending.completion_tokens))
                yield {"data": "[DONE]"}
            finally:
                pending.close()

        return EventSourceResponse(chunks(), sep="\n")

    routes = [
        Route("/health", endpoint("/health", health), methods=["GET"]),
        Route("/v1/models", endpoint("/v1/models", models), methods=["GET"]),
        Route("/metrics", endpoint("/metrics", metrics_text), methods=["GET"]),
        Route("/v1/chat/completions", endpoint("/v1/chat/completions", chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint("/v1/completions", completions), methods=["POST"]),
    ]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        msg = "method not allowed" if status == 405 else f"no endpoint {request.url.path}"
        return error_response(p.APIError(status, msg, code="not_found" if status == 404 else None))

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _data(obj: Dict[str, Any]) -> Dict[str, str]:
    return {"data": json.dumps(obj, ensure_ascii=False)}


async def _collect(pending: _Pending, request) -> Tuple[str, str]:
    """Wait for the whole reply (non-streamed), cancelling it if the client goes away meanwhile."""
    parts: List[str] = []
    try:
        while True:
            try:  # waiting on the queue itself: cancelling a get() on timeout loses nothing
                ev = await asyncio.wait_for(pending.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise p.APIError(499, "client closed the request", code="client_closed") from None
                continue
            if ev.finish_reason is not None:
                pending.done = True
            if ev.finish_reason in (FINISH_CANCELLED, FINISH_ERROR):
                raise _event_error(ev)
            parts.append(ev.text)
            if ev.finish_reason is not None:
                return "".join(parts), p.FINISH_TO_OPENAI[ev.finish_reason]
    finally:
        pending.close()


def _tool_calls(model, text: str, names: List[str]):
    if not names:
        return None
    call = parse_tool_call(model.spec.chat_format, text, names)
    return [call] if call is not None else None


def _chat_stop_ids(model):
    if model.tokenizer is None:
        return frozenset()
    from runtime.chat import chat_stop_ids

    return frozenset(chat_stop_ids(model.tokenizer, model.spec))


def run_server(model, scheduler: Scheduler, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
               shutdown_after_s: Optional[float] = None, on_ready=None) -> None:
    """Serve until interrupted (or for ``shutdown_after_s`` seconds); the scheduler is started and stopped here."""
    _import_starlette()
    import uvicorn

    app = create_app(model, scheduler, options)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    scheduler.start()
    timer = None
    if shutdown_after_s:
        timer = threading.Timer(shutdown_after_s, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    if on_ready is not None:
        _notify_when_started(server, on_ready)
    try:
        server.run()
    finally:
        if timer is not None:
            timer.cancel()
        scheduler.stop()


def _notify_when_started(server, on_ready) -> None:
    def wait() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            on_ready()
    threading.Thread(target=wait, daemon=True).start()
