"""Tiny but real tokenizer files for tests and the demo.

Where this stands in the flow: nothing in the export of a real checkpoint uses it. Tests and the demo build a tiny
seeded ChatGLM, and this module writes the tokenizer files such a checkpoint would ship, in each of the three formats
the runtime reads (see ``runtime.tokenizer``):

* ``sentencepiece`` - ChatGLM2/3: a sentencepiece BPE ``tokenizer.model`` with byte fallback, and a
  ``tokenizer_config.json`` shaped like THUDM/chatglm2-6b's or THUDM/chatglm3-6b's;
* ``tiktoken`` - GLM-4-9B-chat: ``tokenizer.model`` as base64-token/rank lines, and a ``tokenizer_config.json``
  shaped like THUDM/glm-4-9b-chat's, chat_template included;
* ``tokenizer.json`` - the ``-hf`` repos and GLM-4-0414: a byte-level BPE ``tokenizer.json`` with GLM-4's special
  tokens as added tokens, and a ``tokenizer_config.json`` with a GLM-4-0414-shaped chat_template.

Each is trained on a small embedded Chinese/English corpus in well under a second, deterministically, and writes
nothing outside ``out_dir``. Imports sentencepiece / tokenizers lazily; never torch.
"""
from __future__ import annotations

import base64
import functools
import io
import itertools
import json
import os
import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List

from runtime.ice_text import (ICE_TEXT_FILE, ICE_TEXT_SPECIALS, IMAGE_TOKENS, MAX_BLANK, NEWLINE_PIECE, TAB_PIECE,
                              blank_piece)
from runtime.spec import (
    CHAT_CHATGLM1,
    CHAT_CHATGLM2,
    CHAT_CHATGLM3,
    CHAT_GLM4,
    CHAT_TEMPLATE,
    TOKENIZER_ICE_TEXT,
    TOKENIZER_JSON,
    TOKENIZER_SENTENCEPIECE,
    TOKENIZER_TIKTOKEN,
)
from runtime.tokenizer import GLM4_SPECIALS, GLM4_SPLIT_PATTERN, SP_BASE_SPECIALS, SP_ROLE_SPECIALS

SP_VOCAB_SIZE = 640  # sentencepiece pieces, 3 control + 256 byte-fallback pieces included
BPE_VOCAB_SIZE = 768  # byte-level BPE tokens (256 single bytes + merges), specials not included

# Which chat formats each tiny tokenizer kind can be written for.
KIND_CHAT_FORMATS = {
    TOKENIZER_ICE_TEXT: (CHAT_CHATGLM1,),
    TOKENIZER_SENTENCEPIECE: (CHAT_CHATGLM2, CHAT_CHATGLM3),
    TOKENIZER_TIKTOKEN: (CHAT_GLM4,),
    TOKENIZER_JSON: (CHAT_TEMPLATE, CHAT_GLM4),
}


@dataclass
class TinyTokenizer:
    """What ``write_tiny_tokenizer`` wrote: sizes and ids a tiny spec needs, and the file names."""

    total_vocab: int  # base vocabulary + special tokens: the smallest valid spec.vocab_size
    special_tokens: Dict[str, int]  # "[gMASK]" -> id, ...
    files: List[str]  # file names written into out_dir
    kind: str = ""  # one of runtime.spec.TOKENIZER_KINDS
    chat_format: str = ""  # one of runtime.spec.CHAT_FORMATS
    base_vocab: int = 0  # ids below this are ordinary tokens
    eos_token_ids: List[int] = field(default_factory=list)  # what a spec built on it should stop on


# ---------------------------------------------------------------------------------------------------------------
# The corpus: generated from templates, so it has real structure (repeated words, both scripts, digits, code,
# punctuation, emoji) without shipping a data file. Deterministic: no randomness here.
# ---------------------------------------------------------------------------------------------------------------

_EN_SUBJECTS = ["The model", "A small tokenizer", "Our runtime", "The exporter", "This engine", "My friend", "The user"]
_EN_VERBS = ["reads", "writes", "checks", "compresses", "translates", "generates", "loads"]
_EN_OBJECTS = ["the config file", "every weight", "a long answer", "Chinese text", "the cache", "two tokens"]
_EN_ENDINGS = [".", "!", " quickly.", " again and again.", " before lunch.", " without errors."]

