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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    assert out["backend"] == "onnxruntime" and out["engine"] is None and out["provider"] == "cpu"
    assert out["graph"] == "fused" and out["kv_cache"] == "float32"


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


# ---------------------------------------------------------------------------------- --backend / --provider tensorrt


def _one_error_line(r):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture()
def engine_dir(bundle, tmp_path):
    """An engine directory whose engine.json is the record glm-export trt writes for this bundle (no engine.plan:
    nothing here gets as far as TensorRT)."""
    from exporter.tensorrt.build import EngineOptions, engine_record, precision_plan
    from runtime.manifest import MANIFEST_NAME, read_manifest, sha256_of
    from runtime.tensorrt.profiles import ProfileRequest, profiles_for_manifest

    manifest = read_manifest(bundle)
    request = ProfileRequest(max_batch=1, max_input_len=16, max_seq_len=64)
    record = engine_record(manifest, sha256_of(os.path.join(bundle, MANIFEST_NAME)),
                           profiles_for_manifest(manifest, request), precision_plan(manifest.precision),
                           EngineOptions(request), "10.13.0.35", "NVIDIA H200", "9.0", "00" * 32, 0, bundle)
    path = tmp_path / "engine"
    path.mkdir()
    (path / "engine.json").write_text(json.dumps(record))
    return str(path)


@pytest.mark.parametrize("command", ["run", "chat", "bench"])
def test_backend_tensorrt_without_engine(bundle, command):
    extra = ["--prompt-ids", "1,2"] if command == "run" else []
    r = invoke([command, "--model", bundle, "--backend", "tensorrt"] + extra, input="hi\n")
    line = _one_error_line(r)
    assert line.startswith("error: --backend tensorrt needs --engine ENGINE_DIR")
    assert "glm-export trt --model BUNDLE_DIR --out ENGINE_DIR" in line


@pytest.mark.parametrize("backend_args", [["--backend", "tensorrt"], []], ids=["explicit", "implied-by-engine"])
def test_backend_tensorrt_when_tensorrt_is_not_installed(bundle, engine_dir, monkeypatch, backend_args):
    """sys.modules["tensorrt"] = None makes `import tensorrt` fail as where it is not installed (no module is
    faked), so this runs the same on machines that have TensorRT."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    r = invoke(["run", "--model", bundle, "--engine", engine_dir, "--prompt-ids", "1,2"] + backend_args)
    line = _one_error_line(r)
    assert line.startswith("error: the tensorrt package is not installed")
    assert "pip install tensorrt-cu12" in line and "cuda-python" in line
    r = invoke(["bench", "--model", bundle, "--engine", engine_dir, "--runs", "1"] + backend_args)
    assert _one_error_line(r) == line


def test_engine_directory_without_engine_json(bundle, tmp_path):
    (tmp_path / "engine.plan").write_bytes(b"trtexec-built")
    line = _one_error_line(invoke(["run", "--model", bundle, "--engine", str(tmp_path), "--prompt-ids", "1"]))
    assert "engine.json: unreadable" in line and "glm-export trt --model BUNDLE_DIR --out ENGINE_DIR" in line


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnxruntime", "--engine", "E"], "--engine is for --backend tensorrt"),
    (["--backend", "tensorrt", "--engine", "E", "--threads", "2"], "--threads: onnxruntime options, not used by "
                                                                   "--backend tensorrt"),
    (["--engine", "E", "--provider", "cuda", "--max-seq-len", "64"], "--max-seq-len, --provider: onnxruntime options"),
    (["--trt-fp16"], "--trt-fp16: options of onnxruntime's TensorRT execution provider; add --provider tensorrt"),
    (["--provider", "cuda", "--max-seq-len", "64", "--trt-cache-dir", "c"],
     "--max-seq-len, --trt-cache-dir: options of onnxruntime's TensorRT execution provider"),
    (["--device", "1"], "--device selects a CUDA device"),
])
def test_options_that_do_not_apply_are_refused(bundle, args, message):
    line = _one_error_line(invoke(["run", "--model", bundle, "--prompt-ids", "1,2"] + args))
    assert message in line


def test_bench_no_io_binding_is_onnxruntime_only(bundle):
    line = _one_error_line(invoke(["bench", "--model", bundle, "--backend", "tensorrt", "--engine", "E",
                                   "--no-io-binding"]))
    assert "--no-io-binding: onnxruntime options" in line


def test_provider_tensorrt_on_cpu_onnxruntime(bundle, tmp_path):
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT execution provider")
    r = invoke(["run", "--model", bundle, "--prompt-ids", "1,2", "--provider", "tensorrt", "--max-seq-len", "64",
                "--trt-fp16", "--trt-cache-dir", str(tmp_path / "cache")])
    line = _one_error_line(r)
    assert "needs onnxruntime's TensorrtExecutionProvider" in line and "install onnxruntime-gpu" in line
    r = invoke(["run", "--model", bundle, "--prompt-ids", "1,2", "--provider", "tensorrt", "--max-seq-len", "9999"])
    assert "--max-seq-len 9999 is longer than the model's context of 2048" in _one_error_line(r)


def test_load_kwargs_from_the_command_line_options():
    from exporter.cli.options import MODEL_OPTIONS
    from exporter.cli.run import load_kwargs
    from runtime.tensorrt.ep_options import TrtProviderOptions

    def opts(**given):
        return dict({k: None for k in MODEL_OPTIONS}, bundle="B", **given)

    assert load_kwargs(opts()) == {"backend": "onnxruntime", "provider": "cpu", "threads": None, "io_binding": True}
    assert load_kwargs(opts(provider="cuda", device=1, threads=3, prefill_chunk=0), io_binding=False) == {
        "backend": "onnxruntime", "provider": "cuda:1", "threads": 3, "io_binding": False, "prefill_chunk": 0}
    assert load_kwargs(opts(provider="tensorrt", device=2, max_batch=2, max_input_len=128, max_seq_len=512,
                            trt_fp16=True, trt_cache_dir="/c")) == {
        "backend": "onnxruntime", "provider": "tensorrt:2", "threads": None, "io_binding": True,
        "trt_options": TrtProviderOptions(max_batch=2, max_input_len=128, max_seq_len=512, fp16=True,
                                          cache_dir="/c")}
    assert load_kwargs(opts(provider="tensorrt"))["trt_options"] == TrtProviderOptions()
    assert load_kwargs(opts(engine_dir="E", prefill_chunk=8)) == {"backend": "tensorrt", "engine_dir": "E",
                                                                  "device": 0, "prefill_chunk": 8}
    assert load_kwargs(opts(backend="tensorrt", engine_dir="E", device=1))["device"] == 1


def test_help_lists_the_backend_options():
    r = invoke(["run", "--help"])
    for flag in ("--backend [onnxruntime|tensorrt]", "--engine ENGINE_DIR", "--trt-cache-dir DIR", "--trt-fp16",
                 "--max-seq-len N", "--max-input-len N", "--max-batch N", "--device"):
        assert flag in r.stdout, flag
