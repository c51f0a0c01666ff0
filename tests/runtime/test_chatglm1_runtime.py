"""ChatGLM-6B (v1) in the runtime: 2D positions for prefill, chunked prefill and decode (batch > 1, left padding);
32 greedy tokens equal the numpy reference's; the ice_text tokenizer's text rules round-trip; chat prompt ids are
exact; text prompts and chat run end to end."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import reference_chatglm1 as ref
from runtime import GenerationConfig, GlmModel
from runtime.errors import GenerationError, TokenizerError
from runtime.ice_text import IMAGE_TOKENS, pieces_to_text, text_to_pieces
from runtime.positions import PositionRule, chunk_bounds
from runtime.spec import POSITIONS_2D_BLOCK

GMASK, SOP = 130001, 130004


# ------------------------------------------------------------------------------------------------ positions


def _rule():
    return PositionRule(POSITIONS_2D_BLOCK, SOP, (130000, GMASK))


def test_2d_positions_of_a_left_padded_batch_and_its_decode_steps():
    rows = _rule().rows([[5, 6, 7, GMASK, SOP], [8, GMASK, SOP]])
    got = rows.prompt(5)  # (B, 2, 5)
    assert got[0].tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 0, 1]]
    assert got[1].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]  # two pads (0, 0), then its own numbering
    # decode: the next token of each row sits at the mask position, block 2, 3, ...
    assert rows.step(rows.prompt_length).tolist() == [[3, 2], [1, 2]]
    assert rows.step(rows.prompt_length + 1).tolist() == [[3, 3], [1, 3]]
    assert rows.context_end(5) == 4  # row 0's context ends at padded column 4, row 1's at 2 + 2
    assert rows.select(np.array([1])).step(np.array([4])).tolist() == [[1, 3]]


def test_mask_token_in_the_middle_sets_the_position_of_what_follows():
    rows = _rule().rows([[5, 130000, 7, GMASK, SOP, 9]])
    assert rows.prompt(6)[0].tolist() == [[0, 1, 2, 3, 1, 1], [0, 0, 0, 0, 1, 2]]


def test_sequential_positions_are_the_old_rule():
    rows = PositionRule().rows([[1, 2, 3], [4]])
    assert rows.prompt(3).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert rows.step(np.array([3, 1])).tolist() == [3, 1]
    assert rows.context_end(3) == 0


@pytest.mark.parametrize("prompt, message", [([5, 6, GMASK], "no <sop>"), ([5, SOP], r"no \[MASK\] or \[gMASK\]")])
def test_prompts_without_the_v1_suffix_are_refused(prompt, message):
    with pytest.raises(GenerationError, match=message):
        _rule().rows([prompt])


def test_chunk_bounds_keep_the_context_in_the_first_chunk():
    assert chunk_bounds(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert chunk_bounds(10, 3, first_end=7) == [(0, 7), (7, 10)]
    assert chunk_bounds(10, None, first_end=7) == [(0, 10)]


# ------------------------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def v1(chatglm1_untied):
    ckpt, bundle = chatglm1_untied
    config, sd = ref.load_checkpoint(ckpt)
    return ckpt, bundle, config, sd


def _prompts(config, lengths, seed=11):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(20010, config["vocab_size"] - 8, n))) + [config["gmask_token_id"],
                                                                                  config["bos_token_id"]]
            for n in lengths]


def _cut(ids, eos):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_32_greedy_tokens_equal_the_reference_batch_of_two_left_padded(v1):
    _, bundle, config, sd = v1
    prompts = _prompts(config, (9, 3))
    with GlmModel.load(bundle, threads=1) as model:
        # 2D positions and the prefix-LM mask are not the fused graph's: the bundle has the portable graph only
        assert model.manifest.graphs == {} and "chatglm1 block" in model.manifest.extra["graphs_decided"]["fused"]
        assert getattr(model.backend, "graph_flavour", "portable") == "portable"
        results = model.generate(prompts, GenerationConfig(max_new_tokens=32))
    for prompt, result in zip(prompts, results):
        want = _cut(ref.greedy(prompt, config, sd, 32), config["eos_token_id"])
        assert result.generated_ids == want
        assert len(want) == 32 and len(set(want)) >= 16  # 32 real decoding steps, not a repeated token


def test_chunked_prefill_gives_the_same_tokens(v1):
    """Chunks of 2: the context (up to [gMASK]) still goes in one forward, the rest in chunks."""
    _, bundle, config, _ = v1
    prompts = _prompts(config, (9, 4), seed=5)
    with GlmModel.load(bundle, threads=1, prefill_chunk=0) as model:
        whole = [r.generated_ids for r in model.generate(prompts, GenerationConfig(max_new_tokens=6))]
    with GlmModel.load(bundle, threads=1, prefill_chunk=2) as model:
        chunked = [r.generated_ids for r in model.generate(prompts, GenerationConfig(max_new_tokens=6))]
    assert chunked == whole


def test_id_prompt_without_sop_is_refused_before_any_work(v1):
    _, bundle, config, _ = v1
    with GlmModel.load(bundle, threads=1) as model:
        with pytest.raises(GenerationError, match="ends with \\[gMASK\\] <sop>"):
            model.generate([20050, 20051], GenerationConfig(max_new_tokens=2))


def test_text_prompt_and_chat_end_with_gmask_sop(v1):
    _, bundle, config, _ = v1
    with GlmModel.load(bundle, threads=1) as model:
        ids = model.encode("你好，世界")
        assert ids[-2:] == [config["gmask_token_id"], config["bos_token_id"]]
        result = model.generate("你好", GenerationConfig(max_new_tokens=4))
        assert result.prompt_ids[-2:] == ids[-2:] and len(result.generated_ids) >= 1
        reply = model.chat([{"role": "user", "content": "你好"}], GenerationConfig(max_new_tokens=3))
        assert isinstance(reply.text, str)


# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def ice(tmp_path_factory):
    """The tiny ice_text tokenizer, loaded through the runtime with a matching spec."""
    from exporter.tiny.tokenizers import write_tiny_tokenizer
    from runtime.tokenizer import load_tokenizer
    from tokenizer_fixtures import spec_for

    out = str(tmp_path_factory.mktemp("ice"))
    tiny = write_tiny_tokenizer(out, "ice_text", "chatglm1")
    spec = spec_for(tiny)
    return out, tiny, spec, load_tokenizer(out, spec)


ROUND_TRIPS = [
    "hello world",
    "你好，世界！今天天气很好。",
    "line one\nline two\n\n\nafter three newlines\n",
    "tabs\tbetween\t\twords",
    "two  three   five     spaces",
    "eighty" + " " * 80 + "end",
    "eighty-one" + " " * 81 + "end",
    "a hundred" + " " * 100 + "end",
    "code:\n    def f(x):\n\treturn x ** 2  # 平方\n",
    "mixed 中文 and English 😊",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_ice_text_round_trips(ice, text):
    _, _, _, tok = ice
    ids = tok.encode(text)
    assert all(i >= IMAGE_TOKENS for i in ids)  # text ids sit after the 20000 image tokens
    assert tok.decode(ids) == text


def test_ice_text_whitespace_pieces(ice):
    _, _, _, tok = ice
    sp = tok._sp
    piece = lambda name: sp.piece_to_id(name) + IMAGE_TOKENS  # noqa: E731
    assert piece("<n>") in tok.encode("a\nb")
    assert piece("<|tab|>") in tok.encode("a\tb")
    assert piece("<|blank_5|>") in tok.encode("a     b")
    hundred = tok.encode("a" + " " * 100 + "b")
    assert piece("<|blank_80|>") in hundred and piece("<|blank_20|>") in hundred  # longest runs first
    assert text_to_pieces("x" + " " * 81 + "y") == "x<|blank_80|> y"
    assert pieces_to_text("<|blank_3|>a<n><|tab|>") == "   a\n\t"


def test_ice_text_specials_and_prompt_suffix(ice):
    _, tiny, _, tok = ice
    sp = tok._sp
    for name in ("[MASK]", "[gMASK]", "<sop>", "<eop>"):
        assert tok.special_ids[name] == sp.piece_to_id(name) + IMAGE_TOKENS == tiny.special_tokens[name]
    assert tok.eos_ids[-1] == tok.special_ids["<eop>"]
    assert tok.encode_prompt("hi") == tok.encode("hi") + [tok.special_ids["[gMASK]"], tok.special_ids["<sop>"]]
    # special-token text in plain text stays text (the specials are control pieces of the model)
    assert tok.special_ids["[gMASK]"] not in tok.encode("say [gMASK] <sop>")
    assert tok.decode([20001 - IMAGE_TOKENS + 5]) == ""  # an image token has no text


def test_ice_text_offset_comes_from_tokenizer_config(ice, tmp_path):
    """THUDM's later files say num_image_tokens 0 (vocabulary 130528): the same pieces without the offset."""
    from runtime.tokenizer import load_tokenizer
    from tokenizer_fixtures import spec_for

    out, tiny, spec, tok = ice
    copy = str(tmp_path / "no-offset")
    shutil.copytree(out, copy)
    path = os.path.join(copy, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["num_image_tokens"] = 0
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    shifted = {k: v - IMAGE_TOKENS for k, v in tiny.special_tokens.items()}
    tok0 = load_tokenizer(copy, spec_for(tiny, special_tokens=shifted))
    assert tok0.encode("你好\n") == [i - IMAGE_TOKENS for i in tok.encode("你好\n")]
    assert tok0.special_ids["<sop>"] == shifted["<sop>"]
    with pytest.raises(TokenizerError, match="manifest says"):  # ids recorded with the offset no longer match
        load_tokenizer(copy, spec)


def test_ice_text_detected_at_export(ice):
    from exporter.tokenizer_files import detect_tokenizer

    out, tiny, _, _ = ice
    facts = detect_tokenizer(out, "chatglm3")
    assert (facts.kind, facts.chat_format) == ("ice_text", "chatglm1")
    assert facts.special_tokens["[gMASK]"] == tiny.special_tokens["[gMASK]"]
    assert "ice_text.model" in facts.files


def test_stream_decoder_equals_decode(ice):
    from runtime.tokenizer import StreamDecoder

    _, _, _, tok = ice
    ids = tok.encode("第一行\n    indented\tand   spaced 😊")
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)


