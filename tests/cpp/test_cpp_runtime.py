"""The C++ runtime (runtime/cpp) against the Python runtime, token for token, on the tiny bundles of every case.

Needs the C++ build (`make cpp`: build/cpp/glm-run, glm-tokenize, the examples); skipped, saying so, when it is
absent. ``make test-cpp`` (and ``make test``) build it first, so in CI these tests run. GLM_CPP_BUILD points
elsewhere (e.g. a sanitizer build).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("GLM_CPP_BUILD", os.path.join(ROOT, "build", "cpp"))
GLM_RUN = os.path.join(BUILD, "glm-run")
GLM_TOKENIZE = os.path.join(BUILD, "glm-tokenize")
C_EXAMPLE = os.path.join(BUILD, "examples", "glm_c_example")
CPP_EXAMPLE = os.path.join(BUILD, "examples", "glm_embed_example")

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(GLM_RUN) and os.path.isfile(GLM_TOKENIZE)),
    reason=f"C++ runtime not built ({GLM_RUN} missing): run 'make cpp' (make test-cpp builds it and runs these)",
)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
THREADS = 2
NEW_TOKENS = 32


# ------------------------------------------------------------------------------------------------ fixtures


class _Bundles:
    """The tiny bundles of every case and precision, built once per session from conftest's CASES."""

    def __init__(self, tiny_models, root):
        self.tiny = tiny_models
        self.root = root
        self.made = {}

    def get(self, case, precision="fp32"):
        key = (case, precision)
        if key in self.made:
            return self.made[key]
        _, fp32 = self.tiny.case(case)
        if precision == "fp32":
            path = fp32
        else:
            from calibration.pipeline import QuantizeOptions, quantize_bundle

            path = os.path.join(self.root, f"{case}-{precision}")
            os.makedirs(path)
            extra = {}
            if precision == "int8":
                extra = dict(calib_data=self._calib_file(), calib_samples=16, calib_seq_len=32)
            quantize_bundle(fp32, path, QuantizeOptions(precision=precision, evaluate=False, **extra))
        self.made[key] = path
        return path

    def _calib_file(self):
        path = os.path.join(self.root, "calib.txt")
        if not os.path.isfile(path):
            from exporter.tiny.tokenizers import corpus_lines

            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(corpus_lines()) + "\n")
        return path


@pytest.fixture(scope="session")
def bundles(tiny_models, tmp_path_factory):
    return _Bundles(tiny_models, str(tmp_path_factory.mktemp("cpp-bundles")))


_MODELS = {}
PY_GRAPH = "portable"  # what glm-run executes: the manifest's model_file, never model.fused.onnx


def py_model(path):
    from runtime.api import GlmModel

    if path not in _MODELS:
        # the C++ runtime runs the bundle's portable graph (manifest model_file); compare it with the same graph
        _MODELS[path] = GlmModel.load(path, threads=THREADS, graph=PY_GRAPH)
    return _MODELS[path]


