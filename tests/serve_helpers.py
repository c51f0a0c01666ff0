"""Servers for the serve tests, on 127.0.0.1 only: a real ``glm-export serve`` process, or the same app run by
uvicorn in a thread of the test process (for a scheduler or backend the test controls). Both stop by themselves:
the process after ``--shutdown-after`` seconds at the latest, the thread when the context exits."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, Iterator, Optional

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, proc: Optional[subprocess.Popen] = None, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {base} did not become healthy in {timeout:.0f} s")


@contextlib.contextmanager
def server_process(bundle: str, *args: str, lifetime_s: float = 300.0) -> Iterator[str]:
    """``glm-export serve --model BUNDLE ARGS`` on a free loopback port; yields its base URL."""
    port = free_port()
    threads = [] if "--threads" in args else ["--threads", "1"]
    cmd = [sys.executable, "-m", "exporter.cli", "serve", "--model", bundle, "--host", "127.0.0.1",
           "--port", str(port), *threads, "--shutdown-after", str(lifetime_s), *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def server_thread(model, scheduler, options, start_scheduler: bool = True) -> Iterator[str]:
    """The app over ``scheduler`` served by uvicorn in a thread of this process; yields its base URL."""
    import uvicorn

    from runtime.serve.app import create_app

    port = free_port()
    app = create_app(model, scheduler, options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    if start_scheduler:
        scheduler.start()
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
        scheduler.stop()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def metrics(base: str, headers: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """GET /metrics parsed into {"name{labels}": value}."""
    text = httpx.get(base + "/metrics", headers=headers or {}, timeout=5).text
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out
