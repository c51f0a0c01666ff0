"""Writing a directory safely: build everything in a temporary sibling, then swap it into place.

Every command that writes a directory (``tiny``, ``onnx``, ``quantize``, ``trt``, the training example) goes
through :func:`staged_directory`, which guarantees:

- the destination is a sensible place: not empty, ``.``, ``/``, the working directory or one of its ancestors, and
  neither equal to, inside, nor a parent of any input the command reads (symlinks resolved);
- an existing non-empty destination is replaced only with ``overwrite`` *and* when it carries one of our markers
  (a bundle's ``manifest.json``, an engine's ``engine.json``, or the checkpoint stamp ``tiny``/training write);
- one writer at a time: an exclusive ``fcntl.flock`` on ``.NAME.lock`` beside the destination for the whole run;
- the destination is re-checked at the swap: it must still be what was checked at the start (or absent);
- a crash-safe swap: the old directory is renamed aside, the new one renamed in; if that fails the old one is put
  back; a later run finds a stranded old directory (dead owner) and restores it, saying so;
- SIGTERM and SIGHUP clean up like Ctrl-C; stale temporary directories of dead runs (our naming, the owner pid in
  the name) are removed by the next run on the same destination.

Temporary names: ``.NAME.tmp-PID-XXXX`` (the new directory being built), ``.NAME.old-PID-XXXX`` (the previous one
during the swap).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

from runtime.errors import OutputPathError

log = logging.getLogger("glm_export")

CHECKPOINT_STAMP = ".glm-export-checkpoint"  # written into checkpoints made by `tiny` and the training example
# a directory holding one of these was written by glm-export and may be replaced with --overwrite
OUR_MARKERS = ("manifest.json", "engine.json", CHECKPOINT_STAMP)

Inputs = Sequence[Tuple[str, Optional[str]]]  # (option, path) pairs; None paths are ignored


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived during a staged write (cleaned up like Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


# ------------------------------------------------------------------------------------------------ path checks


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(child: str, parent: str) -> bool:
    """True when real path ``child`` is ``parent`` or below it."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_path(out_dir: str, inputs: Inputs = (), option: str = "--out") -> str:
    """The real destination path, or OutputPathError when ``out_dir`` is no place to write a directory."""
    if out_dir is None or not str(out_dir).strip():
        raise OutputPathError(f"{option}: empty path (an unset shell variable?); give the directory to write")
    out_dir = os.fspath(out_dir)
    if "\0" in out_dir:
        raise OutputPathError(f"{option} {out_dir!r}: contains a NUL character")
    real = _real(out_dir)
    if real == os.sep or os.path.dirname(real) == real:
        raise OutputPathError(f"{option} {out_dir}: is the filesystem root")
    if os.path.basename(os.path.normpath(out_dir)) in (".", "..", ""):
        raise OutputPathError(f"{option} {out_dir}: names the current or a parent directory; give a new directory")
    cwd = _real(os.getcwd())
    if _inside(cwd, real):
        raise OutputPathError(f"{option} {out_dir}: is the working directory or one of its parents; "
                              "give a new directory")
    if os.path.islink(os.path.abspath(out_dir)):
        raise OutputPathError(f"{option} {out_dir}: is a symbolic link; give the directory itself")
    for in_option, path in inputs:
        if path is None or not str(path).strip():
            continue
        src = _real(os.fspath(path))
        if src == real:
            raise OutputPathError(f"{option} {out_dir}: is the same place as {in_option} {path}; "
                                  "write to a new directory")
        if _inside(src, real):
            raise OutputPathError(f"{option} {out_dir}: contains {in_option} {path}; replacing it would delete "
                                  "the input")
        if _inside(real, src):
            raise OutputPathError(f"{option} {out_dir}: is inside {in_option} {path}; write outside the input")
    return real


def is_ours(path: str) -> bool:
    """True when the directory carries one of our markers (written by glm-export)."""
    return any(os.path.isfile(os.path.join(path, m)) for m in OUR_MARKERS)


@dataclass(frozen=True)
class _Seen:
    """What was at the destination when it was checked: None (absent) or its identity."""

    ident: Optional[Tuple[int, int]]


def _identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def check_destination(out_dir: str, overwrite: bool, option: str = "--out", inputs: Inputs = ()) -> str:
    """The real destination path when a staged write may go there; OutputPathError naming the reason otherwise."""
    real = check_output_path(out_dir, inputs, option)
    if os.path.lexists(real):
        if not os.path.isdir(real):
            raise OutputPathError(f"{option} {out_dir}: exists and is not a directory")
        try:
            entries = os.listdir(real)
        except OSError as e:
            raise OutputPathError(f"{option} {out_dir}: cannot read it ({e.strerror or e})") from None
        if entries:
            if not overwrite:
                raise OutputPathError(f"{option} {out_dir}: exists and is not empty (pass --overwrite to replace it)")
            if not is_ours(real):
                raise OutputPathError(
                    f"{option} {out_dir}: exists and was not written by glm-export (no manifest.json, engine.json "
                    f"or {CHECKPOINT_STAMP}); refusing to replace it even with --overwrite"
                )
    return real