def glm_run(*args, check=True):
    r = subprocess.run([GLM_RUN, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def run_json(bundle, *args):
    r = glm_run("--model", bundle, "--threads", THREADS, "--json", *args)
    return json.loads(r.stdout)


def ids_arg(ids):
    return ",".join(str(i) for i in ids)


def batch_prompts(model):
    """Three prompts of different lengths (left padding), drawn from the ordinary vocabulary."""
    tok = model.tokenizer
    prompts = [model.encode("你好，今天天气怎么样？"), model.encode("def add(a, b):\n    return a + b"),
               model.encode("The model reads the config file.")]
    rng = np.random.default_rng(7)
    base = min(tok.vocab_size, model.spec.vocab_size) if tok else model.spec.vocab_size
    specials = set(tok.special_ids.values()) if tok else set()
    pool = [i for i in range(base) if i not in specials and i not in model.spec.eos_token_ids]
    prompts[2] = prompts[2] + [int(i) for i in rng.choice(pool, size=9)]
    return prompts


def same_result(cpp, py, text=True):
    assert cpp["prompt_ids"] == list(py.prompt_ids)
    assert cpp["generated_ids"] == list(py.generated_ids)
    assert cpp["finish_reason"] == py.finish_reason
    if text:
        assert cpp["text"] == py.text


# ------------------------------------------------------------------------------------------------ greedy parity


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_ids_equal_python(bundles, case, precision):
    from runtime.sampling import GenerationConfig

    path = bundles.get(case, precision)
    model = py_model(path)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    # batch 1, a text prompt (the C++ tokenizer encodes it)
    prompt = "你好, The exporter checks every weight."
    py = model.generate(prompt, config)
    same_result(run_json(path, "--prompt", prompt, "--max-new-tokens", NEW_TOKENS, "--greedy"), py)
    # a left-padded batch of 3
    prompts = batch_prompts(model)
    py3 = model.generate(prompts, config)
    args = [a for p in prompts for a in ("--prompt-ids", ids_arg(p))]
    cpp3 = run_json(path, *args, "--max-new-tokens", NEW_TOKENS)
    assert len(cpp3) == 3
    for c, p in zip(cpp3, py3):
        same_result(c, p)


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("case", ["chatglm3-thudm-hd32", "glm4-thudm", "glm4_0414-hf"])
def test_seeded_sampling_ids_equal_python(bundles, case):
    """The C++ runtime draws from numpy's default_rng(seed) (SeedSequence + PCG64) with the Python sampler's
    arithmetic, so a seed gives Python's ids: here with temperature, top-k, top-p and a repetition penalty."""
    from runtime.sampling import GenerationConfig

    path = bundles.get(case)
    model = py_model(path)
    settings = [
        dict(temperature=0.8, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0),
        dict(temperature=1.3, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=12345),
        dict(temperature=0.7, top_k=5, top_p=0.5, repetition_penalty=1.0, seed=2**33 + 5),
    ]
    prompts = batch_prompts(model)
    for s in settings:
        cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=True, **s)
        flags = ["--temperature", s["temperature"], "--top-k", s["top_k"], "--top-p", s["top_p"],
                 "--repetition-penalty", s["repetition_penalty"], "--seed", s["seed"]]
        py = model.generate(prompts[0], cfg)
        same_result(run_json(path, "--prompt-ids", ids_arg(prompts[0]), "--max-new-tokens", NEW_TOKENS, *flags), py)
        py3 = model.generate(prompts, cfg)
        args = [a for p in prompts for a in ("--prompt-ids", ids_arg(p))]
        for c, p in zip(run_json(path, *args, "--max-new-tokens", NEW_TOKENS, *flags), py3):
            same_result(c, p)


def test_greedy_repetition_penalty_and_stop_string(bundles):
    from runtime.sampling import GenerationConfig

    path = bundles.get("glm4-thudm")
    model = py_model(path)
    prompt = "我们喜欢中文文本"
    py = model.generate(prompt, GenerationConfig(max_new_tokens=NEW_TOKENS, repetition_penalty=1.3))
    same_result(run_json(path, "--prompt", prompt, "--max-new-tokens", NEW_TOKENS, "--repetition-penalty", 1.3), py)
    # a stop string taken from the middle of the greedy text
    full = model.generate(prompt, GenerationConfig(max_new_tokens=NEW_TOKENS)).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    py = model.generate(prompt, GenerationConfig(max_new_tokens=NEW_TOKENS, stop=(stop,)))
    cpp = run_json(path, "--prompt", prompt, "--max-new-tokens", NEW_TOKENS, "--stop", stop)
    assert py.finish_reason == "stop"
    same_result(cpp, py)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_context_limit_and_rows_leaving_the_batch(bundles, tmp_path, precision):
    """A bundle whose context is 40 tokens: generation ends with 'context', as in Python; in a batch the rows with
    longer prompts finish first and leave the batch (the cache rows are selected), the others go on."""
    from runtime.api import GlmModel
    from runtime.sampling import GenerationConfig

    src = bundles.get("chatglm3-thudm-hd32", precision)
    path = edited_bundle(src, tmp_path / "short", lambda m: m["spec"].update(max_position_embeddings=40))
    with GlmModel.load(path, threads=THREADS, graph=PY_GRAPH) as model:
        ids = model.encode("你好，今天天气怎么样？")
        config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=())
        py = model.generate(ids, config)
        prompts = [ids, ids[:4], ids + ids[:7]]
        py3 = model.generate(prompts, config)
    assert py.finish_reason == "context"
    assert len({len(r.generated_ids) for r in py3}) == 3  # three different finishing steps
    same_result(run_json(path, "--prompt-ids", ids_arg(ids), "--max-new-tokens", NEW_TOKENS, "--ignore-eos"), py)
    args = [a for p in prompts for a in ("--prompt-ids", ids_arg(p))]
    for c, p in zip(run_json(path, *args, "--max-new-tokens", NEW_TOKENS, "--ignore-eos"), py3):
        same_result(c, p)


