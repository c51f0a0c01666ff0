"""runtime.tokenizer, exporter.tiny.tokenizers and exporter.tokenizer_files on tiny but real tokenizer files.

Every kind is trained in tmp dirs (well under a second each): round trips, special ids at base + offset, chat prompts
compared with id lists written out piece by piece, streaming detokenisation, detection and the typed errors.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from exporter.tiny.tokenizers import corpus_lines, write_tiny_tokenizer
from exporter.tokenizer_files import detect_tokenizer
from runtime.errors import GenerationError, TokenizerError
from runtime.tokenizer import (
    GLM4_SPECIALS,
    SP_BASE_SPECIALS,
    SP_ROLE_SPECIALS,
    StreamDecoder,
    load_tokenizer,
)
from runtime.chat import build_chat_ids, chat_stop_ids, render_chat_template
from tokenizer_fixtures import CASES, build

ROUND_TRIP_TEXTS = [
    "",
    "hello",
    "Hello, 世界! 今天天气很好 😊",
    "  two leading spaces, three trailing   ",
    "multiple   inner    spaces\tand\ttabs",
    "\nleading newline\n\n\nthree newlines then trailing newline\n",
    " \n \n ",
    "emoji 🎉👍🏽👨‍👩‍👧 mixed 中文 and English, 한국어, Ελληνικά, ∑∫√",
    "code:\n    def f(x):\n        return x ** 2  # 平方\n",
    "special-looking text stays text: <|user|> [gMASK] <sop> sop",
    "rare ideographs 𠀀𪚥 and a lone replacement char \ufffd",
]

STREAM_TEXTS = [
    "今天天气很好 😊 The model reads the cache. 👨‍👩‍👧 한국어!",
    "  spaced  out 🎉🎉 末尾有空格  \n",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every tiny tokenizer case, written once for this module: case -> (dir, TinyTokenizer, spec, Tokenizer)."""
    root = str(tmp_path_factory.mktemp("tok"))
    return {case: build(root, case) for case in CASES}


def expected_specials(kind, chat_format, base):
    if kind == "sentencepiece":
        names = SP_BASE_SPECIALS + (SP_ROLE_SPECIALS if chat_format == "chatglm3" else ())
    else:
        names = GLM4_SPECIALS
    return {name: base + i for i, name in enumerate(names)}


# ------------------------------------------------------------------------------------------------ encode / decode


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_mixed_text(built, case):
    _, tiny, _, tok = built[case]
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tiny.base_vocab for i in ids), (case, text)  # plain text never yields a special id
        assert tok.decode(ids) == text, (case, text)


@pytest.mark.parametrize("case", sorted(CASES))
def test_special_ids_are_base_vocab_plus_offset(built, case):
    _, tiny, _, tok = built[case]
    kind, chat_format = CASES[case]
    want = expected_specials(kind, chat_format, tiny.base_vocab)
    assert tok.special_ids == want
    assert tiny.special_tokens == want
    assert tok.vocab_size == tiny.total_vocab == tiny.base_vocab + len(want)
    for name, i in want.items():
        assert tok.token_to_id(name) == i


def test_sentencepiece_ids_mirror_chatglm(built):
    """ChatGLM's layout: ids 0/1/2 are <unk>/<s>/</s>, byte pieces start at 3 so "\\n" is 13, and encode("\\n") is
    [▁, 13] because of the dummy prefix (64789-piece model: [30910, 13])."""
    _, tiny, _, tok = built["sp-chatglm3"]
    assert tok.eos_ids == [2]
    newline = tok.encode("\n")
    assert newline[-1] == 13 and len(newline) == 2
    assert tok.decode([newline[0]]) == ""  # a lone "▁" at the start is the dummy prefix
    assert tok.special_ids["[gMASK]"] == tiny.base_vocab + 1 and tok.special_ids["<|assistant|>"] == tiny.base_vocab + 7