# ------------------------------------------------------------------------------------------------ chat format


def _by_hand(tok, text):
    """Ids of ``text`` the way THUDM's tokenizer makes them, written out here: newline -> <n>, then the
    sentencepiece model, ids + 20000, then [gMASK] <sop>."""
    pieces = tok._sp.encode(text.replace("\n", "<n>"))
    return [i + IMAGE_TOKENS for i in pieces] + [tok.special_ids["[gMASK]"], tok.special_ids["<sop>"]]


def test_chat_ids_for_a_two_turn_history_are_exact(ice):
    from runtime.chat import build_chat_ids

    _, _, spec, tok = ice
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "今天天气怎么样"},
        {"role": "assistant", "content": "晴天。"},
        {"role": "user", "content": "谢谢"},
    ]
    text = ("[Round 0]\n问：你好\n答：你好！有什么可以帮你？\n"
            "[Round 1]\n问：今天天气怎么样\n答：晴天。\n"
            "[Round 2]\n问：谢谢\n答：")
    assert build_chat_ids(tok, spec, messages) == _by_hand(tok, text)


def test_chat_without_history_sends_the_question_alone(ice):
    """ChatGLM-6B's published chat: no history -> the query as it is, no [Round 0] wrapper."""
    from runtime.chat import build_chat_ids

    _, _, spec, tok = ice
    assert build_chat_ids(tok, spec, [{"role": "user", "content": "你好"}]) == _by_hand(tok, "你好")


def test_chat_refuses_a_system_message(ice):
    from runtime.chat import build_chat_ids

    _, _, spec, tok = ice
    with pytest.raises(GenerationError, match="no system"):
        build_chat_ids(tok, spec, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