_ZH_SUBJECTS = ["我们", "这个模型", "小明", "老师", "用户", "程序员", "我的朋友"]
_ZH_VERBS = ["喜欢", "正在学习", "需要", "生成了", "翻译了", "检查", "下载"]
_ZH_OBJECTS = ["中文文本", "新的代码", "一杯绿茶", "数学题", "长篇回答", "配置文件", "人工智能"]
_ZH_ENDINGS = ["。", "！", "，然后休息。", "，非常开心。", "吗？"]

_QA = [
    ("你好", "你好！我是人工智能助手，很高兴见到你。"),
    ("What is ONNX?", "ONNX is an open format for machine learning models."),
    ("今天天气怎么样？", "今天天气晴朗，气温二十五度，适合出去散步。"),
    ("How do I export ChatGLM?", "Run the exporter with a checkpoint directory and an output path."),
    ("请把 hello world 翻译成中文", "你好，世界"),
    ("1+1等于几？", "1+1等于2。"),
    ("Tell me a joke.", "Why did the tensor cross the road? To get to the other side of the graph!"),
    ("北京是哪个国家的首都？", "北京是中国的首都。"),
]

_CODE = [
    "def add(a, b):",
    "    return a + b",
    "for i in range(10):",
    "    print(i * i)",
    "if __name__ == \"__main__\":",
    "    main()",
    "x = [1, 2, 3]  # 列表",
    "import numpy as np",
    "logits = np.zeros((1, 65024), dtype=np.float32)",
    "    while True:",
    "        break",
]

_MISC = [
    "2024年5月12日，温度是23.5度。",
    "TensorRT 可以加速推理，ONNX 是一种模型格式。",
    "GLM-4 支持 128K 上下文，ChatGLM3-6B 支持 8K。",
    "今天天气很好 😊",
    "Great job! 🎉 继续加油 💪",
    "价格：¥1999.00，折扣 15%。",
    "Email: test@example.com, URL: https://example.com/a?b=1",
    "  indented line with   several   spaces  ",
    "Tabs\tand\tmore\ttabs",
    "「引号」和《书名号》以及（括号）",
    "The quick brown fox jumps over the lazy dog.",
    "人工智能正在改变世界，machine learning is everywhere.",
    "第一，准备数据；第二，训练模型；第三，导出 ONNX。",
    "数字：0 1 2 3 4 5 6 7 8 9 10 100 1000 12345",
    "Ünïcödé àccents, Ελληνικά, русский текст, 日本語のテキスト, 한국어",
]


def _template_lines() -> Iterator[str]:
    """Sentences from the word lists: every subject with a rotating verb, object and ending (both languages)."""
    for i, (subj, obj) in enumerate(itertools.product(_EN_SUBJECTS, _EN_OBJECTS)):
        verb = _EN_VERBS[i % len(_EN_VERBS)]
        yield subj + " " + verb + " " + obj + _EN_ENDINGS[i % len(_EN_ENDINGS)]
    for i, (subj, obj) in enumerate(itertools.product(_ZH_SUBJECTS, _ZH_OBJECTS)):
        verb = _ZH_VERBS[(i * 3) % len(_ZH_VERBS)]
        yield subj + verb + obj + _ZH_ENDINGS[i % len(_ZH_ENDINGS)]
    for i, (zh_subj, en_obj) in enumerate(itertools.product(_ZH_SUBJECTS, _EN_OBJECTS)):
        yield zh_subj + "会处理 " + en_obj + "，" + _ZH_OBJECTS[i % len(_ZH_OBJECTS)] + "也可以。"
    for i, (subj, verb) in enumerate(itertools.product(_EN_SUBJECTS, _EN_VERBS)):
        yield "Q%d: Why %s %s? %s" % (i, subj.lower(), verb, _ZH_SUBJECTS[i % len(_ZH_SUBJECTS)] + "也不知道。")
    for i, (subj, verb) in enumerate(itertools.product(_ZH_SUBJECTS, _ZH_VERBS)):
        obj, reason = _ZH_OBJECTS[(i * 5) % len(_ZH_OBJECTS)], _EN_OBJECTS[i % len(_EN_OBJECTS)]
        yield "%s为什么%s%s？因为 %s." % (subj, verb, obj, reason)


def _dialogue_lines() -> Iterator[str]:
    """ChatGLM2-style rounds and bare questions/answers, so chat prompt pieces occur in training."""
    for n, (q, a) in enumerate(_QA, start=1):
        yield "[Round %d]" % n
        yield "问：" + q
        yield "答：" + a
        yield q
        yield a


