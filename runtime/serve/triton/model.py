"""The Triton Python-backend model: ``TritonPythonModel`` over ``runtime.serve.scheduler`` (decoupled mode).

Where it stands: ``glm-export triton`` writes a repository whose ``model.py`` imports this class; Triton's Python
backend (a stub process per instance) calls :meth:`initialize` once, :meth:`execute` with each batch of requests,
and :meth:`finalize` at unload. ``triton_python_backend_utils`` exists only inside that process, so it is imported
in ``initialize`` (tests put a fake with the same names in ``sys.modules``).

Each request becomes a ``ServeRequest``: the scheduler thread sends its responses through the request's response
sender as tokens arrive (decoupled models may send from any thread), the last one flagged
``TRITONSERVER_RESPONSE_COMPLETE_FINAL``. ``execute`` returns at once, so requests that arrive while others decode
join the running batch. Inputs and outputs are listed in ``runtime.serve.triton.repository``; the bundle is the
``bundle`` parameter, a path inside the model's version directory.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

from runtime.errors import BundleError, GlmExportError
from runtime.sampling import GenerationConfig
from runtime.serve.scheduler import FINISH_CANCELLED, FINISH_ERROR, Scheduler, ServeRequest, StreamEvent

log = logging.getLogger("glm_export")

DEFAULT_MAX_TOKENS = 256


def _scalar(pb, request, name: str, default: Any = None) -> Any:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size == 0:
        return default
    v = value[0]
    if isinstance(v, bytes):
        return v.decode("utf-8")
    return v.item() if hasattr(v, "item") else v


def confined_path(base: str, relative: str) -> str:
    """``base/relative``, refused unless it stays inside ``base`` (a config parameter cannot point elsewhere)."""
    base_real = os.path.realpath(base)
    path = os.path.realpath(os.path.join(base_real, relative))
    if os.path.isabs(relative) or os.path.commonpath([base_real, path]) != base_real:
        raise BundleError(f"config.pbtxt parameter bundle {relative!r} must be a path inside {base}")
    return path


class _ResponseSink:
    """Sends a request's events as Triton responses (streamed pieces, or one response at the end)."""

    def __init__(self, pb, sender, stream: bool):
        self.pb, self.sender, self.stream = pb, sender, stream
        self.parts: List[str] = []
        self.req: Optional[ServeRequest] = None

    def _response(self, text: str, finish: str):
        pb = self.pb
        import numpy as np

        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb.Tensor("finish_reason", np.array([finish.encode("utf-8")], dtype=np.object_)),
        ])

    def __call__(self, event: StreamEvent) -> None:  # scheduler thread
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if event.finish_reason in (FINISH_ERROR, FINISH_CANCELLED):
            err = pb.TritonError(event.error or "the request was cancelled")
            self.sender.send(pb.InferenceResponse(output_tensors=[], error=err), flags=final)
            return
        cancelled = getattr(self.sender, "is_cancelled", None)
        if self.req is not None and callable(cancelled) and cancelled():
            self.req.cancel()  # the scheduler frees the row and sends the final (error) response
            return
        if self.stream:
            if event.text or event.finish_reason:
                self.sender.send(self._response(event.text, event.finish_reason or ""),
                                 flags=final if event.finish_reason else 0)
            return
        self.parts.append(event.text)
        if event.finish_reason is not None:
            self.sender.send(self._response("".join(self.parts), event.finish_reason), flags=final)


class TritonPythonModel:
    def initialize(self, args: Dict[str, str]) -> None:
        import triton_python_backend_utils as pb

        from runtime.api import GlmModel

        self.pb = pb
        config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(config):
            raise pb.TritonModelException("this model streams: set model_transaction_policy { decoupled: true }")
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        bundle = confined_path(version_dir, params.get("bundle", "bundle"))
        provider = "cpu"
        if args.get("model_instance_kind") == "GPU":
            provider = f"cuda:{int(args.get('model_instance_device_id', 0))}"
        threads = int(params["threads"]) if params.get("threads") else None
        # the scheduler joins rows into a Concat KV cache: the portable graph (runtime/serve/scheduler.py)
        self.model = GlmModel.load(bundle, provider=provider, threads=threads, graph="portable")
        self.scheduler = Scheduler(self.model, max_batch=int(params.get("max_batch", 8)),
                                   max_queue=int(params.get("max_queue", 64)),
                                   prefix_cache_bytes=int(params.get("prefix_cache_mb", 256)) * 2**20).start()
        from runtime.chat import chat_stop_ids

        tok = self.model.tokenizer
        self.chat_stop = frozenset(chat_stop_ids(tok, self.model.spec)) if tok is not None else frozenset()

    def _prompt(self, request) -> tuple:
        pb, model = self.pb, self.model
        text = _scalar(pb, request, "text_input")
        if not isinstance(text, str) or not text:
            raise GlmExportError("text_input is required (a non-empty string)")
        has_chat = model.tokenizer is not None and model.spec.chat_format != "none"
        chat = bool(_scalar(pb, request, "chat", has_chat))
        if not chat:
            return model.encode(text), ()
        messages = []
        system = _scalar(pb, request, "system")
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": text})
        return model.chat_ids(messages), self.chat_stop

    def _config(self, request) -> GenerationConfig:
        pb = self.pb
        temperature = float(_scalar(pb, request, "temperature", 0.0))
        max_tokens = int(_scalar(pb, request, "max_tokens", DEFAULT_MAX_TOKENS))
        if temperature <= 0:
            return GenerationConfig(max_new_tokens=max_tokens)
        seed = _scalar(pb, request, "seed")
        return GenerationConfig(max_new_tokens=max_tokens, do_sample=True, temperature=temperature,
                                top_p=float(_scalar(pb, request, "top_p", 1.0)),
                                top_k=int(_scalar(pb, request, "top_k", 0)),
                                seed=int(seed) if seed is not None else None)

    def execute(self, requests) -> None:
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids, extra_eos = self._prompt(request)
                if len(ids) >= self.model.context_length:
                    raise GlmExportError(f"the prompt is {len(ids)} tokens, but the context holds "
                                         f"{self.model.context_length}")
                sink = _ResponseSink(pb, sender, bool(_scalar(pb, request, "stream", False)))
                req = ServeRequest(ids, self._config(request), sink, extra_eos=extra_eos)
                sink.req = req
                self.scheduler.submit(req)
            except GlmExportError as e:  # the client's mistake (or a full queue): an error response, never a crash
                sender.send(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e))),
                            flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self) -> None:
        self.scheduler.stop()
        self.model.close()
