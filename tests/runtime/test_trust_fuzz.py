"""Property-based tests (hypothesis) over manifests, configs and tokenizer inputs: whatever a file or a user says,
glm-export answers with its result or a typed one-line error (never another exception, so never a traceback), and
never writes outside the bundle. Bounded: ~100-150 examples each, no deadline, no example database on disk."""
from __future__ import annotations

import json
import os
import shutil

import pytest

hypothesis = pytest.importorskip("hypothesis")  # in the test extra (setup.py); a clear skip elsewhere
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from runtime.errors import GlmExportError  # noqa: E402
from trust_helpers import snapshot  # noqa: E402

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
path_name = st.one_of(
    st.sampled_from(["model.onnx", "config.json", "../x", "../../.bashrc", "/etc/passwd", "a/../../b", ".", "",
                     "link", "sub/", "\0", "C:\\x", "~/x", "model.onnx/..", "x" * 300]),
    st.text(alphabet="./\\abc~:", max_size=12),
)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    """A bundle (with a symlink pointing out of it) inside a directory whose other contents must never change."""
    _, src = tiny_models.case("glm4-thudm")
    root = tmp_path_factory.mktemp("fuzz")
    bundle = root / "bundle"
    shutil.copytree(src, bundle)
    (root / "outside.txt").write_text("outside")
    os.symlink(root / "outside.txt", bundle / "link")
    manifest = json.loads((bundle / "manifest.json").read_text())
    from runtime.manifest import read_manifest

    read_manifest(str(bundle))  # the verified stamp exists from here on: the bundle's entries must not change
    return root, bundle, manifest


def _outside(root):
    """Every file outside the bundle (and the bundle's directory entries, which must stay inside it)."""
    out = {name: snapshot(root / name) if (root / name).is_dir() else (root / name).read_bytes()
           for name in os.listdir(root) if name != "bundle"}
    out["bundle entries"] = sorted(os.listdir(root / "bundle"))
    return out


def _mutate(manifest, data):
    m = json.loads(json.dumps(manifest))
    kind = data.draw(st.sampled_from(["field", "spec", "file", "tokenizer", "model_file", "tensor"]))
    if kind == "field":
        m[data.draw(st.sampled_from(sorted(m) + ["extra_key"]))] = data.draw(json_value)
    elif kind == "spec":
        m["spec"][data.draw(st.sampled_from(sorted(m["spec"])))] = data.draw(json_value)
    elif kind == "file":
        m["files"][data.draw(path_name)] = data.draw(st.one_of(json_value, st.fixed_dictionaries(
            {"bytes": st.integers(0, 10**6)})))
    elif kind == "tokenizer":
        m["tokenizer_files"] = data.draw(st.lists(st.one_of(path_name, json_leaf), max_size=3))
    elif kind == "model_file":
        m["model_file"] = data.draw(st.one_of(path_name, json_leaf))
    else:
        m["inputs"][0][data.draw(st.sampled_from(["name", "dtype", "shape"]))] = data.draw(json_value)
    return m


def _load_and_step(bundle) -> None:
    """A manifest that reads must also load and generate, or fail typed."""
    from runtime import GenerationConfig, GlmModel

    with GlmModel.load(str(bundle)) as model:
        model.generate([1, 2, 3], GenerationConfig(max_new_tokens=2))
        model.generate("hi", GenerationConfig(max_new_tokens=1))


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_any_manifest_reads_or_fails_typed_and_writes_nothing_outside(world, data):
    from runtime.manifest import read_manifest

    root, bundle, manifest = world
    before = _outside(root)
    text = json.dumps(_mutate(manifest, data), allow_nan=True)
    (bundle / "manifest.json").write_text(text)
    try:
        m = read_manifest(str(bundle))
        assert m.spec.num_layers >= 1
        _load_and_step(bundle)
    except GlmExportError as e:
        assert str(e) and "\n" not in str(e)
    finally:
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert _outside(root) == before


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, tiny_models):
    hf, _ = tiny_models.case("glm4_0414-hf")
    thudm, _ = tiny_models.case("glm4-thudm")
    root = tmp_path_factory.mktemp("fuzz-cfg")
    out = {}
    for name, src in (("hf", hf), ("thudm", thudm)):
        shutil.copytree(src, root / name)
        out[name] = (root / name, json.loads((root / name / "config.json").read_text()))
    return out


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_any_config_resolves_or_fails_typed(ckpt_dir, data):
    from exporter.config import spec_from_checkpoint

    path, cfg = ckpt_dir[data.draw(st.sampled_from(["hf", "thudm"]))]
    bad = dict(cfg)
    for _ in range(data.draw(st.integers(1, 3))):
        bad[data.draw(st.sampled_from(sorted(cfg) + ["rope_parameters", "rope_scaling", "kv_channels"]))] = \
            data.draw(json_value)
    (path / "config.json").write_text(json.dumps(bad, allow_nan=True))
    try:
        spec, _ = spec_from_checkpoint(str(path))
        assert spec.num_layers >= 1 and spec.norm_eps > 0 and spec.rope_theta > 0
    except GlmExportError as e:
        assert str(e) and "\n" not in str(e)
    finally:
        (path / "config.json").write_text(json.dumps(cfg))


# -- tokenizer inputs ---------------------------------------------------------------------------------------------

SPECIAL_BITS = ["<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "[gMASK]", "<sop>", "sop", "<|",
                "|>", "[MASK]", "<|endoftext|>", "\n", " ", "\ufdd0", "{{", "{%"]
any_text = st.lists(st.one_of(st.text(alphabet=st.characters(blacklist_categories=()), max_size=8),
                              st.sampled_from(SPECIAL_BITS)), max_size=8).map("".join)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tokenizer_fixtures import CASES, build

    root = str(tmp_path_factory.mktemp("fuzz-tok"))
    return {case: build(root, case) for case in CASES}


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_chat_text_never_adds_special_tokens(tokenizers, data):
    """Whatever the messages say, the special ids in a chat prompt are exactly those the format inserts for the
    same roles with harmless text: typed special-token text never becomes a special token."""
    from runtime.chat import build_chat_ids

    case = data.draw(st.sampled_from(sorted(tokenizers)))
    _, _, spec, tok = tokenizers[case]
    roles = ["user", "assistant"] if case == "sp-chatglm2" else ["system", "user", "assistant", "observation"]
    n = data.draw(st.integers(1, 4))
    if case == "sp-chatglm2":
        chosen = [roles[i % 2] for i in range(n)]
    else:
        chosen = [data.draw(st.sampled_from(roles)) for _ in range(n)]
    messages = [{"role": r, "content": data.draw(any_text)} for r in chosen]
    try:
        ids = build_chat_ids(tok, spec, messages)
    except GlmExportError as e:  # lone surrogates, noncharacter marks: refused, on one line
        assert str(e) and "\n" not in str(e)
        return
    harmless = build_chat_ids(tok, spec, [dict(m, content="x") for m in messages])
    assert [i for i in ids if tok.is_special(i)] == [i for i in harmless if tok.is_special(i)]


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_encode_and_decode_never_fail_untyped(tokenizers, data):
    case = data.draw(st.sampled_from(sorted(tokenizers)))
    tok = tokenizers[case][3]
    text = data.draw(any_text)
    try:
        ids = tok.encode(text)
    except GlmExportError as e:
        assert "lone surrogate" in str(e) or "not valid UTF-8" in str(e)
        return
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert not any(tok.is_special(i) for i in ids)
    tok.decode(ids + data.draw(st.lists(st.integers(-5, tok.vocab_size + 5), max_size=4)))