def corpus_lines() -> List[str]:
    """The tiny training corpus: a few hundred mixed Chinese/English lines, the same on every call."""
    lines = list(_template_lines()) + list(_dialogue_lines()) + _CODE + _MISC
    return lines + [str(n) + " + " + str(n * 7) + " = " + str(n * 8) for n in range(0, 400, 13)]


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def _training_lines(seed: int) -> List[str]:
    """The lines to train on: the whole corpus for seed 0, else the corpus less a seed-chosen tenth of its lines
    (BPE training does not depend on line order, so leaving lines out is what makes seeds differ)."""
    lines = corpus_lines()
    if seed:
        rng = random.Random(seed)
        lines = [line for line in lines if rng.random() >= 0.1]
    return lines


def _train_sentencepiece(lines: List[str], vocab_size: int = SP_VOCAB_SIZE, **extra) -> bytes:
    """A serialized sentencepiece BPE model with ChatGLM's options: identity normalisation, spaces kept, byte fallback.

    ids 0/1/2 are <unk>/<s>/</s> as in ChatGLM's model, so eos is 2.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.99,  # the rarest characters (Korean, emoji, ...) go through byte fallback
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
        **extra,
    )
    return model.getvalue()


def _train_byte_level_bpe(lines: List[str]):
    """A ``tokenizers`` byte-level BPE pre-split with GLM-4's pattern; no special tokens yet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def _byte_of_char() -> Dict[str, int]:
    """GPT-2's byte <-> printable-character table used by byte-level BPE, inverted (char -> byte).

    Written out because the ``tokenizers`` library applies this table internally but does not expose it.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


def _tiktoken_ranks(tok) -> List[bytes]:
    """Token bytes in rank order: the 256 single bytes first (by value), then merged tokens in merge order.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; ranking merged tokens in the order
    the BPE trainer created them keeps every token reachable, and the single bytes make any text encodable.
    """
    byte_of = _byte_of_char()
    vocab = tok.get_vocab()  # token string -> id; the trainer numbers merges in the order it made them
    merged = sorted((i, t) for t, i in vocab.items() if len(t) > 1)
    ranks = [bytes([b]) for b in range(256)]
    ranks += [bytes(byte_of[c] for c in t) for _, t in merged]
    return ranks


# ---------------------------------------------------------------------------------------------------------------
# tokenizer_config.json shapes
# ---------------------------------------------------------------------------------------------------------------

# ChatGLM3-6B's published template (positional, spaces as in the original; kept as data so the file looks real).
_CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Same shape as glm-4-9b-chat's: one prefix, then <|role|>{metadata}\n{content} per non-empty message.
# (The published one also describes tools in a long Chinese system prompt; this one keeps a short tools branch.)
_GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}"
    "{% if item['tools'] is defined %}<|system|>\n# Tools{% for tool in item['tools'] %}\n\n## "
    "{{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Same shape as GLM-4-0414's / glm-4-9b-chat-hf's: written over many lines, so it renders right only with
# transformers' jinja settings (trim_blocks drops the newline after each block tag); system messages come first.
_GLM4_0414_TEMPLATE = """[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools
{% for tool in tools %}
{%- set function = tool.function if tool.get("function") else tool %}

## {{ function.name }}

{{ function | tojson(indent=4, ensure_ascii=False) }}
Call it with JSON arguments.
{%- endfor %}
{%- endif -%}
{%- for msg in messages %}
{%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
{%- endif %}
{%- endfor %}
{%- for message in messages if message.role != 'system' %}
{%- set role = message['role'] %}
{%- set content = message['content'] %}
{%- set meta = message.get("metadata", "") %}
{%- if role == 'user' %}
<|user|>
{{ content }}
{%- elif role == 'assistant' and not meta %}
<|assistant|>
{{ content }}
{%- elif role == 'assistant' and meta %}
<|assistant|>{{ meta }}{{ ' ' }}
{{ content }}
{%- elif role == 'observation' %}
<|observation|>
{{ content }}
{%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def _added_tokens_decoder(specials: Dict[str, int]) -> Dict[str, dict]:
    """transformers' ``added_tokens_decoder`` entry for each special token."""
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {str(i): dict(content=name, **entry) for name, i in sorted(specials.items(), key=lambda kv: kv[1])}


def _chatglm_config(chat_format: str, specials: Dict[str, int]) -> dict:
    """tokenizer_config.json like THUDM/chatglm2-6b's (bare) or chatglm3-6b's (added tokens + chat_template)."""
    config = {
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "do_lower_case": False,
        "remove_space": False,
        "tokenizer_class": "ChatGLMTokenizer",
    }
    if chat_format == CHAT_CHATGLM2:
        config["name_or_path"] = "THUDM/chatglm2-6b"
        return config
    config.update(
        {
            "added_tokens_decoder": _added_tokens_decoder(specials),
            "chat_template": _CHATGLM3_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "<unk>",
            "padding_side": "left",
            "unk_token": "<unk>",
        }
    )
    return config


def _glm4_config(specials: Dict[str, int], template: str, tokenizer_class: str) -> dict:
    """tokenizer_config.json like THUDM/glm-4-9b-chat's (tiktoken) or GLM-4-0414's (tokenizer.json)."""
    config = {
        "added_tokens_decoder": _added_tokens_decoder(specials),
        "additional_special_tokens": list(GLM4_SPECIALS),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 128000,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": tokenizer_class,
    }
    if tokenizer_class == "ChatGLM4Tokenizer":
        config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}
    if template:
        config["chat_template"] = template
    return config


# ---------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


def _glm4_specials(base: int) -> Dict[str, int]:
    return {name: base + i for i, name in enumerate(GLM4_SPECIALS)}


def _glm4_eos(specials: Dict[str, int]) -> List[int]:
    return [specials["<|endoftext|>"], specials["<|user|>"], specials["<|observation|>"]]


@functools.lru_cache(maxsize=None)
def _sentencepiece_of_seed(seed: int) -> bytes:
    """The sentencepiece model trained on ``_training_lines(seed)``: it depends on nothing else, so each seed is
    trained once per process (tests write many tiny checkpoints with the same tokenizer)."""
    return _train_sentencepiece(_training_lines(seed))


@functools.lru_cache(maxsize=None)
def _byte_level_bpe_of_seed(seed: int) -> str:
    """The serialized byte-level BPE trained on ``_training_lines(seed)``, trained once per process and seed;
    callers rebuild a fresh (mutable) tokenizer from it."""
    return _train_byte_level_bpe(_training_lines(seed)).to_str()


def _fresh_byte_level_bpe(seed: int):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_byte_level_bpe_of_seed(seed))


def _written(kind: str, chat_format: str, main_file: str, base: int, specials: Dict[str, int],
             eos: List[int]) -> TinyTokenizer:
    """The record of a tokenizer written as ``main_file`` + tokenizer_config.json: ``base`` ordinary ids, then the
    special tokens."""
    return TinyTokenizer(total_vocab=base + len(specials), special_tokens=specials,
                         files=[main_file, "tokenizer_config.json"], kind=kind, chat_format=chat_format,
                         base_vocab=base, eos_token_ids=list(eos))


def _write_sentencepiece(out_dir: str, chat_format: str, seed: int) -> TinyTokenizer:
    """tokenizer.model (sentencepiece) + tokenizer_config.json; specials appended after the pieces."""
    model = _sentencepiece_of_seed(seed)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model)
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    names = SP_BASE_SPECIALS + (SP_ROLE_SPECIALS if chat_format == CHAT_CHATGLM3 else ())
    specials = {name: base + i for i, name in enumerate(names)}
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), _chatglm_config(chat_format, specials))
    return _written(TOKENIZER_SENTENCEPIECE, chat_format, "tokenizer.model", base, specials, [2])


