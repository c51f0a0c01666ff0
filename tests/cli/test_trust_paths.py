"""Output safety: no command can destroy or replace what the user did not ask it to.

Every writer goes through exporter.staging.staged_directory; these tests drive it through the CLI (tiny, onnx,
quantize) and directly, and check the exit code, the one-line message, and the file system afterwards: the source
intact, nothing outside touched, no temporary directory or lock left.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from exporter.cli import main
from exporter.staging import CHECKPOINT_STAMP, staged_directory
from runtime.errors import OutputPathError
from trust_helpers import ROOT, assert_one_line_error, dead_pid, leftovers, snapshot


def _fake_tiny(monkeypatch, body=None):
    """``glm-export tiny`` without training a tokenizer: writes one file (and runs ``body`` first, if given)."""
    import exporter.tiny.checkpoint as ck

    def write(out, **kwargs):
        if body is not None:
            body(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")

    monkeypatch.setattr(ck, "write_tiny_checkpoint", write)


@pytest.fixture
def ckpt(tmp_path, tiny_models):
    src, _ = tiny_models.case("glm4-thudm")
    dst = tmp_path / "work" / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _invoke(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


# ------------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("spelling, needle", [
    ("", "empty path"),
    ("   ", "empty path"),
    (".", "current or a parent"),
    ("./", "current or a parent"),
    ("..", "current or a parent"),
    ("/", "filesystem root"),
    ("CWD", "working directory"),
    ("CWD_PARENT", "working directory"),
    ("SYMLINK_TO_CWD", "working directory"),
])
def test_tiny_refuses_unsafe_out(tmp_path, monkeypatch, spelling, needle):
    cwd = tmp_path / "home" / "me"
    cwd.mkdir(parents=True)
    (cwd / "precious.txt").write_text("keep")
    os.symlink(cwd, tmp_path / "link")
    monkeypatch.chdir(cwd)
    out = {"CWD": str(cwd), "CWD_PARENT": str(cwd.parent), "SYMLINK_TO_CWD": str(tmp_path / "link")}.get(spelling,
                                                                                                          spelling)
    before = snapshot(tmp_path)
    code, output = _invoke(["tiny", "--out", out, "--overwrite"])
    assert_one_line_error(code, output, "--out", needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["same", "symlink", "inside", "parent", "grandparent", "dotted"])
def test_onnx_out_may_not_touch_the_checkpoint(ckpt, where):
    work = ckpt.parent
    os.symlink(ckpt, work / "alias")
    out = {"same": ckpt, "symlink": work / "alias" / ".." / "ckpt", "inside": ckpt / "bundle", "parent": work,
           "grandparent": work.parent, "dotted": str(ckpt) + "/./"}[where]
    before = snapshot(work.parent)
    code, output = _invoke(["onnx", "--model", ckpt, "--out", out, "--overwrite", "--no-verify", "--quiet"])
    assert_one_line_error(code, output, "--out", "--model")
    assert snapshot(work.parent) == before


def test_quantize_out_may_not_be_its_source_or_data(tmp_path, tiny_models):
    _, bundle_src = tiny_models.case("glm4-thudm")
    bundle = tmp_path / "b"
    shutil.copytree(bundle_src, bundle)
    before = snapshot(tmp_path)
    code, output = _invoke(["quantize", "--model", bundle, "--out", bundle, "--overwrite", "--precision", "fp16"])
    assert_one_line_error(code, output, "--out", "--model")
    data = tmp_path / "q" / "calib.txt"
    data.parent.mkdir()
    data.write_text("some text\n")
    code, output = _invoke(["quantize", "--model", bundle, "--out", data.parent, "--overwrite", "--precision", "int8",
                            "--calib-data", data])
    assert_one_line_error(code, output, "--out", "--calib-data")
    assert snapshot(tmp_path) == dict(before, **{"q/calib.txt": snapshot(tmp_path)["q/calib.txt"]})


def test_overwrite_replaces_only_directories_of_ours(tmp_path, monkeypatch):
    _fake_tiny(monkeypatch)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, output = _invoke(["tiny", "--out", mine, "--overwrite"])
    assert_one_line_error(code, output, "not written by glm-export")
    assert snapshot(mine) == {"thesis.tex": snapshot(mine)["thesis.tex"]}

    ours = tmp_path / "ours"
    code, output = _invoke(["tiny", "--out", ours])
    assert code == 0, output
    assert sorted(os.listdir(ours)) == sorted([CHECKPOINT_STAMP, "config.json"])
    (ours / "old.txt").write_text("from the last run")
    code, output = _invoke(["tiny", "--out", ours])
    assert_one_line_error(code, output, "--overwrite")
    code, output = _invoke(["tiny", "--out", ours, "--overwrite"])
    assert code == 0, output
    assert not (ours / "old.txt").exists() and (ours / CHECKPOINT_STAMP).is_file()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ lock


def test_a_second_writer_gets_in_use(tmp_path, monkeypatch):
    _fake_tiny(monkeypatch)
    out = tmp_path / "ck"
    lock = tmp_path / ".ck.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the destination
    try:
        code, output = _invoke(["tiny", "--out", out])
    finally:
        os.close(fd)
    assert_one_line_error(code, output, "in use by another glm-export run")
    assert not out.exists()
    os.unlink(lock)
    code, output = _invoke(["tiny", "--out", out])
    assert code == 0, output
    assert leftovers(tmp_path) == []


def test_the_lock_is_held_for_the_whole_run(tmp_path):
    out = tmp_path / "x"
    with staged_directory(str(out), overwrite=False) as tmp:
        assert os.path.isfile(tmp_path / ".x.lock")
        with pytest.raises(OutputPathError, match="in use"):
            with staged_directory(str(out), overwrite=False):
                pass
        open(os.path.join(tmp, "manifest.json"), "w").close()
    assert os.listdir(out) == ["manifest.json"] and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ swap


def test_a_directory_appearing_during_the_run_is_not_deleted(tmp_path, monkeypatch):
    out = tmp_path / "ck"

    def someone_else_writes(_):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    _fake_tiny(monkeypatch, someone_else_writes)
    code, output = _invoke(["tiny", "--out", out, "--overwrite"])
    assert_one_line_error(code, output, "appeared during the run")
    assert os.listdir(out) == ["theirs.txt"] and leftovers(tmp_path) == []


def test_a_failed_swap_restores_the_previous_directory(tmp_path, monkeypatch):
    import exporter.staging as staging

    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("old bundle")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new directory in
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", rename)
    with pytest.raises(OutputPathError, match="previous directory is unchanged"):
        with staged_directory(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "manifest.json"), "w").close()
    assert (out / "manifest.json").read_text() == "old bundle"
    assert leftovers(tmp_path) == []


def test_overwrite_over_a_bundle_that_cannot_be_moved_is_one_line(tmp_path, monkeypatch):
    import exporter.staging as staging

    _fake_tiny(monkeypatch)
    out = tmp_path / "ck"
    out.mkdir()
    (out / CHECKPOINT_STAMP).write_text("")

    def rename(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(staging.os, "rename", rename)
    code, output = _invoke(["tiny", "--out", out, "--overwrite"])
    assert_one_line_error(code, output, "cannot replace it", "Permission denied")
    assert os.listdir(out) == [CHECKPOINT_STAMP] and leftovers(tmp_path) == []


def test_a_stranded_previous_directory_is_restored_and_said(tmp_path, monkeypatch, caplog):
    _fake_tiny(monkeypatch)
    out = tmp_path / "ck"
    stranded = tmp_path / f".ck.old-{dead_pid()}-abc123"
    stranded.mkdir()
    (stranded / CHECKPOINT_STAMP).write_text("")
    (stranded / "weights").write_text("the old checkpoint")
    code, output = _invoke(["tiny", "--out", out])
    assert_one_line_error(code, output, "--overwrite")  # the restored checkpoint is not replaced without it
    assert "restored" in caplog.text and str(out) in caplog.text
    assert (out / "weights").read_text() == "the old checkpoint" and leftovers(tmp_path) == []


def test_stale_temporary_directories_of_dead_runs_are_removed(tmp_path, monkeypatch, caplog):
    _fake_tiny(monkeypatch)
    dead = tmp_path / f".ck.tmp-{dead_pid()}-zz9"
    dead.mkdir()
    (dead / "half.bin").write_bytes(b"\0" * 1000)
    alive = tmp_path / ".ck.tmp-1-keep"  # pid 1 is alive: not ours to remove
    alive.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid()}-x"  # another destination's: untouched
    other.mkdir()
    code, output = _invoke(["tiny", "--out", tmp_path / "ck"])
    assert code == 0, output
    assert not dead.exists() and alive.exists() and other.exists()
    assert "removed" in caplog.text


# ------------------------------------------------------------------------------------------------ signals

_SLOW_WRITER = """
import os, sys, time
sys.argv = ["glm-export", "tiny", "--out", sys.argv[1]]
import exporter.tiny.checkpoint as ck
def write(out, **kw):
    with open(os.path.join(out, "weights.bin"), "wb") as f:
        f.write(b"x" * 100000)
    print("READY", flush=True)
    time.sleep(60)
ck.write_tiny_checkpoint = write
from exporter.cli import main
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_clean_up_like_ctrl_c(tmp_path, sig):
    out = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=ROOT)
    # the child gets SIGINT's default disposition: a suite started in the background of a non-interactive shell
    # inherits SIGINT ignored (POSIX), and Python then leaves it ignored, as a user who ignores it would want
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.readline().strip() == b"READY"
        assert any(".tmp-" in n for n in os.listdir(tmp_path))
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + sig, err
    assert b"Traceback" not in err and err.decode().strip() in ("interrupted", "terminated")
    assert os.listdir(tmp_path) == []  # no bundle, no temporary directory, no lock
