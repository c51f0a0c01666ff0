"""Calibration input and the calibration stage: reading text/JSONL, the seeded split, feeds that carry the float
model's own KV cache, statistics over mixed-shape batches, and the ranges file as the stage boundary."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from calibration import data as cdata
from calibration.errors import CalibrationDataError, QuantizationError
from runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def tok(trained):
    from runtime.tokenizer import load_tokenizer

    bundle = trained.bundle("fp32")
    spec = read_manifest(bundle).spec
    return load_tokenizer(bundle, spec), spec, bundle


# ------------------------------------------------------------------------------------------------ reading


def test_text_and_jsonl_samples(tmp_path):
    t = tmp_path / "calib.txt"
    t.write_text("first line\n\n  \nsecond line 你好\n", encoding="utf-8")
    assert [(s.text, s.line) for s in cdata.read_samples(str(t))] == [("first line", 1), ("second line 你好", 4)]
    j = tmp_path / "calib.data"  # JSONL recognised by content, not only by name
    j.write_text('{"text": "a"}\n{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    samples = cdata.read_samples(str(j))
    assert samples[0].text == "a" and samples[1].messages == [{"role": "user", "content": "hi"}]
    assert cdata.read_samples(str(j), fmt="text")[0].text == '{"text": "a"}'


@pytest.mark.parametrize("content,message", [
    (b"", "no samples"),
    (b"\n  \n\n", "no samples"),
    (b"ok line\n\xff\xfe broken\n", "not UTF-8 text (undecodable byte at offset 8, line 2)"),
])
def test_unusable_files_are_refused(tmp_path, content, message):
    p = tmp_path / "calib.txt"
    p.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cdata.read_samples(str(p))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CalibrationDataError, match="not found"):
        cdata.read_samples(str(tmp_path / "nope.txt"))
    with pytest.raises(CalibrationDataError, match="is a directory"):
        cdata.read_samples(str(tmp_path))


@pytest.mark.parametrize("line,message", [
    ('{"text": 3}', '"text" must be a string'),
    ('{"text": "a", "messages": []}', "exactly one of"),
    ('{"messages": []}', "non-empty list"),
    ('{"text": "a"', "not valid JSON"),
])
def test_malformed_jsonl_names_the_line(tmp_path, line, message):
    p = tmp_path / "calib.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=rf"calib\.jsonl:2: .*{message}"):
        cdata.read_samples(str(p))


def test_samples_become_the_ids_the_runtime_would_feed(tok):
    from runtime.chat import build_chat_ids

    tokenizer, spec, _ = tok
    text = cdata.sample_ids(cdata.Sample(text="The capital of France is Paris."), tokenizer, spec)
    assert text == tokenizer.encode_prompt("The capital of France is Paris.")
    chat = [{"role": "user", "content": "1加2等于几？"}, {"role": "assistant", "content": "1加2等于3。"}]
    ids = cdata.sample_ids(cdata.Sample(messages=chat), tokenizer, spec)
    assert ids == build_chat_ids(tokenizer, spec, chat, add_generation_prompt=False)
    ids = cdata.sample_ids(cdata.Sample(messages=chat[:1]), tokenizer, spec)
    assert ids[-1] == tokenizer.token_to_id("<|assistant|>")  # an open question gets the assistant's turn


def test_bad_chat_role_names_the_line(tmp_path, tok):
    tokenizer, spec, _ = tok
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "hello there"}\n{"messages": [{"role": "robot", "content": "x"}]}\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"c\.jsonl:2: .*robot"):
        cdata.load_split(str(p), tokenizer, spec, 8, 32, 4, 0)


def test_split_is_seeded_truncated_and_disjoint(tmp_path, tok):
    tokenizer, spec, _ = tok
    p = tmp_path / "c.txt"
    p.write_text("\n".join(f"number {i}: Alice reads the book every Monday." for i in range(40)) + "\na\n",
                 encoding="utf-8")
    a = cdata.load_split(str(p), tokenizer, spec, calib_samples=20, seq_len=12, eval_samples=8, seed=1)
    b = cdata.load_split(str(p), tokenizer, spec, calib_samples=20, seq_len=12, eval_samples=8, seed=1)
    c = cdata.load_split(str(p), tokenizer, spec, calib_samples=20, seq_len=12, eval_samples=8, seed=2)
    assert a.calibration == b.calibration and a.heldout == b.heldout
    assert a.calibration != c.calibration
    assert len(a.heldout) == 8 and len(a.calibration) == 20
    assert all(len(s) == 12 for s in a.calibration + a.heldout)  # cut to --calib-seq-len
    assert a.skipped_short == 1  # "a" is 3 tokens with the [gMASK] sop prefix, under MIN_TOKENS
    assert not {tuple(s) for s in a.heldout} & {tuple(s) for s in a.calibration}  # disjoint
    small = cdata.load_split(str(p), tokenizer, spec, calib_samples=100, seq_len=64, eval_samples=64, seed=0)
    assert len(small.heldout) == 10 and len(small.calibration) == 30  # a quarter held out, the rest calibrates


def test_too_short_file(tmp_path, tok):
    tokenizer, spec, _ = tok
    p = tmp_path / "c.txt"
    p.write_text("one usable sample here\na\n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="too short: 1 usable sample"):
        cdata.load_split(str(p), tokenizer, spec, 8, 32, 4, 0)
    cdata.load_split(str(p), tokenizer, spec, 8, 32, 0, 0)  # without evaluation one sample is enough


@pytest.mark.parametrize("kwargs,message", [
    (dict(calib_samples=0, seq_len=32), "--calib-samples must be at least 1, got 0"),
    (dict(calib_samples=4, seq_len=2), "--calib-seq-len must be at least 4"),
    (dict(calib_samples=4, seq_len=32, eval_samples=-1), "--eval-samples"),
])
def test_counts_are_checked(kwargs, message):
    with pytest.raises(CalibrationDataError, match=message):
        cdata.check_counts(**kwargs)


# ------------------------------------------------------------------------------------------------ feeds


def test_decode_steps_carry_the_float_models_own_cache(tok):
    """The last decode step's logits equal a full prefill's: the feeds fed back the right present tensors, with the
    right mask and positions, for left-padded rows of different lengths."""
    from calibration.accuracy import open_backend, prefill_logits
    from calibration.feeds import calibration_steps
    from runtime.steps import left_pad

    tokenizer, spec, bundle = tok
    seqs = [tokenizer.encode_prompt(t) for t in ("The capital of Japan is Tokyo.", "3 + 4 = 7", "小明每个星期一都读书。")]
    _, backend = open_backend(bundle)
    steps = list(calibration_steps(spec, seqs, backend.run, batch_size=3, decode_steps=4))
    kinds = [s.kind for s, _ in steps]
    assert kinds == ["prefill"] + ["decode"] * 4
    shapes = {s.feeds["input_ids"].shape for s, _ in steps}
    assert shapes == {(3, max(map(len, seqs)) - 4), (3, 1)}  # mixed shapes by design
    assert steps[1][0].feeds["past_key_values.0.key"].shape[2] == max(map(len, seqs)) - 4
    ids, mask, positions = left_pad(sorted(seqs, key=len), spec.pad_token_id)  # batches are ordered by length
    assert steps[0][0].real.tolist() == (mask[:, :-4] > 0).tolist()
    assert steps[0][0].feeds["input_ids"].tolist() == ids[:, :-4].tolist()
    assert steps[-1][0].feeds["input_ids"].tolist() == ids[:, -1:].tolist()
    assert steps[-1][0].feeds["position_ids"].tolist() == [[len(s) - 1] for s in sorted(seqs, key=len)]
    last = steps[-1][1]["logits"][:, -1]  # (3, V)
    for row, s in enumerate(sorted(seqs, key=len)):
        want = prefill_logits(backend, spec, s)[-1]
        np.testing.assert_allclose(last[row], want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ ranges


def test_calibration_over_mixed_shapes_gives_all_three_methods(tmp_path, tok):
    import onnx

    from calibration.ranges import calibrate, read_ranges, write_ranges
    from calibration.targets import find_linears

    tokenizer, spec, bundle = tok
    seqs = [tokenizer.encode_prompt(t) for t in (
        "The capital of Egypt is Cairo.", "Count: 3, 4, 5, 6, 7", "德国的首都是柏林。", "Bob has a red cat. 翻译：Bob有一个红色的猫。",
        "5 + 4 = 9")]
    model = os.path.join(bundle, "model.onnx")
    linears = find_linears(onnx.load(model, load_external_data=False))
    names = [lin.activation for lin in linears]
    r = calibrate(model, spec, seqs, names, method="entropy", batch_size=2, decode_steps=3, work_dir=str(tmp_path))
    assert r.settings["steps"] == 3 + 3 * 3  # 3 batches (2, 2, 1 rows): a prefill and 3 decode steps each
    assert r.settings["tokens"] == sum(map(len, seqs))  # every real token once, no padding
    for name in names:
        t = r.tensors[name]
        assert 0 < t.entropy_amax <= t.absmax and 0 < t.percentile_amax <= t.absmax
        assert t.min < 0 < t.max and max(-t.min, t.max) == pytest.approx(t.absmax)
    assert os.listdir(tmp_path) == []  # the calibration copy of the graph is gone
    path = write_ranges(str(tmp_path / "ranges.json"), r)
    back = read_ranges(path)
    assert back.method == "entropy" and back.tensors == r.tensors
    assert read_ranges(path, method="minmax").amax(names[0]) == r.tensors[names[0]].absmax


def test_ranges_file_is_the_stage_boundary(tmp_path, trained):
    """Quantizing from the ranges file another run wrote gives the identical graph; a foreign file is refused."""
    from calibration.pipeline import QuantizeOptions, quantize_bundle
    from runtime.manifest import sha256_of

    first = trained.quantized("int8", precision="int8")
    ranges = os.path.join(first.bundle_dir, "calibration_ranges.json")
    out = tmp_path / "again"
    out.mkdir()
    quantize_bundle(trained.bundle("fp32"), str(out), QuantizeOptions(precision="int8", ranges=ranges,
                                                                       evaluate=False))
    assert sha256_of(str(out / "model.onnx")) == sha256_of(os.path.join(first.bundle_dir, "model.onnx"))
    assert read_manifest(str(out)).extra["accuracy"] == {"skipped": "--no-eval"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    out2 = tmp_path / "bad-out"
    out2.mkdir()
    with pytest.raises(QuantizationError, match="not a glm-export calibration ranges file"):
        quantize_bundle(trained.bundle("fp32"), str(out2), QuantizeOptions(precision="int8", ranges=str(bad),
                                                                            evaluate=False))


# ------------------------------------------------------------------------------------------------ layering


def test_calibration_imports_runtime_but_never_exporter_or_torch():
    """calibration/ may import runtime (and onnx, onnxruntime, numpy), never exporter, torch or transformers."""
    import ast

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "calibration")
    offenders, files = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        files += 1
        with open(os.path.join(root, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):  # lazy imports inside functions included
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            offenders += [f"{name}:{node.lineno} {m}" for m in mods
                          if m.split(".")[0] in ("exporter", "torch", "transformers")]
    assert files >= 10 and offenders == []