def _write_tiktoken(out_dir: str, chat_format: str, seed: int) -> TinyTokenizer:
    """tokenizer.model as ``base64(token) rank`` lines + glm-4-9b-chat-like tokenizer_config.json."""
    ranks = _tiktoken_ranks(_fresh_byte_level_bpe(seed))
    with open(os.path.join(out_dir, "tokenizer.model"), "w", encoding="ascii", newline="\n") as f:
        for rank, token in enumerate(ranks):
            f.write(base64.b64encode(token).decode("ascii") + " " + str(rank) + "\n")
    specials = _glm4_specials(len(ranks))
    config = _glm4_config(specials, _GLM4_TEMPLATE, "ChatGLM4Tokenizer")
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    return _written(TOKENIZER_TIKTOKEN, chat_format, "tokenizer.model", len(ranks), specials, _glm4_eos(specials))


def _write_tokenizer_json(out_dir: str, chat_format: str, seed: int) -> TinyTokenizer:
    """tokenizer.json (byte-level BPE, GLM-4 specials as added tokens) + GLM-4-0414-like tokenizer_config.json.

    chat_format "template" writes a chat_template; "glm4" leaves it out (as a config without one would).
    """
    from tokenizers import AddedToken, processors

    tok = _fresh_byte_level_bpe(seed)
    base = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in GLM4_SPECIALS])
    specials = _glm4_specials(base)
    # Like GLM-4-0414's file: adding special tokens prepends the prompt prefix (the runtime never asks for it).
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK]:0 <sop>:0 $A:0",
        pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
        special_tokens=[("[gMASK]", specials["[gMASK]"]), ("<sop>", specials["<sop>"])],
    )
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    template = _GLM4_0414_TEMPLATE if chat_format == CHAT_TEMPLATE else ""
    config = _glm4_config(specials, template, "PreTrainedTokenizerFast")
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    return _written(TOKENIZER_JSON, chat_format, "tokenizer.json", base, specials, _glm4_eos(specials))