def test_chunked_prefill_equals_python(bundles):
    """Prompts prefilled 5 columns per forward (--prefill-chunk / prefill_chunk) give Python's ids."""
    from runtime.api import GlmModel
    from runtime.sampling import GenerationConfig

    path = bundles.get("glm4-thudm")
    with GlmModel.load(path, threads=THREADS, prefill_chunk=5, graph=PY_GRAPH) as model:
        prompts = batch_prompts(model)
        py3 = model.generate(prompts, GenerationConfig(max_new_tokens=NEW_TOKENS))
    args = [a for p in prompts for a in ("--prompt-ids", ids_arg(p))]
    for c, p in zip(run_json(path, *args, "--max-new-tokens", NEW_TOKENS, "--prefill-chunk", 5), py3):
        same_result(c, p)


def test_stream_prints_the_text(bundles):
    path = bundles.get("chatglm3-thudm-hd32")
    cpp = run_json(path, "--prompt", "你好", "--max-new-tokens", NEW_TOKENS)
    r = glm_run("--model", path, "--threads", THREADS, "--prompt", "你好", "--max-new-tokens", NEW_TOKENS, "--stream")
    assert r.stdout == cpp["text"] + "\n"
    assert r.stderr.startswith("[" + cpp["finish_reason"])


# ------------------------------------------------------------------------------------------------ chat


@pytest.mark.parametrize("case", sorted(CASES))
def test_chat_ids_and_reply_equal_python(bundles, case):
    from runtime.sampling import GenerationConfig

    path = bundles.get(case)
    model = py_model(path)
    question = "你好，请写一个 <|user|> Python 函数"
    messages = [{"role": "user", "content": question}]
    py = model.chat(messages, GenerationConfig(max_new_tokens=NEW_TOKENS))
    same_result(run_json(path, "--chat", "--prompt", question, "--max-new-tokens", NEW_TOKENS), py)
    if model.spec.chat_format != "chatglm2":  # chatglm2 has no system role
        messages = [{"role": "system", "content": "You are brief."}] + messages
        py = model.chat(messages, GenerationConfig(max_new_tokens=NEW_TOKENS))
        same_result(run_json(path, "--chat", "--system", "You are brief.", "--prompt", question,
                             "--max-new-tokens", NEW_TOKENS), py)


# ------------------------------------------------------------------------------------------------ tokenizers

CORPUS = [
    "你好，世界！今天天气怎么样？",
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see.",
    "def add(a, b):\n    return a + b\n\n\tif x:\n        print('ok')  # comment\n",
    "emoji 😀🚀 and 👨‍👩‍👧 family, ümlaut café naïve",
    "   leading spaces, trailing   \n\n\n  \t  mixed\r\nwhitespace runs      ",
    "typed specials stay text: <|user|> [gMASK] sop <sop> <|endoftext|> <|assistant|>",
    "数字 1234567890 和 3.14159，混合 English 与中文。",
    "\u00a0nbsp\u3000ideographic space\u2028line sep",
    "a",
    " ",
    "\n",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ ｶﾀｶﾅ",
]

TOKENIZER_CASES = {  # one bundle per tokenizer kind / chat format
    "sentencepiece-chatglm3": "chatglm3-thudm-hd32",
    "sentencepiece-chatglm2": "chatglm2_32k-thudm-interp",
    "tiktoken-glm4": "glm4-thudm",
    "tokenizer.json-template": "glm4_0414-hf",
}


def tokenize(path, requests):
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests)
    r = subprocess.run([GLM_TOKENIZE, path], input=lines, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.split("\n") if line]
    assert len(out) == len(requests)
    return out