def test_chatglm2_has_no_role_tokens(built):
    _, _, _, tok = built["sp-chatglm2"]
    assert "<|user|>" not in tok.special_ids
    with pytest.raises(TokenizerError, match="<\\|user\\|>"):
        tok.token_to_id("<|user|>")


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefix_and_prompt(built, case):
    _, tiny, _, tok = built[case]
    sop = "sop" if CASES[case][0] == "sentencepiece" else "<sop>"
    prefix = [tiny.special_tokens["[gMASK]"], tiny.special_tokens[sop]]
    assert tok.prefix_ids() == prefix
    assert tok.encode_prompt("你好 world") == prefix + tok.encode("你好 world")
    assert tok.encode("你好 world")[:2] != prefix


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_skips_or_renders_specials(built, case):
    _, tiny, spec, tok = built[case]
    user = tok.token_to_id("<|user|>") if "<|user|>" in tok.special_ids else tok.token_to_id("[MASK]")
    name = "<|user|>" if "<|user|>" in tok.special_ids else "[MASK]"
    ids = tok.prefix_ids() + [user] + tok.encode("\n你好") + [spec.vocab_size - 1]  # last: a padded embedding row
    assert tok.decode(ids) == "\n你好"
    rendered = tok.decode(ids, skip_special=False)
    assert rendered.endswith(name + "\n你好") and rendered.startswith("[gMASK]")


def test_encode_with_specials_recognises_special_text(built):
    for case in ("sp-chatglm3", "tiktoken-glm4", "json-template"):
        _, _, _, tok = built[case]
        got = tok.encode_with_specials("<|user|>\nhi 你好<|assistant|>")
        want = [tok.token_to_id("<|user|>")] + tok.encode("\nhi 你好") + [tok.token_to_id("<|assistant|>")]
        assert got == want, case
        text = "A<|system|>  B\n<|user|>你好 😊<|assistant|>"
        assert tok.decode(tok.encode_with_specials(text), skip_special=False) == text, case
        assert tok.decode(tok.encode_with_specials(text)) == "A  B\n你好 😊", case


# --------------------------------------------------------------------------------------------------- chat formats

HISTORY = [
    {"role": "system", "content": "You are a helpful assistant. 请用中文回答。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？ 😊"},
    {"role": "user", "content": "What is ONNX?"},
]


def test_chatglm2_rounds(built):
    _, _, spec, tok = built["sp-chatglm2"]
    msgs = [m for m in HISTORY if m["role"] != "system"]
    text = "[Round 1]\n\n问：你好\n\n答：你好！有什么可以帮你？ 😊\n\n[Round 2]\n\n问：What is ONNX?\n\n答："
    want = [tok.token_to_id("[gMASK]"), tok.token_to_id("sop")] + tok.encode(text)
    assert build_chat_ids(tok, spec, msgs) == want
    assert tok.decode(want) == text
    assert build_chat_ids(tok, spec, msgs[:1]) == want[:2] + tok.encode("[Round 1]\n\n问：你好\n\n答：")
    unanswered = build_chat_ids(tok, spec, msgs[:1], add_generation_prompt=False)
    assert unanswered == want[:2] + tok.encode("[Round 1]\n\n问：你好")
    with pytest.raises(GenerationError, match="alternate"):
        build_chat_ids(tok, spec, HISTORY)  # no system role in ChatGLM2


def test_chatglm3_roles_by_id(built):
    _, _, spec, tok = built["sp-chatglm3"]
    t = tok.token_to_id
    nl = tok.encode("\n")
    want = (
        [t("[gMASK]"), t("sop")]
        + [t("<|system|>")] + nl + tok.encode(HISTORY[0]["content"])
        + [t("<|user|>")] + nl + tok.encode("你好")
        + [t("<|assistant|>")] + nl + tok.encode("你好！有什么可以帮你？ 😊")
        + [t("<|user|>")] + nl + tok.encode("What is ONNX?")
        + [t("<|assistant|>")]
    )  # fmt: skip
    assert build_chat_ids(tok, spec, HISTORY) == want
    assert build_chat_ids(tok, spec, HISTORY, add_generation_prompt=False) == want[:-1]
    # metadata goes before the newline of the role line; "tool" is read as observation
    tool = [{"role": "tool", "content": "42", "metadata": "calc"}]
    got = build_chat_ids(tok, spec, tool, add_generation_prompt=False)
    assert got == [t("[gMASK]"), t("sop"), t("<|observation|>")] + tok.encode("calc\n") + tok.encode("42")


def test_chatglm3_system_tools_appended_as_json(built):
    _, _, spec, tok = built["sp-chatglm3"]
    tools = [{"name": "get_weather", "description": "天气"}]
    got = build_chat_ids(tok, spec, [{"role": "system", "content": "sys", "tools": tools}], add_generation_prompt=False)
    body = "sys\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    assert got == tok.prefix_ids() + [tok.token_to_id("<|system|>")] + tok.encode("\n") + tok.encode(body)


