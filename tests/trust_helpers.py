"""Helpers for the trust tests: one-line error assertions, directory snapshots, leftovers beside a destination."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(path) -> Dict[str, Tuple[int, str]]:
    """relative path -> (size, sha256) of every file under ``path`` (symlinks as their target text)."""
    out = {}
    path = str(path)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, path)
            if os.path.islink(p):
                out[rel] = (-1, os.readlink(p))
                continue
            with open(p, "rb") as f:
                out[rel] = (os.path.getsize(p), hashlib.sha256(f.read()).hexdigest())
    return out


def leftovers(parent) -> List[str]:
    """Our temporary or lock entries in ``parent`` (.NAME.tmp-*, .NAME.old-*, .NAME.lock)."""
    return sorted(n for n in os.listdir(str(parent)) if n.startswith(".") and (".tmp-" in n or ".old-" in n
                                                                             or n.endswith(".lock")))


def assert_one_line_error(exit_code: int, output: str, *needles: str, code: int = 2) -> str:
    """The command failed with ``code``, printed exactly one non-blank line starting with "error: " (warnings
    from the library's log aside) and no traceback; that line contains every needle. Returns the line."""
    assert exit_code == code, output
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, output
    others = [line for line in lines if not line.startswith("error: ")]
    assert all(not o.startswith(("  File", "    ")) for o in others), output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def cli(args: Sequence, cwd=None, stdin: bytes = b"", env_extra=None, timeout: float = 300,
        stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """``python -m exporter.cli ARGS`` in a subprocess (args may be bytes, for invalid UTF-8), this worktree first."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], cwd=cwd, input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, env=env, timeout=timeout)


def edit_json(path, change) -> None:
    path = str(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    change(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
