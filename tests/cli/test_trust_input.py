"""Input validation at the boundary, for what the user types: UTF-8, closed stdio, --threads, line lengths; and the
one error path (user mistakes: one line, exit 2; bugs: a traceback and a request to report it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from exporter.cli import BUG_EXIT, main
from runtime.user_input import cores
from trust_helpers import assert_one_line_error, cli, leftovers

# the sentencepiece (ChatGLM3) and tokenizer.json (GLM-4-0414 template) bundles
BUNDLES = ["chatglm3-thudm-hd32", "glm4_0414-hf"]


@pytest.fixture(params=BUNDLES)
def bundle(request, tiny_models):
    return tiny_models.case(request.param)[1]


@pytest.mark.parametrize("flag", ["--prompt", "--system", "--stop"])
def test_invalid_utf8_in_an_argument_names_the_option(tiny_models, flag):
    """Checked where click hands the option over, before any bundle is opened (the API test below covers each
    tokenizer kind)."""
    bundle = tiny_models.case("chatglm3-thudm-hd32")[1]
    args = ["run", "--model", bundle, "--max-new-tokens", "2", "--chat", "--prompt", "hi"]
    if flag == "--prompt":
        args[-1] = b"caf\xe9"
    else:
        args += [flag, b"bad \xff\xfe"]
    p = cli(args)
    assert_one_line_error(p.returncode, (p.stdout + p.stderr).decode(), flag, "not valid UTF-8")


def test_invalid_utf8_on_chat_stdin_names_the_line(bundle):
    p = cli(["chat", "--model", bundle, "--greedy", "--max-new-tokens", "2"], stdin=b"hello\n\xc3\x28 broken\n")
    assert_one_line_error(p.returncode, p.stderr.decode(), "stdin line 2", "not valid UTF-8")
    assert b"assistant> " in p.stdout  # the first line was answered


def test_a_lone_surrogate_through_the_api_is_a_typed_error(bundle):
    from runtime import GlmModel
    from runtime.errors import GlmExportError

    with GlmModel.load(bundle) as model:
        with pytest.raises(GlmExportError, match="prompt: a lone surrogate U\\+D800 at character 1"):
            model.generate("a\ud800b")
        with pytest.raises(GlmExportError, match="chat message 0 content: a lone surrogate"):
            model.chat([{"role": "user", "content": "\udfff"}])


def test_an_overlong_chat_line_is_refused(tiny_models):
    from runtime.user_input import MAX_LINE_CHARS

    bundle = tiny_models.case("chatglm3-thudm-hd32")[1]

    p = cli(["chat", "--model", bundle, "--greedy"], stdin=b"x" * (MAX_LINE_CHARS + 10) + b"\n")
    assert_one_line_error(p.returncode, p.stderr.decode(), "stdin line 1", "longer than")


def test_closed_stdin_and_stdout(tiny_models):
    from trust_helpers import ROOT

    bundle = tiny_models.case("chatglm3-thudm-hd32")[1]
    base = [sys.executable, "-m", "exporter.cli"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    for args, closed, needle in (
        (["chat", "--model", bundle], "<&-", "stdin is closed"),
        (["run", "--model", bundle, "--prompt", "hi", "--max-new-tokens", "2"], ">&-", "stdout is closed"),
        (["bench", "--model", bundle, "--runs", "1", "--warmup", "0", "--new-tokens", "2"], ">&-", "stdout is closed"),
    ):
        cmd = " ".join(f"'{a}'" for a in base + args) + f" {closed}"
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, env=env, timeout=120)
        assert_one_line_error(r.returncode, r.stderr.decode(), needle)


def test_a_closed_pipe_ends_quietly(tiny_models):
    from trust_helpers import ROOT

    bundle = tiny_models.case("chatglm3-thudm-hd32")[1]
    cmd = (f"'{sys.executable}' -m exporter.cli run --model '{bundle}' --prompt hi --max-new-tokens 64 --stream "
           "| head -c 1 >/dev/null; echo ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert b"Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip() in (b"0", b"1"), r.stdout  # 1: stopped by the closed pipe; 0: all fit in the pipe


@pytest.mark.parametrize("command", ["run", "bench", "quantize", "eval"])
@pytest.mark.parametrize("threads", [0, -1, 1000000])
def test_threads_are_bounded_by_the_cores(tmp_path, tiny_models, command, threads):
    bundle = tiny_models.case("chatglm3-thudm-hd32")[1]
    args = {"run": ["run", "--model", bundle, "--prompt", "hi"],
            "bench": ["bench", "--model", bundle],
            "quantize": ["quantize", "--model", bundle, "--out", str(tmp_path / "q"), "--precision", "fp16"],
            "eval": ["eval", "--model", bundle, "--reference", bundle, "--data", str(tmp_path / "none.txt")]}[command]
    r = CliRunner().invoke(main, args + ["--threads", str(threads)])
    assert_one_line_error(r.exit_code, r.output, "--threads", f"1 to {cores()}")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("size, needle", [(64 << 20, "line 1 is longer than"), (1 << 30, "MiB, more than")])
def test_a_huge_calibration_line_or_file_is_an_error_not_bad_alloc(tmp_path, tiny_models, size, needle):
    bundle = tiny_models.case("chatglm3-thudm-hd32")[1]
    data = tmp_path / "calib.txt"
    with open(data, "wb") as f:  # sparse: one line of NUL bytes, no disk used
        f.truncate(size)
    for args in (["quantize", "--model", bundle, "--out", str(tmp_path / "q"), "--precision", "int8",
                  "--calib-data", str(data), "--quiet"],
                 ["eval", "--model", bundle, "--reference", bundle, "--data", str(data), "--quiet"]):
        r = CliRunner().invoke(main, args)
        assert_one_line_error(r.exit_code, r.output, str(data), needle)
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []


def test_invalid_utf8_in_calibration_data_names_the_line(tmp_path, tiny_models):
    bundle = tiny_models.case("chatglm3-thudm-hd32")[1]
    data = tmp_path / "eval.txt"
    data.write_bytes(b"good line one\ngood line two\nbad \xff line\n")
    r = CliRunner().invoke(main, ["eval", "--model", bundle, "--reference", bundle, "--data", str(data)])
    assert_one_line_error(r.exit_code, r.output, "not UTF-8", "line 3")


# ------------------------------------------------------------------------------------------------ one error path


def test_a_bug_shows_its_traceback_and_asks_for_a_report(tmp_path, monkeypatch):
    import exporter.tiny.checkpoint as ck

    def broken(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setattr(ck, "write_tiny_checkpoint", broken)
    r = CliRunner().invoke(main, ["tiny", "--out", str(tmp_path / "ck")])
    assert r.exit_code == BUG_EXIT
    assert "Traceback" in r.output and "AttributeError" in r.output
    assert r.output.strip().splitlines()[-1].startswith("error: this is a bug in glm-export; please report it")
    assert os.listdir(tmp_path) == []  # the staged directory was removed all the same


def test_ctrl_c_is_one_line_and_cleans_up(tmp_path, monkeypatch):
    import exporter.tiny.checkpoint as ck

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "write_tiny_checkpoint", interrupted)
    r = CliRunner().invoke(main, ["tiny", "--out", str(tmp_path / "ck")])
    assert r.exit_code == 130 and r.output.strip() == "interrupted"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, needle", [
    (["run", "--model", "b"], "give exactly one of --prompt or --prompt-ids"),
    (["run", "--model", "b", "--prompt", "x", "--threads", "abc"], "'--threads'"),
    (["run", "--model", "b", "--prompt", "x", "--bogus"], "No such option '--bogus'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_usage_errors_are_one_line(args, needle):
    r = CliRunner().invoke(main, args)
    line = assert_one_line_error(r.exit_code, r.output, needle, "--help')")
    assert "Usage:" not in r.output and line