@functools.lru_cache(maxsize=None)
def _ice_text_of_seed(seed: int) -> bytes:
    """The ice_text-like sentencepiece model of ``_training_lines(seed)``, trained once per process and seed. The
    training text goes through the v1 text rules first, so the whitespace pieces sit in context as when encoding."""
    from runtime.ice_text import text_to_pieces

    whitespace = [NEWLINE_PIECE, TAB_PIECE] + [blank_piece(n) for n in range(2, MAX_BLANK + 1)]
    return _train_sentencepiece(
        [text_to_pieces(line) for line in _training_lines(seed)],
        vocab_size=SP_VOCAB_SIZE + len(whitespace) + len(ICE_TEXT_SPECIALS),
        user_defined_symbols=whitespace,
        control_symbols=list(ICE_TEXT_SPECIALS),
    )


def _write_ice_text(out_dir: str, chat_format: str, seed: int) -> TinyTokenizer:
    """ice_text.model like ChatGLM-6B's: ``<n>``, ``<|tab|>`` and ``<|blank_2..80|>`` as user-defined pieces (the
    text rules of runtime.ice_text produce them), the v1 specials as control pieces (never produced from text),
    ids offset by 20000 image tokens; tokenizer_config.json like THUDM/chatglm-6b's first release."""
    model = _ice_text_of_seed(seed)
    with open(os.path.join(out_dir, ICE_TEXT_FILE), "wb") as f:
        f.write(model)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    specials = {name: sp.piece_to_id(name) + IMAGE_TOKENS for name in ICE_TEXT_SPECIALS}
    config = {
        "name_or_path": "THUDM/chatglm-6b",
        "bos_token": "<sop>",
        "eop_token": "<eop>",
        "eos_token": "</s>",
        "gmask_token": "[gMASK]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": IMAGE_TOKENS,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    return TinyTokenizer(
        total_vocab=IMAGE_TOKENS + sp.get_piece_size(),
        special_tokens=specials,
        files=[ICE_TEXT_FILE, "tokenizer_config.json"],
        kind=TOKENIZER_ICE_TEXT,
        chat_format=chat_format,
        base_vocab=IMAGE_TOKENS + sp.get_piece_size(),
        eos_token_ids=[specials["<eop>"]],
    )


_WRITERS = {
    TOKENIZER_ICE_TEXT: _write_ice_text,
    TOKENIZER_SENTENCEPIECE: _write_sentencepiece,
    TOKENIZER_TIKTOKEN: _write_tiktoken,
    TOKENIZER_JSON: _write_tokenizer_json,
}


def write_tiny_tokenizer(out_dir: str, kind: str, chat_format: str, seed: int = 0) -> TinyTokenizer:
    """Train a tiny tokenizer of ``kind`` on the embedded corpus and write its files into ``out_dir``.

    ``chat_format`` must suit the kind (see KIND_CHAT_FORMATS); different seeds train on slightly different subsets
    of the corpus, so they give different (each deterministic) vocabularies.
    """
    if kind not in _WRITERS:
        raise ValueError("unknown tokenizer kind %r; expected one of %s" % (kind, ", ".join(sorted(_WRITERS))))
    if chat_format not in KIND_CHAT_FORMATS[kind]:
        allowed = ", ".join(KIND_CHAT_FORMATS[kind])
        raise ValueError("a %s tokenizer is written for chat format %s, not %r" % (kind, allowed, chat_format))
    os.makedirs(out_dir, exist_ok=True)
    return _WRITERS[kind](out_dir, chat_format, int(seed))

