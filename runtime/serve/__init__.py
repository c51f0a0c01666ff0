"""Serving a bundle: an OpenAI-compatible HTTP server with continuous batching, and a Triton model repository.

Needs the ``serve`` extra (starlette, uvicorn, sse-starlette, pydantic); the rest of the runtime does not.

    kv_rows.py       joining / keeping / cutting rows of a batch's KV cache (left padding)
    prefix_cache.py  LRU of finished conversations' KV caches, bounded in bytes
    scheduler.py     the thread that owns the model: continuous batching
    messages.py      OpenAI messages -> prompt ids, history truncation
    tools.py         tool calls in the ChatGLM3 and GLM-4 formats
    protocol.py      OpenAI request models, responses, stream chunks, error shapes
    metrics.py       counters and the Prometheus text
    app.py           the HTTP app and ``run_server``
    triton/          the Triton repository writer and the Python-backend model
"""