def _glm4_history_ids(tok):
    """The ids GLM-4's format prescribes for HISTORY, written out piece by piece."""
    t = tok.token_to_id
    return (
        [t("[gMASK]"), t("<sop>")]
        + [t("<|system|>")] + tok.encode("\n" + HISTORY[0]["content"])
        + [t("<|user|>")] + tok.encode("\n你好")
        + [t("<|assistant|>")] + tok.encode("\n你好！有什么可以帮你？ 😊")
        + [t("<|user|>")] + tok.encode("\nWhat is ONNX?")
        + [t("<|assistant|>")]
    )  # fmt: skip


@pytest.mark.parametrize("case", ["tiktoken-glm4", "json-glm4"])
def test_glm4_roles_by_id(built, case):
    _, _, spec, tok = built[case]
    t = tok.token_to_id
    want = _glm4_history_ids(tok)
    assert build_chat_ids(tok, spec, HISTORY) == want
    assert want[:4] == [t("[gMASK]"), t("<sop>"), t("<|system|>"), tok.encode("\n")[0]]


def test_glm4_builtin_matches_the_glm4_9b_chat_template(built):
    """The tiktoken tiny config carries a glm-4-9b-chat-shaped chat_template: rendering it gives the same ids."""
    _, _, spec, tok = built["tiktoken-glm4"]
    assert tok.chat_template and "<|{{ item['role'] }}|>" in tok.chat_template
    as_template = build_chat_ids(tok, spec_for_format(spec, "template"), HISTORY)
    assert as_template == build_chat_ids(tok, spec, HISTORY)


def spec_for_format(spec, chat_format):
    from dataclasses import replace

    return replace(spec, chat_format=chat_format)


def test_template_format_ids(built):
    _, _, spec, tok = built["json-template"]
    want = _glm4_history_ids(tok)
    assert build_chat_ids(tok, spec, HISTORY) == want
    text = render_chat_template(tok.chat_template, HISTORY, add_generation_prompt=False)
    assert text == tok.decode(want[:-1], skip_special=False)


def test_template_format_matches_transformers(built):
    """transformers' own apply_chat_template on the same files gives the same ids (an independent renderer)."""
    transformers = pytest.importorskip("transformers")
    out, _, spec, tok = built["json-template"]
    config = json.load(open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8"))
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(out, "tokenizer.json"), chat_template=config["chat_template"]
    )
    hf_ids = hf.apply_chat_template(HISTORY, tokenize=True, add_generation_prompt=True)
    if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys"):
        hf_ids = hf_ids["input_ids"]
    assert list(hf_ids) == build_chat_ids(tok, spec, HISTORY)


def test_template_without_template_is_an_error(built):
    _, _, spec, tok = built["json-glm4"]
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="chat_template"):
        build_chat_ids(tok, spec_for_format(spec, "template"), HISTORY)


def test_chat_rejects_bad_messages(built):
    _, _, spec, tok = built["tiktoken-glm4"]
    with pytest.raises(GenerationError):
        build_chat_ids(tok, spec, [])
    with pytest.raises(GenerationError, match="role"):
        build_chat_ids(tok, spec, [{"role": "wizard", "content": "hi"}])
    with pytest.raises(TokenizerError, match="no chat format"):
        build_chat_ids(tok, spec_for_format(spec, "none"), HISTORY)


def test_chat_stop_ids(built):
    _, _, spec3, tok3 = built["sp-chatglm3"]
    assert chat_stop_ids(tok3, spec3) == {2, tok3.token_to_id("<|user|>"), tok3.token_to_id("<|observation|>")}
    _, _, spec2, tok2 = built["sp-chatglm2"]
    assert chat_stop_ids(tok2, spec2) == {2}
    _, tiny, spec4, tok4 = built["tiktoken-glm4"]
    names = ("<|endoftext|>", "<|user|>", "<|observation|>")
    assert chat_stop_ids(tok4, spec4) == {tiny.special_tokens[n] for n in names}


# ------------------------------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("case", sorted(CASES))
def test_stream_decoder_pieces_concatenate_to_decode(built, case):
    _, _, _, tok = built[case]
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces), pieces  # no multi-byte character was ever split
        assert sum(1 for p in pieces if p) > 5  # it did stream, not hold everything to the end