# ------------------------------------------------------------------------------------------------ lock


@contextlib.contextmanager
def destination_lock(real_out: str, option: str = "--out") -> Iterator[None]:
    """An exclusive lock on ``.NAME.lock`` beside the destination, held for the whole run; OutputPathError when
    another run holds it. The lock file is removed at the end (the inode check makes that race-free)."""
    import fcntl

    parent, name = os.path.split(real_out)
    path = os.path.join(parent, "." + name + ".lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputPathError(f"{option} {real_out}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputPathError(f"{option} {real_out}: in use by another glm-export run (lock {path}); "
                                      "wait for it to finish or write elsewhere") from None
            raise OutputPathError(f"{option} {real_out}: cannot lock {path} ({e.strerror or e})") from None
        # the file we locked must still be the one at the path (a finishing run may have removed it)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


# ------------------------------------------------------------------------------------------------ stale runs


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(real_out: str) -> Iterator[Tuple[str, str, int]]:
    """(kind, path, owner pid) of our temporary directories beside the destination."""
    parent, name = os.path.split(real_out)
    pattern = re.compile(r"^\." + re.escape(name) + r"\.(tmp|old)-(\d+)-[A-Za-z0-9_]+$")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry)
        if m:
            yield m.group(1), os.path.join(parent, entry), int(m.group(2))


def recover_stale(real_out: str) -> None:
    """Remove temporary directories of dead runs on this destination; restore a stranded previous directory."""
    for kind, path, pid in sorted(_leftovers(real_out), key=lambda x: x[0] != "old"):
        if _pid_alive(pid) and pid != os.getpid():
            continue
        if kind == "old" and not os.path.lexists(real_out):
            os.rename(path, real_out)
            log.warning("restored %s from %s, left by an interrupted run (pid %d)", real_out, path, pid)
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run (pid %d)", path, pid)


# ------------------------------------------------------------------------------------------------ signals


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt) while the block runs, so the staged
    directory is cleaned up as on Ctrl-C. Only the main thread can install handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP held back (delivered after the block) where the platform allows it."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
    previous = mask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


# ------------------------------------------------------------------------------------------------ the stage


def _mkdtemp(real_out: str, kind: str) -> str:
    parent, name = os.path.split(real_out)
    return tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent)


def write_checkpoint_stamp(ckpt_dir: str) -> None:
    """Mark a checkpoint directory as written by glm-export (so ``--overwrite`` may replace it later)."""
    with open(os.path.join(ckpt_dir, CHECKPOINT_STAMP), "w", encoding="utf-8") as f:
        f.write("written by glm-export\n")


def _swap(tmp: str, real_out: str, seen: _Seen, option: str, out_dir: str) -> None:
    """Move ``tmp`` to ``real_out``; the previous directory (if any) is moved aside first and put back on failure."""
    now = _identity(real_out)
    if now != seen.ident:
        what = "appeared" if seen.ident is None else ("disappeared" if now is None else "was replaced")
        raise OutputPathError(f"{option} {out_dir}: {what} during the run; nothing was replaced (run again)")
    old = None
    with _signals_blocked():  # the two renames are not interrupted half way (a crash is recovered by the next run)
        try:
            if now is not None:
                old = _mkdtemp(real_out, "old")
                os.rmdir(old)  # keep the unique name; the rename below makes it the old directory
                os.rename(real_out, old)
            os.rename(tmp, real_out)
        except OSError as e:
            if old is not None and os.path.isdir(old) and not os.path.lexists(real_out):
                os.rename(old, real_out)
            raise OutputPathError(f"{option} {out_dir}: cannot replace it ({e.strerror or e}); "
                                  "the previous directory is unchanged") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):
            log.warning("could not remove the previous %s (moved to %s); remove it by hand", out_dir, old)


@contextlib.contextmanager
def staged_directory(out_dir: str, overwrite: bool, option: str = "--out", inputs: Inputs = (),
                     checkpoint_stamp: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``, on failure (an error,
    Ctrl-C, SIGTERM, SIGHUP) it is removed. ``inputs`` are the (option, path) pairs the command reads: the
    destination may not touch them. ``checkpoint_stamp`` marks the result as one of our checkpoints."""
    real = check_destination(out_dir, overwrite, option, inputs)
    parent = os.path.dirname(real)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{option} {out_dir}: cannot write there ({e.strerror or e})") from None
    with _signals_interrupt(), destination_lock(real, option):
        recover_stale(real)
        real = check_destination(out_dir, overwrite, option, inputs)  # again, under the lock
        seen = _Seen(_identity(real))
        try:
            tmp = _mkdtemp(real, "tmp")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary directory
        except OSError as e:
            raise OutputPathError(f"{option} {out_dir}: cannot write there ({e.strerror or e})") from None
        try:
            yield tmp
            if checkpoint_stamp:
                write_checkpoint_stamp(tmp)
            _swap(tmp, real, seen, option, out_dir)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def input_pairs(**paths: Optional[str]) -> Inputs:
    """(option, path) pairs from keyword arguments: ``model="x"`` -> ("--model", "x")."""
    return tuple(("--" + k.replace("_", "-"), v) for k, v in paths.items() if v is not None)