def ok(answer):
    assert "error" not in answer, answer
    return answer["ok"]


@pytest.mark.parametrize("name", sorted(TOKENIZER_CASES))
def test_tokenizer_encode_decode_equal_python(bundles, name):
    from runtime.tokenizer import StreamDecoder

    path = bundles.get(TOKENIZER_CASES[name])
    tok = py_model(path).tokenizer
    requests, expected = [], []
    for text in CORPUS:
        requests += [{"encode": text}, {"encode_prompt": text}, {"encode_specials": text}]
        expected += [tok.encode(text), tok.encode_prompt(text), tok.encode_with_specials(text)]
    rng = np.random.default_rng(3)
    id_lists = [tok.encode(t) for t in CORPUS]
    id_lists += [[int(i) for i in rng.integers(0, tok.vocab_size + 5, size=n)] for n in (1, 3, 17, 40)]
    id_lists.append(tok.encode("中文😀")[:-1] + tok.prefix_ids() + tok.encode("é"))  # a cut character, specials
    for ids in id_lists:
        requests.append({"decode": ids})
        expected.append(tok.decode(ids))
        requests.append({"stream": ids})
        d = StreamDecoder(tok)
        expected.append([d.push(i) for i in ids] + [d.flush()])
    answers = tokenize(path, requests)
    for req, want, got in zip(requests, expected, answers):
        assert ok(got) == want, req


CHATS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": "What is ONNX?"}, {"role": "assistant", "content": "A format."},
     {"role": "user", "content": "typed <|assistant|> stays text?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "ok", "metadata": "meta"}, {"role": "observation", "content": "{\"r\": 1}"},
     {"role": "tool", "content": "done"}],
    [{"role": "system", "content": "tools:", "tools": [{"name": "get_weather", "parameters": {"city": "北京"}}]},
     {"role": "user", "content": "天气？"}],
]


@pytest.mark.parametrize("name", sorted(TOKENIZER_CASES))
def test_chat_prompt_ids_equal_python(bundles, name):
    from runtime.chat import build_chat_ids, chat_stop_ids

    path = bundles.get(TOKENIZER_CASES[name])
    model = py_model(path)
    requests, expected = [], []
    for messages in CHATS:
        try:
            want = {"ok": build_chat_ids(model.tokenizer, model.spec, messages)}
        except Exception as e:  # noqa: BLE001 - both sides must refuse the same conversations
            want = {"error": type(e).__name__}
        requests.append({"chat": messages})
        expected.append(want)
    requests.append({"chat_stop_ids": True})
    expected.append({"ok": sorted(chat_stop_ids(model.tokenizer, model.spec))})
    answers = tokenize(path, requests)
    for req, want, got in zip(requests, expected, answers):
        if "error" in want:
            # Python refuses (chatglm2 roles); the C++ side must refuse too
            assert "error" in got, (req, got)
        else:
            assert ok(got) == want["ok"], req


# ------------------------------------------------------------------------------------------------ bad input


def edited_bundle(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    return str(dst)


def one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0][len("error: "):]


def python_error(fn):
    from runtime.errors import GlmExportError

    with pytest.raises(GlmExportError) as e:
        fn()
    return str(e.value)


def test_bad_bundles_are_one_line_errors_like_python(bundles, tmp_path):
    from runtime.api import GlmModel

    src = bundles.get("chatglm3-thudm-hd32")
    cases = {
        "missing": str(tmp_path / "nope"),
        "newer": edited_bundle(src, tmp_path / "newer", lambda m: m.update(format_version=99)),
        "not-a-manifest": edited_bundle(src, tmp_path / "fmt", lambda m: m.update(format="other")),
        "unknown-field": edited_bundle(src, tmp_path / "field", lambda m: m["spec"].update(bogus=1)),
    }
    no_manifest = tmp_path / "no-manifest"
    shutil.copytree(src, no_manifest)
    os.remove(no_manifest / "manifest.json")
    cases["no-manifest"] = str(no_manifest)
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    with open(truncated / "model.onnx", "r+b") as f:
        f.truncate(1000)
    cases["truncated-model"] = str(truncated)
    for name, path in cases.items():
        msg = one_error_line(glm_run("--model", path, "--prompt-ids", "1,2,3", check=False))
        assert msg == python_error(lambda: GlmModel.load(path)), name
    # same size, other bytes: caught by the checksum where asked, and by onnxruntime otherwise
    flipped = tmp_path / "flipped"
    shutil.copytree(src, flipped)
    size = os.path.getsize(flipped / "model.onnx")
    with open(flipped / "model.onnx", "r+b") as f:
        f.write(b"\xff" * min(size, 4096))
    msg = one_error_line(glm_run("--model", flipped, "--prompt-ids", "1,2,3", check=False))  # checked by default
    assert "checksum mismatch" in msg and msg == python_error(lambda: GlmModel.load(str(flipped)))
    msg = one_error_line(glm_run("--model", flipped, "--prompt-ids", "1,2,3", "--verify-checksums", check=False))
    assert msg == python_error(lambda: GlmModel.load(str(flipped), verify_checksums=True))
    msg = one_error_line(glm_run("--model", flipped, "--prompt-ids", "1,2,3", "--no-verify-files", check=False))
    assert "onnxruntime cannot load it" in msg


