"""glm-export run / chat / bench on a tiny bundle, through the real command group."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from exporter.cli import main
from runtime.api import GlmModel
from runtime.sampling import GenerationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bundle(tiny_models):
    ckpt = tiny_models.checkpoint("cli", "chatglm3", "thudm")
    return tiny_models.bundle("cli", ckpt)


@pytest.fixture(scope="module")
def model(bundle):
    with GlmModel.load(bundle, threads=1) as m:
        yield m


def invoke(args, input=None):
    return CliRunner().invoke(main, args, input=input, catch_exceptions=False)


def test_commands_are_registered():
    assert {"run", "chat", "bench"} <= set(main.commands)


def test_run_json_with_prompt_ids(bundle, model):
    r = invoke(["run", "--model", bundle, "--prompt-ids", "5, 6,7,8", "--max-new-tokens", "7", "--threads", "1",
                "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"prompt_ids", "generated_ids", "text", "finish_reason", "timings"}
    assert out["prompt_ids"] == [5, 6, 7, 8]
    want = model.generate([5, 6, 7, 8], GenerationConfig(max_new_tokens=7))
    assert out["generated_ids"] == want.generated_ids
    assert out["text"] == want.text
    assert out["finish_reason"] == want.finish_reason
    assert {"prefill_ms", "decode_tokens_per_s"} <= set(out["timings"])


def test_run_text_sampling_matches_api(bundle, model):
    r = invoke(["run", "--model", bundle, "--prompt", "hello world", "--max-new-tokens", "6", "--temperature", "0.7",
                "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "5", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                           repetition_penalty=1.1, seed=5)
    want = model.generate("hello world", cfg)
    assert out["prompt_ids"] == want.prompt_ids and out["generated_ids"] == want.generated_ids


def test_run_stream_prints_text_and_status(bundle, model):
    r = invoke(["run", "--model", bundle, "--prompt", "the model", "--max-new-tokens", "10", "--stream"])
    assert r.exit_code == 0, r.output
    want = model.generate("the model", GenerationConfig(max_new_tokens=10))
    assert r.stdout == want.text + "\n"
    assert r.stderr.startswith(f"[{want.finish_reason}: {len(want.generated_ids)} tokens")


def test_run_stop_string(bundle, model):
    full = model.generate("the model", GenerationConfig(max_new_tokens=16))
    assert len(full.text) >= 4
    stop = full.text[2:4]
    r = invoke(["run", "--model", bundle, "--prompt", "the model", "--max-new-tokens", "16", "--stop", stop, "--json"])
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and out["text"] == full.text[: full.text.index(stop)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1,2", "--top-p", "1.5"], "error: top_p must be in (0, 1], got 1.5"),
        (["--prompt-ids", "1,2", "--temperature", "0"], "error: temperature must be > 0"),
        (["--prompt-ids", "1,x"], "--prompt-ids"),
        (["--prompt-ids", "1,2", "--greedy", "--temperature", "0.5"], "--greedy cannot be combined with --temperature"),
        (["--prompt", "a", "--prompt-ids", "1"], "exactly one of --prompt or --prompt-ids"),
        (["--prompt-ids", "1,2", "--system", "s"], "--system needs --chat"),
    ],
)
def test_run_bad_options(bundle, args, message):
    r = invoke(["run", "--model", bundle] + args)
    assert r.exit_code == 2
    assert message in r.stderr


def test_typed_errors_are_one_line(bundle, tmp_path):
    r = invoke(["run", "--model", str(tmp_path / "missing"), "--prompt-ids", "1"])
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]
    r = invoke(["run", "--model", bundle, "--prompt-ids", "1,2", "--top-p", "1.5"])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["error: top_p must be in (0, 1], got 1.5"]
    r = invoke(["run", "--model", bundle, "--prompt-ids", ",".join(["3"] * 2048)])
    assert r.exit_code == 2 and "context holds 2048" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_error_in_a_real_process(bundle):
    """The installed entry point path: a subprocess, real stderr, exit status 2, no traceback."""
    out = subprocess.run([sys.executable, "-m", "exporter.cli", "run", "--model", bundle, "--prompt-ids", "1",
                          "--top-p", "1.5"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: top_p must be in (0, 1], got 1.5"


def test_chat_keeps_history_clears_and_quits(bundle, model):
    greedy = GenerationConfig(max_new_tokens=8)
    r = invoke(["chat", "--model", bundle, "--greedy", "--max-new-tokens", "8", "--system", "be brief"],
               input="hello\nhow are you\n/clear\nhow are you\n/quit\nnever read\n")
    assert r.exit_code == 0, r.output
    system = {"role": "system", "content": "be brief"}
    first = model.chat([system, {"role": "user", "content": "hello"}], greedy)
    second = model.chat([system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": first.text},
                         {"role": "user", "content": "how are you"}], greedy)
    fresh = model.chat([system, {"role": "user", "content": "how are you"}], greedy)
    assert second.text != fresh.text  # the history changes the reply, so the comparison below can tell
    # stdin is not a terminal, so no "user> " prompts: the output is exactly the three replies
    assert r.stdout == (f"assistant> {first.text}\nassistant> {second.text}\n(history cleared)\n"
                        f"assistant> {fresh.text}\n")


def test_chat_ends_at_end_of_input(bundle):
    r = invoke(["chat", "--model", bundle, "--max-new-tokens", "4", "--seed", "1"], input="hi\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("assistant> ") == 1


def test_bench_json(bundle):
    r = invoke(["bench", "--model", bundle, "--prompt-len", "4", "--prompt-len", "9", "--batch", "1", "--batch", "2",
                "--new-tokens", "5", "--runs", "2", "--warmup", "1", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rows = out["results"]
    assert [(x["prompt_len"], x["batch"]) for x in rows] == [(4, 1), (4, 2), (9, 1), (9, 2)]
    for x in rows:
        assert x["prefill_ms"] > 0 and x["decode_tokens_per_s"] > 0
        assert x["batch_tokens_per_s"] == pytest.approx(x["decode_tokens_per_s"] * x["batch"])
        assert 0 < x["token_latency_p50_ms"] <= x["token_latency_p90_ms"]
    assert out["peak_rss_mib"] > 10
    assert out["io_binding"] is True and out["prefill_chunk"] == 256


def test_bench_plain_path_chunked(bundle):
    r = invoke(["bench", "--model", bundle, "--prompt-len", "7", "--new-tokens", "3", "--runs", "1", "--warmup", "0",
                "--no-io-binding", "--prefill-chunk", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["io_binding"] is False and out["prefill_chunk"] == 2 and out["results"][0]["decode_tokens_per_s"] > 0


def test_bench_table_and_context_refusal(bundle):
    r = invoke(["bench", "--model", bundle, "--prompt-len", "3", "--new-tokens", "3", "--runs", "1", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    assert "prefill ms" in r.stdout and "peak RSS" in r.stdout
    r = invoke(["bench", "--model", bundle, "--prompt-len", "2040", "--new-tokens", "20", "--runs", "1"])
    assert r.exit_code == 2 and "exceeds the context" in r.stderr