def test_stream_splits_multibyte_characters_only_when_whole(built):
    """Byte-fallback (sentencepiece) and byte-level (tiktoken) tokens split 😊 into several ids: nothing comes out
    until its last byte arrives, and flush() returns an unfinished character as U+FFFD, as decode() does."""
    for case in ("sp-chatglm3", "tiktoken-glm4"):
        _, _, _, tok = built[case]
        ids = tok.encode("a😊")
        assert len(ids) >= 4, (case, ids)  # the emoji is not a single token in the tiny vocabularies
        stream = StreamDecoder(tok)
        outs = [stream.push(i) for i in ids]
        assert "".join(outs[:-1]) == "a" and outs[-1] == "😊", (case, outs)
        assert stream.flush() == ""
        partial = stream.push(ids[0]) + stream.push(ids[1])
        assert partial == "a"
        assert partial + stream.flush() == tok.decode(ids[:2]) == "a\ufffd"


@pytest.mark.parametrize("case", ["sp-chatglm3", "tiktoken-glm4", "json-template"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_stream_decoder_with_special_tokens(built, case, skip_special):
    _, _, spec, tok = built[case]
    ids = build_chat_ids(tok, spec, HISTORY) + tok.encode(" 好的 👍") + [spec.vocab_size - 1] + list(tok.eos_ids)
    stream = StreamDecoder(tok, skip_special=skip_special)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tok.decode(ids, skip_special=skip_special)
    assert ("<|user|>" in text) is (not skip_special)


# ------------------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("case", sorted(CASES))
def test_detect_tokenizer_kind_and_specials(built, case):
    out, tiny, _, _ = built[case]
    kind, chat_format = CASES[case]
    # a wrong hint must not win: the ChatGLM3 config declares role tokens, the ChatGLM2 one names chatglm2-6b
    hint = {"chatglm2": "chatglm3", "chatglm3": "chatglm2"}.get(chat_format, "glm4")
    facts = detect_tokenizer(out, hint)
    assert (facts.kind, facts.chat_format) == (kind, chat_format)
    assert facts.special_tokens == tiny.special_tokens
    assert sorted(facts.files) == sorted(tiny.files)


def test_detect_sentencepiece_signals(built, tmp_path):
    """chatglm2 vs chatglm3 without role tokens in tokenizer_config.json: THUDM's tokenization_chatglm.py (read as
    text), then name_or_path, then the hint."""
    out, tiny, _, _ = built["sp-chatglm2"]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, str(ckpt))
    config_path = ckpt / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    del config["name_or_path"]  # like an old ChatGLM3 config: says nothing either way
    config_path.write_text(json.dumps(config), encoding="utf-8")
    assert detect_tokenizer(str(ckpt), "chatglm3").chat_format == "chatglm3"
    assert detect_tokenizer(str(ckpt), "chatglm2").chat_format == "chatglm2"
    facts = detect_tokenizer(str(ckpt), "chatglm3")
    assert facts.special_tokens["<|assistant|>"] == tiny.base_vocab + 7 and len(facts.special_tokens) == 9

    code = ckpt / "tokenization_chatglm.py"
    code.write_text('raise SystemExit\nSPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]\n')
    assert detect_tokenizer(str(ckpt), "chatglm3").chat_format == "chatglm2"
    code.write_text('raise SystemExit\nROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n')
    assert detect_tokenizer(str(ckpt), "chatglm2").chat_format == "chatglm3"
    assert "tokenization_chatglm.py" not in detect_tokenizer(str(ckpt), "chatglm2").files


def test_detect_never_imports_checkpoint_code(built, tmp_path):
    out, _, _, _ = built["sp-chatglm3"]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, str(ckpt))
    marker = tmp_path / "imported"
    (ckpt / "tokenization_chatglm.py").write_text("open(%r, 'w').close()\n" % str(marker))
    for name, data in (("generation_config.json", {"eos_token_id": [2]}), ("special_tokens_map.json", {})):
        (ckpt / name).write_text(json.dumps(data))
    facts = detect_tokenizer(str(ckpt), "chatglm3")
    assert not marker.exists()
    assert "tokenization_chatglm.py" not in facts.files
    assert {"generation_config.json", "special_tokens_map.json", "tokenizer.model"} <= set(facts.files)


def test_detect_none_and_corrupt(tmp_path):
    assert (detect_tokenizer(str(tmp_path), "glm4").kind, detect_tokenizer(str(tmp_path), "glm4").chat_format) == (
        "none",
        "none",
    )
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage\xff" * 50)
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        detect_tokenizer(str(tmp_path), "glm4")