def _outside_cases(src, tmp_path):
    """Bundles whose manifest names files outside themselves, each as runtime/bundle_paths.py refuses it."""
    cases = {
        "files-parent": lambda m: m["files"].update({"../manifest.json": {"bytes": 1}}),
        "files-absolute": lambda m: m["files"].update({"/etc/hostname": {"bytes": 1}}),
        "model-file-parent": lambda m: m.update(model_file="../model.onnx"),
        "model-file-unlisted": lambda m: m.update(model_file="nope.onnx"),
        "tokenizer-files-parent": lambda m: m.update(tokenizer_files=["../../.bashrc"]),
    }
    out = {name: edited_bundle(src, tmp_path / name, edit) for name, edit in cases.items()}
    link = tmp_path / "symlink-out"
    shutil.copytree(src, link)
    (tmp_path / "outside.txt").write_text("not the bundle's")
    os.symlink(tmp_path / "outside.txt", link / "extra.txt")
    with open(link / "manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["files"]["extra.txt"] = {"bytes": len("not the bundle's")}
    with open(link / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    out["symlink-out"] = str(link)
    return out


def test_names_outside_the_bundle_are_refused_like_python(bundles, tmp_path):
    from runtime.api import GlmModel

    for name, path in _outside_cases(bundles.get("chatglm3-thudm-hd32"), tmp_path).items():
        msg = one_error_line(glm_run("--model", path, "--prompt-ids", "1,2,3", check=False))
        want = python_error(lambda: GlmModel.load(path))
        assert msg == want, name
        assert "inside itself" in msg or "not listed" in msg, name


def test_external_data_outside_the_bundle_is_refused(bundles, tmp_path):
    """The graph's own external-data locations: left to onnxruntime in C++ (the README says so), which must refuse
    one outside the bundle's folder."""
    import onnx

    bundle = tmp_path / "b"
    shutil.copytree(bundles.get("chatglm3-thudm-hd32"), bundle)
    from onnx.external_data_helper import set_external_data

    proto = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    big = max(proto.graph.initializer, key=lambda t: len(t.raw_data))  # the tiny bundle keeps its weights inline
    assert big.raw_data
    (tmp_path / "outside.data").write_bytes(big.raw_data)
    set_external_data(big, "../outside.data", 0, len(big.raw_data))
    big.ClearField("raw_data")
    big.data_location = onnx.TensorProto.EXTERNAL
    with open(bundle / "model.onnx", "wb") as f:
        f.write(proto.SerializeToString())
    # a crafted manifest: its record of model.onnx matches the edited graph, so only the location can be refused
    from runtime.integrity import sha256_file

    edited_record = {"bytes": os.path.getsize(bundle / "model.onnx"), "sha256": sha256_file(str(bundle / "model.onnx"))}
    with open(bundle / "manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["files"]["model.onnx"] = edited_record
    with open(bundle / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    r = glm_run("--model", bundle, "--prompt-ids", "1,2,3", check=False)
    msg = one_error_line(r)
    assert "escapes model directory" in msg, msg


def test_the_verified_stamp_is_shared_with_python(bundles, tmp_path):
    """A bundle is hashed once, whichever runtime loads it first: glm-run writes the stamp runtime/integrity.py
    reads (Python then hashes nothing), and a stamp Python wrote is used by glm-run as it stands."""
    from runtime.integrity import STAMP_NAME, verify_files
    from runtime.manifest import read_manifest

    bundle = tmp_path / "b"
    shutil.copytree(bundles.get("chatglm3-thudm-hd32"), bundle)
    stamp = bundle / STAMP_NAME
    if stamp.exists():
        stamp.unlink()
    glm_run("--model", bundle, "--prompt-ids", "1,2,3", "--max-new-tokens", "1")
    assert stamp.exists()
    files = read_manifest(str(bundle), check_files=True, verify_files=False).files
    assert verify_files(str(bundle), files) == 0  # C++'s stamp covers every file
    assert set(json.loads(stamp.read_text())["files"]) == {n for n, r in files.items() if "sha256" in r}

    stamp.unlink()
    assert verify_files(str(bundle), files) > 0  # Python hashes and stamps
    before = (stamp.read_bytes(), os.stat(stamp).st_mtime_ns)
    glm_run("--model", bundle, "--prompt-ids", "1,2,3", "--max-new-tokens", "1")
    assert (stamp.read_bytes(), os.stat(stamp).st_mtime_ns) == before  # used as it stands, not rewritten

    data = bundle / "model.onnx"  # a changed file is hashed again: the stamp never makes a mismatch pass
    with open(data, "r+b") as f:
        f.write(b"\xff" * 64)
    msg = one_error_line(glm_run("--model", bundle, "--prompt-ids", "1,2,3", check=False))
    assert "checksum mismatch" in msg


def test_bad_requests_are_one_line_errors_like_python(bundles):
    from runtime.sampling import GenerationConfig

    path = bundles.get("chatglm3-thudm-hd32")
    model = py_model(path)
    long_ids = ids_arg([5] * model.context_length)
    checks = [
        (["--prompt-ids", long_ids], lambda: model.generate([5] * model.context_length)),
        (["--prompt-ids", "1,2,99999"], lambda: model.generate([1, 2, 99999])),
        (["--prompt-ids", "1,2", "--temperature", "0"], lambda: GenerationConfig(do_sample=True, temperature=0.0)),
        (["--prompt-ids", "1,2", "--top-p", "1.5"], lambda: GenerationConfig(do_sample=True, top_p=1.5)),
        (["--prompt-ids", "1,2", "--top-k", "-1"], lambda: GenerationConfig(do_sample=True, top_k=-1)),
        (["--prompt-ids", "1,2", "--repetition-penalty", "0"], lambda: GenerationConfig(repetition_penalty=0.0)),
        (["--prompt-ids", "1,2", "--temperature", "nan"],
         lambda: GenerationConfig(do_sample=True, temperature=float("nan"))),
    ]
    for args, fn in checks:
        msg = one_error_line(glm_run("--model", path, *args, check=False))
        assert msg == python_error(fn), args
    # usage mistakes: exit 2 with the usage and one "Error:" line, never a crash
    for args in (["--prompt-ids", "1,x"], ["--prompt", "a", "--prompt-ids", "1"], ["--greedy", "--seed", "1",
                 "--prompt", "a"], ["--max-new-tokens", "0", "--prompt", "a"], ["--bogus"], ["--prompt"]):
        r = glm_run("--model", path, *args, check=False)
        assert r.returncode == 2 and "Error: " in r.stderr, (args, r.stderr)


# ------------------------------------------------------------------------------------------------ the examples


def test_examples_embed_the_library(bundles):
    path = bundles.get("glm4-thudm")
    expected = run_json(path, "--prompt", "你好", "--max-new-tokens", NEW_TOKENS)
    r = subprocess.run([C_EXAMPLE, path, "你好"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert obj["generated_ids"] == expected["generated_ids"]
    r = subprocess.run([CPP_EXAMPLE, path, "你好"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    chat = run_json(path, "--chat", "--prompt", "你好", "--max-new-tokens", NEW_TOKENS)
    assert r.stdout.startswith(chat["text"])
    r = subprocess.run([C_EXAMPLE, "/nonexistent"  , "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == "error: /nonexistent: bundle directory does not exist"
