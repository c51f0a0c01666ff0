"""A bundle is a closed world, and its checksums are checked.

Every name a manifest (or its graph's external data) gives must stay inside the bundle; every listed file must
match its sha256 at load (hashed once, then a verified stamp), and quantize/eval refuse a corrupt source instead of
laundering it. Each case: exit code, one-line message naming the entry, nothing outside read or written.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner

from exporter.cli import main
from runtime.errors import BundleError
from runtime.integrity import STAMP_NAME, verify_files
from runtime.manifest import read_manifest
from trust_helpers import assert_one_line_error, edit_json, leftovers, snapshot


@pytest.fixture
def bundle(tmp_path, tiny_models):
    _, src = tiny_models.case("glm4-thudm")
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    if (dst / STAMP_NAME).exists():
        os.unlink(dst / STAMP_NAME)
    return dst


def _run(bundle, *extra):
    r = CliRunner().invoke(main, ["run", "--model", str(bundle), "--prompt", "hi", "--max-new-tokens", "2", *extra])
    return r.exit_code, r.output


def _flip_byte(path, offset=-100):
    with open(path, "r+b") as f:
        f.seek(offset, 2)
        b = f.read(1)
        f.seek(offset, 2)
        f.write(bytes([b[0] ^ 0xFF]))


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("field, value, needle", [
    ("files", "../outside.txt", "'..'"),
    ("files", "/etc/passwd", "absolute path"),
    ("files", "sub/../../outside.txt", "'..'"),
    ("files", "link", "resolves outside the bundle"),
    ("model_file", "../outside.txt", "model_file"),
    ("model_file", "/etc/passwd", "absolute path"),
    ("tokenizer_files", "../../.bashrc", "tokenizer_files entry"),
    ("tokenizer_files", "C:\\x", "tokenizer_files entry"),
])
def test_manifest_names_must_stay_inside(bundle, tmp_path, field, value, needle):
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(tmp_path / "outside.txt", bundle / "link")

    def change(d):
        if field == "files":
            d["files"][value] = {"bytes": 6}
        elif field == "tokenizer_files":
            d["tokenizer_files"].append(value)
        else:
            d[field] = value

    edit_json(bundle / "manifest.json", change)
    before = snapshot(tmp_path)
    code, output = _run(bundle)
    assert_one_line_error(code, output, needle, "inside itself")
    assert snapshot(tmp_path) == before


def test_quantize_never_writes_outside_out_on_a_manifests_say(bundle, tmp_path):
    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    victim.write_text("alias ls='ls --color'")
    edit_json(bundle / "manifest.json", lambda d: d["tokenizer_files"].append("../home/.bashrc"))
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, ["quantize", "--model", str(bundle), "--out", str(tmp_path / "q"),
                                  "--precision", "fp16", "--no-eval", "--quiet"])
    assert_one_line_error(r.exit_code, r.output, "tokenizer_files entry", "../home/.bashrc")
    assert snapshot(tmp_path) == before and not (tmp_path / "q").exists() and leftovers(tmp_path) == []


def _relist_graph(bundle):
    """The manifest's record of the edited model.onnx made to match it (a crafted bundle's checksums pass)."""
    from runtime.manifest import record_files

    edit_json(bundle / "manifest.json", lambda d: d["files"].update(record_files(str(bundle), ["model.onnx"])))


def _weights_to_external(bundle, location):
    """model.onnx re-saved with every weight in the external data file ``location`` (beside it)."""
    import onnx

    model = onnx.load(str(bundle / "model.onnx"))
    onnx.save_model(model, str(bundle / "model.onnx"), save_as_external_data=True, location=location,
                    size_threshold=0)


def test_external_data_locations_must_stay_inside(bundle, tmp_path):
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    _weights_to_external(bundle, "w.data")
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for t in _get_all_tensors(model):
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.bin"
    onnx.save_model(model, str(bundle / "model.onnx"))
    shutil.copyfile(bundle / "w.data", tmp_path / "outside.bin")
    _relist_graph(bundle)
    code, output = _run(bundle)
    assert_one_line_error(code, output, "external data location", "'../outside.bin'")


def test_external_data_must_be_listed_so_it_is_verified(bundle):
    _weights_to_external(bundle, "w.data")
    _relist_graph(bundle)
    code, output = _run(bundle)
    assert_one_line_error(code, output, "'w.data'", "not listed")


# ------------------------------------------------------------------------------------------------ checksums


def test_a_flipped_byte_in_external_data_is_refused(bundle):
    """A bundle whose weights are in model.onnx.data: that file is checked like the graph."""
    from runtime.manifest import record_files

    _weights_to_external(bundle, "model.onnx.data")
    edit_json(bundle / "manifest.json", lambda d: d["files"].update(
        record_files(str(bundle), ["model.onnx", "model.onnx.data"])))
    assert _run(bundle)[0] == 0
    _flip_byte(bundle / "model.onnx.data", offset=-7)
    code, output = _run(bundle)
    assert_one_line_error(code, output, "model.onnx.data: checksum mismatch")


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.model", "config.json"])
def test_a_flipped_byte_is_refused_naming_file_and_digests(bundle, name):
    rec = json.loads((bundle / "manifest.json").read_text())["files"][name]
    _flip_byte(bundle / name, offset=-2)
    code, output = _run(bundle)
    line = assert_one_line_error(code, output, str(bundle / name), rec["sha256"], "--no-verify-files")
    digests = re.findall(r"\b[0-9a-f]{64}\b", line)
    assert len(digests) == 2 and digests[1] == rec["sha256"] and digests[0] != digests[1]


def test_no_verify_files_skips_the_check(bundle):
    _flip_byte(bundle / "config.json", offset=-2)  # a byte no part of generation reads
    code, output = _run(bundle, "--no-verify-files")
    assert code == 0, output


def test_quantize_and_eval_refuse_a_corrupt_source(bundle, tmp_path):
    _flip_byte(bundle / "model.onnx")
    r = CliRunner().invoke(main, ["quantize", "--model", str(bundle), "--out", str(tmp_path / "q"),
                                  "--precision", "fp16", "--no-eval", "--quiet"])
    assert_one_line_error(r.exit_code, r.output, "model.onnx", "sha256")
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []
    data = tmp_path / "eval.txt"
    data.write_text("hello world\n" * 4)
    r = CliRunner().invoke(main, ["eval", "--model", str(bundle), "--reference", str(bundle), "--data", str(data),
                                  "--quiet"])
    assert_one_line_error(r.exit_code, r.output, "model.onnx", "sha256")


def test_the_stamp_hashes_once_and_never_hides_a_change(bundle):
    files = read_manifest(str(bundle), verify_files=False).files
    total = sum(rec["bytes"] for rec in files.values())
    assert verify_files(str(bundle), files) == total  # cold: everything hashed
    assert (bundle / STAMP_NAME).is_file()
    assert verify_files(str(bundle), files) == 0  # warm: nothing hashed
    # a change that keeps the size and the mtime is still found (ctime and inode are part of the key)
    path = bundle / "model.onnx"
    st = os.stat(path)
    _flip_byte(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BundleError, match="sha256"):
        verify_files(str(bundle), files)
    # a forged stamp entry for the corrupt file does not pass either: the digest must be the manifest's
    edit_json(bundle / STAMP_NAME, lambda d: d["files"].__setitem__("model.onnx", {"sha256": "0" * 64,
                                                                                   "stat": [1, 2, 3, 4]}))
    with pytest.raises(BundleError, match="sha256"):
        verify_files(str(bundle), files)


def test_the_stamp_goes_to_the_user_cache_when_the_bundle_is_not_writable(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (bundle / STAMP_NAME).mkdir()  # the bundle's stamp cannot be written (as root, permissions would not stop it)
    files = read_manifest(str(bundle), verify_files=False).files
    assert verify_files(str(bundle), files) > 0
    stamps = list((tmp_path / "cache" / "glm-export" / "verified").iterdir())
    assert len(stamps) == 1
    assert verify_files(str(bundle), files) == 0


# ------------------------------------------------------------------------------------------------ types


@pytest.mark.parametrize("change, needle", [
    (lambda d: d["spec"].__setitem__("num_layers", "2"), "spec.num_layers"),
    (lambda d: d["spec"].__setitem__("norm_eps", float("nan")), "spec.norm_eps"),
    (lambda d: d["spec"].__setitem__("rope_theta", float("inf")), "spec.rope_theta"),
    (lambda d: d["spec"].__setitem__("qkv_bias", "yes"), "spec.qkv_bias"),
    (lambda d: d["spec"].__setitem__("eos_token_ids", "2"), "spec.eos_token_ids"),
    (lambda d: d["spec"].__setitem__("special_tokens", []), "spec.special_tokens"),
    (lambda d: d.__setitem__("spec", [1]), "'spec'"),
    (lambda d: d.__setitem__("files", [1]), "'files'"),
    (lambda d: d["files"]["model.onnx"].__setitem__("bytes", "12"), "bytes"),
    (lambda d: d["files"]["model.onnx"].__setitem__("sha256", 5), "sha256"),
    (lambda d: d.__setitem__("tokenizer_files", "tokenizer.model"), "tokenizer_files"),
    (lambda d: d.__setitem__("inputs", {"a": 1}), "inputs"),
    (lambda d: d["inputs"][0].__setitem__("shape", "batch"), "inputs[0].shape"),
    (lambda d: d.__setitem__("opset", "17"), "opset"),
    (lambda d: d.__setitem__("model_file", 3), "model_file"),
    (lambda d: d.__setitem__("precision", None), "precision"),
])
def test_manifest_fields_of_the_wrong_type(bundle, change, needle):
    edit_json(bundle / "manifest.json", change)
    code, output = _run(bundle)
    assert_one_line_error(code, output, "manifest.json", needle)


def test_a_deeply_nested_manifest_is_one_line(bundle):
    (bundle / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    code, output = _run(bundle)
    assert_one_line_error(code, output, "manifest.json", "nested too deeply")


def test_a_graph_name_with_a_newline_stays_one_line(bundle):
    """The missing-graph error lists the bundle's graph names on one line, quoting any that hold spaces or control
    characters (the fuzz test found a manifest whose graphs held a name "\n")."""
    manifest = read_manifest(str(bundle))
    manifest.graphs = {"\n": {"file": 3}, "fused": {"file": 3}}
    with pytest.raises(BundleError) as err:
        manifest.graph_file("fused")
    message = str(err.value)
    assert "\n" not in message and "(it has: portable, '\\n', fused)" in message
