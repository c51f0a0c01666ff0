"""Writing a directory atomically: build everything in a temporary sibling, then rename it into place.

A failed or interrupted stage leaves nothing at the destination (and removes its temporary directory).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from runtime.errors import OutputPathError


def check_destination(out_dir: str, overwrite: bool, option: str = "--out") -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise OutputPathError(f"{option} {out_dir}: exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise OutputPathError(f"{option} {out_dir}: exists and is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_directory(out_dir: str, overwrite: bool, option: str = "--out") -> Iterator[str]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``, on failure it is removed."""
    out_dir = os.path.abspath(out_dir)
    check_destination(out_dir, overwrite, option)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary directory
    except OSError as e:
        raise OutputPathError(f"{option} {out_dir}: cannot write there ({e.strerror or e})") from None
    try:
        yield tmp
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "previous"))
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