# --------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("case", ["sp-chatglm3", "tiktoken-glm4", "json-template"])
def test_missing_tokenizer_file(built, tmp_path, case):
    out, _, spec, _ = built[case]
    shutil.copytree(out, str(tmp_path / "b"))
    main_file = "tokenizer.json" if CASES[case][0] == "tokenizer.json" else "tokenizer.model"
    os.remove(str(tmp_path / "b" / main_file))
    with pytest.raises(TokenizerError, match="missing") as e:
        load_tokenizer(str(tmp_path / "b"), spec)
    assert main_file in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\x08\x01\x12 not a tokenizer \xff\xfe\n" * 20], ids=["empty", "junk"])
@pytest.mark.parametrize("case", ["sp-chatglm3", "tiktoken-glm4", "json-template"])
def test_corrupt_tokenizer_file(built, tmp_path, case, content):
    out, _, spec, _ = built[case]
    shutil.copytree(out, str(tmp_path / "b"))
    main_file = "tokenizer.json" if CASES[case][0] == "tokenizer.json" else "tokenizer.model"
    with open(str(tmp_path / "b" / main_file), "wb") as f:
        f.write(content)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(str(tmp_path / "b"), spec)
    assert main_file in str(e.value) and "\n" not in str(e.value)


def test_tiktoken_file_without_every_byte(built, tmp_path):
    out, _, spec, _ = built["tiktoken-glm4"]
    shutil.copytree(out, str(tmp_path / "b"))
    path = tmp_path / "b" / "tokenizer.model"
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.split()[0] != "QQ=="]  # drop the token "A" (rank 65)...
    kept = [ln.split()[0] + " " + str(r) for r, ln in enumerate(kept)]  # ...and renumber so ranks stay 0..n-1
    path.write_text("\n".join(kept) + "\n")
    with pytest.raises(TokenizerError, match="single bytes"):
        load_tokenizer(str(tmp_path / "b"), spec_for_vocab(spec, spec.vocab_size))


def spec_for_vocab(spec, vocab_size, **kw):
    from dataclasses import replace

    return replace(spec, vocab_size=vocab_size, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tokenizer_larger_than_model_vocab(built, case):
    out, tiny, spec, _ = built[case]
    load_tokenizer(out, spec_for_vocab(spec, tiny.total_vocab))  # exactly fits
    with pytest.raises(TokenizerError, match="vocab_size"):
        load_tokenizer(out, spec_for_vocab(spec, tiny.total_vocab - 1))


def test_special_ids_disagreeing_with_manifest(built):
    out, tiny, spec, _ = built["sp-chatglm3"]
    wrong = dict(tiny.special_tokens, **{"[gMASK]": 5})
    with pytest.raises(TokenizerError, match="gMASK"):
        load_tokenizer(out, spec_for_vocab(spec, spec.vocab_size, special_tokens=wrong))


def test_no_tokenizer_kind(built):
    out, _, spec, _ = built["sp-chatglm3"]
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(out, spec_for_vocab(spec, spec.vocab_size, tokenizer_kind="none"))


# ----------------------------------------------------------------------------------------- tiny files, layering


def test_tiny_tokenizers_are_deterministic(tmp_path):
    for kind, chat_format in set(CASES.values()):
        main_file = "tokenizer.json" if kind == "tokenizer.json" else "tokenizer.model"
        a, b, c = (tmp_path / (p + "-" + kind) for p in "abc")
        ta = write_tiny_tokenizer(str(a), kind, chat_format)
        write_tiny_tokenizer(str(b), kind, chat_format)
        write_tiny_tokenizer(str(c), kind, chat_format, seed=1)
        for name in ta.files:
            assert (a / name).read_bytes() == (b / name).read_bytes(), (kind, name)
        assert (a / main_file).read_bytes() != (c / main_file).read_bytes(), kind
    assert sorted(os.listdir(str(tmp_path))) == sorted(
        p + "-" + k for p in "abc" for k in {kind for kind, _ in CASES.values()}
    )  # nothing written outside the out dirs


def test_corpus_is_mixed_and_stable():
    lines = corpus_lines()
    assert 200 <= len(lines) <= 1000 and lines == corpus_lines()
    joined = "".join(lines)
    assert any("\u4e00" <= c <= "\u9fff" for c in joined) and any(c.isascii() and c.isalpha() for c in joined)


def test_runtime_tokenizer_imports_no_heavy_module():
    code = (
        "import sys; import runtime.tokenizer\n"
        "bad = [m for m in ('torch', 'transformers', 'exporter', 'calibration', 'sentencepiece', 'tiktoken',"
        " 'tokenizers', 'jinja2') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
