"""Tokenizers of the ChatGLM family, for the runtime (the chat formats are in ``runtime.chat``).

Where this stands in the flow: the exporter copies a checkpoint's tokenizer files into the bundle and records
``spec.tokenizer_kind`` and ``spec.chat_format`` in the manifest; the runtime calls ``load_tokenizer`` with them,
turns chat messages into prompt ids with ``runtime.chat.build_chat_ids``, stops generation on
``runtime.chat.chat_stop_ids`` and turns the generated ids back into text with ``StreamDecoder``.

Four tokenizer files exist in the family, one class each:

* ``ice_text.model`` (sentencepiece, ids offset by 20000, text rules) - ChatGLM-6B (v1), in ``runtime.ice_text``.
* ``tokenizer.model`` (sentencepiece) - ChatGLM2/3; ChatGLM's special tokens are appended after the pieces.
* ``tokenizer.model`` (tiktoken's base64-rank lines) - GLM-4-9B; GLM-4's special tokens follow the ranks.
* ``tokenizer.json`` (the ``tokenizers`` library) - ``-hf`` repos and GLM-4-0414; specials are its added tokens.

Only the standard library is imported here; sentencepiece, tiktoken, tokenizers and jinja2 are imported by the
loader or format that needs them. Runs on Python 3.8.
"""
from __future__ import annotations

import base64
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from runtime.errors import TokenizerError, first_line, read_json_object
from runtime.user_input import check_text
from runtime.spec import (
    CHAT_CHATGLM3,
    TOKENIZER_ICE_TEXT,
    TOKENIZER_JSON,
    TOKENIZER_NONE,
    TOKENIZER_SENTENCEPIECE,
    TOKENIZER_TIKTOKEN,
    ModelSpec,
)

TOKENIZER_MODEL_FILE = "tokenizer.model"
TOKENIZER_JSON_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the template beside tokenizer_config.json

# ChatGLM2/3: appended after the sentencepiece pieces, in this order; the role tokens only in ChatGLM3.
SP_BASE_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
SP_ROLE_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

# GLM-4: following the tiktoken ranks, in this order.
GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer interface
# ---------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """What the runtime needs from a tokenizer; one subclass per file kind implements the two plain-text hooks.

    Attributes:
        kind: one of runtime.spec.TOKENIZER_KINDS.
        special_ids: special token text -> id ("[gMASK]" -> 64790, ...).
        vocab_size: ids the tokenizer can produce or read (base vocabulary + specials); must fit spec.vocab_size.
        eos_ids: ids that end a sequence (the tokenizer's own eos plus the spec's eos_token_ids).
        chat_template: the checkpoint's jinja chat template, or None.
        config: tokenizer_config.json as read ({} when absent).
    """

    kind = TOKENIZER_NONE

    def __init__(self, special_ids: Mapping[str, int], vocab_size: int, eos_ids: Sequence[int]):
        self.special_ids = {str(k): int(v) for k, v in special_ids.items()}  # type: Dict[str, int]
        self._special_text = {v: k for k, v in self.special_ids.items()}  # type: Dict[int, str]
        self.vocab_size = int(vocab_size)
        self.eos_ids = [int(i) for i in eos_ids]  # type: List[int]
        self.chat_template = None  # type: Optional[str]
        self.config = {}  # type: Dict[str, Any]
        # Longest first, so "<|user|>" is matched before any special that is a prefix of it.
        names = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    # -- hooks for subclasses: plain text only, never special tokens -------------------------------------------
    def _encode_plain(self, text: str) -> List[int]:
        raise NotImplementedError

    def _decode_plain(self, ids: List[int]) -> str:
        raise NotImplementedError

    # -- the interface ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        """Ids of plain text: no prefix, and special-token text such as "<|user|>" is encoded as ordinary text."""
        return self._encode_plain(check_text(text, "text to encode", TokenizerError, max_chars=None)) if text else []

    def template_tokens(self) -> Dict[str, int]:
        """Token text a chat template may insert as one id: the special tokens."""
        return dict(self.special_ids)

    def encode_with_specials(self, text: str) -> List[int]:
        """Ids of text in which special-token strings ("[gMASK]", "<|user|>", ...) become their ids."""
        if not text:
            return []
        check_text(text, "text to encode", TokenizerError, max_chars=None)
        if self._special_re is None:
            return self._encode_plain(text)
        ids = []  # type: List[int]
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # re.split with one group puts the matched specials at odd positions
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ids. Special tokens are dropped (skip_special) or rendered as their text; ids outside the
        vocabulary (the model's padded rows) are dropped. Ordinary ids between two specials decode as one run."""
        out = []  # type: List[str]
        run = []  # type: List[int]
        for i in ids:
            i = int(i)
            if i in self._special_text:
                if run:
                    out.append(self._decode_plain(run))
                    run = []
                if not skip_special:
                    out.append(self._special_text[i])
            elif 0 <= i < self.vocab_size:
                run.append(i)
        if run:
            out.append(self._decode_plain(run))
        return "".join(out)

    def is_special(self, token_id: int) -> bool:
        """True for the special tokens listed in special_ids."""
        return int(token_id) in self._special_text

    def token_to_id(self, special: str) -> int:
        """Id of a special token by its text; TokenizerError when this tokenizer has no such token."""
        try:
            return self.special_ids[special]
        except KeyError:
            known = ", ".join(sorted(self.special_ids)) or "none"
            raise TokenizerError(f"{self.kind} tokenizer has no special token {special!r} (it has: {known})") from None

    def prefix_ids(self) -> List[int]:
        """The ids every ChatGLM prompt starts with: [gMASK] sop (ChatGLM2/3) or [gMASK]<sop> (GLM-4); [] if absent."""
        sop = "sop" if "sop" in self.special_ids else "<sop>"
        if "[gMASK]" in self.special_ids and sop in self.special_ids:
            return [self.special_ids["[gMASK]"], self.special_ids[sop]]
        return []

    def encode_prompt(self, text: str) -> List[int]:
        """Ids of a plain (non-chat) prompt: prefix_ids() + encode(text)."""
        return self.prefix_ids() + self.encode(text)


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: tokenizer file is missing; re-export the bundle or copy it from the checkpoint")


def _import(module: str, path: str):
    """Import an optional tokenizer library, or say which one to install."""
    try:
        return __import__(module)
    except ImportError:
        raise TokenizerError(f"{path} needs the '{module}' package: pip install {module}") from None


def read_tokenizer_config(bundle_dir: str) -> Dict[str, Any]:
    """tokenizer_config.json of a bundle or checkpoint, {} when there is none."""
    path = os.path.join(bundle_dir, TOKENIZER_CONFIG_FILE)
    return read_json_object(path, TokenizerError) if os.path.isfile(path) else {}


def read_chat_template(bundle_dir: str, config: Mapping[str, Any]) -> Optional[str]:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's chat_template (a string, or
    transformers' list of named templates, of which "default" or the first); None when there is none."""
    path = os.path.join(bundle_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None


def read_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    """tiktoken's ``base64token rank`` lines as token bytes -> rank; ranks must be exactly 0..n-1.

    Parsed here (not with tiktoken.load.load_tiktoken_bpe) to name the bad line and to check the ranks.
    """
    _require_file(path)
    ranks = {}  # type: Dict[bytes, int]
    lineno = 0
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError as e:  # binascii.Error is a ValueError
        raise TokenizerError(f"{path}: line {lineno} is not 'base64token rank' ({first_line(e)})") from None
    if not ranks:
        raise TokenizerError(f"{path}: no tokens in the file; not a tiktoken BPE file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..n-1 with one token each; not a tiktoken BPE file")
    return ranks


class SentencePieceTokenizer(Tokenizer):
    """ChatGLM2/3: a sentencepiece model; specials are ids after the pieces, never produced by sentencepiece itself."""

    kind = TOKENIZER_SENTENCEPIECE

    def __init__(self, sp, special_names: Sequence[str], extra_eos: Sequence[int] = ()):
        base = sp.get_piece_size()
        specials = {name: base + i for i, name in enumerate(special_names)}
        eos = [sp.eos_id()] if sp.eos_id() >= 0 else []
        super().__init__(specials, base + len(specials), _unique(list(extra_eos) + eos))
        self._sp = sp

    def _encode_plain(self, text: str) -> List[int]:
        return list(self._sp.encode(text))

    def _decode_plain(self, ids: List[int]) -> str:
        return self._sp.decode(ids)


class TiktokenTokenizer(Tokenizer):
    """GLM-4: tiktoken BPE over GLM-4's split pattern; specials follow the ranks."""

    kind = TOKENIZER_TIKTOKEN

    def __init__(self, ranks: Dict[bytes, int], name: str = "glm4", extra_eos: Sequence[int] = ()):
        import tiktoken

        specials = {s: len(ranks) + i for i, s in enumerate(GLM4_SPECIALS)}
        self._enc = tiktoken.Encoding(name, pat_str=GLM4_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        super().__init__(specials, len(ranks) + len(specials), _unique(list(extra_eos) + [specials["<|endoftext|>"]]))

    def _encode_plain(self, text: str) -> List[int]:
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def _decode_plain(self, ids: List[int]) -> str:
        return self._enc.decode(ids, errors="replace")


class JsonTokenizer(Tokenizer):
    """A ``tokenizers`` tokenizer.json; its added tokens marked special are the special tokens."""

    kind = TOKENIZER_JSON

    def __init__(self, tok, eos_token: Optional[str] = None, extra_eos: Sequence[int] = ()):
        self._tok = tok
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        vocab = tok.get_vocab(with_added_tokens=True)
        eos = [] if eos_token is None or tok.token_to_id(eos_token) is None else [tok.token_to_id(eos_token)]
        super().__init__(specials, max(vocab.values()) + 1 if vocab else 0, _unique(list(extra_eos) + eos))

    def _encode_plain(self, text: str) -> List[int]:
        # encode_special_tokens=True makes the library encode special-token text as ordinary text.
        self._tok.encode_special_tokens = True
        return self._tok.encode(text, add_special_tokens=False).ids

    def template_tokens(self) -> Dict[str, int]:
        """Every added token, special or not: the library splits them all out of template text itself."""
        return {t.content: int(i) for i, t in self._tok.get_added_tokens_decoder().items()}

    def encode_with_specials(self, text: str) -> List[int]:
        """The library splits out added tokens itself (as transformers does), non-special ones included."""
        if not text:
            return []
        check_text(text, "text to encode", TokenizerError, max_chars=None)
        self._tok.encode_special_tokens = False
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode_plain(self, ids: List[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, special: str) -> int:
        """Special tokens first, then any token of the vocabulary (e.g. non-special added tokens)."""
        if special not in self.special_ids and self._tok.token_to_id(special) is not None:
            return int(self._tok.token_to_id(special))
        return super().token_to_id(special)


def _unique(ids: Iterable[int]) -> List[int]:
    out = []  # type: List[int]
    for i in ids:
        if int(i) not in out:
            out.append(int(i))
    return out


def sentencepiece_processor(path: str):
    """The sentencepiece model at ``path``, loaded; TokenizerError naming the file when missing or not one."""
    _require_file(path)
    spm = _import("sentencepiece", path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (RuntimeError, OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not a sentencepiece model ({first_line(e)})") from None
    return sp


def _load_sentencepiece(bundle_dir: str, spec: ModelSpec, config: Mapping[str, Any]) -> Tokenizer:
    sp = sentencepiece_processor(os.path.join(bundle_dir, TOKENIZER_MODEL_FILE))
    with_roles = spec.chat_format == CHAT_CHATGLM3 or "<|user|>" in spec.special_tokens
    names = SP_BASE_SPECIALS + (SP_ROLE_SPECIALS if with_roles else ())
    return SentencePieceTokenizer(sp, names, extra_eos=spec.eos_token_ids)


def _load_tiktoken(bundle_dir: str, spec: ModelSpec, config: Mapping[str, Any]) -> Tokenizer:
    path = os.path.join(bundle_dir, TOKENIZER_MODEL_FILE)
    ranks = read_tiktoken_ranks(path)
    _import("tiktoken", path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} single bytes have no token (first: {missing[0]}); "
                             "text containing them could not be encoded")
    return TiktokenTokenizer(ranks, extra_eos=spec.eos_token_ids)


def _load_tokenizer_json(bundle_dir: str, spec: ModelSpec, config: Mapping[str, Any]) -> Tokenizer:
    path = os.path.join(bundle_dir, TOKENIZER_JSON_FILE)
    _require_file(path)
    tokenizers = _import("tokenizers", path)
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for every parse error
        raise TokenizerError(f"{path}: not a tokenizers file ({first_line(e)})") from None
    eos = config.get("eos_token")
    if isinstance(eos, dict):  # transformers may save an AddedToken as a dict
        eos = eos.get("content")
    return JsonTokenizer(tok, eos if isinstance(eos, str) else None, extra_eos=spec.eos_token_ids)


def _load_ice_text(bundle_dir: str, spec: ModelSpec, config: Mapping[str, Any]) -> Tokenizer:
    from runtime.ice_text import load_ice_text  # its own module: ChatGLM-6B's text rules

    return load_ice_text(bundle_dir, spec, config)


_LOADERS = {
    TOKENIZER_SENTENCEPIECE: _load_sentencepiece,
    TOKENIZER_ICE_TEXT: _load_ice_text,
    TOKENIZER_TIKTOKEN: _load_tiktoken,
    TOKENIZER_JSON: _load_tokenizer_json,
}  # type: Dict[str, Callable[[str, ModelSpec, Mapping[str, Any]], Tokenizer]]


def _check_against_spec(tok: Tokenizer, spec: ModelSpec, bundle_dir: str) -> None:
    """The tokenizer must fit the model's embedding and agree with the special ids the manifest recorded."""
    files = os.path.join(bundle_dir, {TOKENIZER_JSON: TOKENIZER_JSON_FILE, TOKENIZER_ICE_TEXT: "ice_text.model"}
                         .get(tok.kind, TOKENIZER_MODEL_FILE))
    if tok.vocab_size > spec.vocab_size:
        raise TokenizerError(
            f"{files}: tokenizer has {tok.vocab_size} ids but the model's vocab_size is {spec.vocab_size}; "
            "these tokenizer files belong to another model"
        )
    for name, want in sorted(spec.special_tokens.items()):
        have = tok.special_ids.get(name)
        if have is not None and have != want:
            raise TokenizerError(f"{files}: special token {name!r} is id {have} but the manifest says {want}")


def load_tokenizer(bundle_dir: str, spec: ModelSpec) -> Tokenizer:
    """The tokenizer of a bundle (or checkpoint) directory, chosen by spec.tokenizer_kind and checked against spec."""
    if spec.tokenizer_kind == TOKENIZER_NONE:
        raise TokenizerError(f"{bundle_dir}: the bundle has no tokenizer (tokenizer_kind 'none'); pass token ids")
    loader = _LOADERS.get(spec.tokenizer_kind)
    if loader is None:
        raise TokenizerError(f"{bundle_dir}: unknown tokenizer_kind {spec.tokenizer_kind!r} in the manifest")
    config = read_tokenizer_config(bundle_dir)
    tok = loader(bundle_dir, spec, config)
    tok.config = dict(config)
    tok.chat_template = read_chat_template(bundle_dir, config)
    _check_against_spec(tok, spec, bundle_dir)
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Streaming detokenisation
# ---------------------------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turns generated ids into text as they arrive, returning only text that later ids cannot change.

    Holds the ordinary ids since the last special token (a "run", which Tokenizer.decode also decodes as a unit),
    decodes the whole run after each id and returns the new part of it, keeping back a trailing U+FFFD, which is
    an incomplete UTF-8 character (a byte-fallback or byte-level token split it) until its next bytes arrive.
    Decoding the whole run, not the last id alone, keeps sentencepiece's leading-space rule and multi-byte
    characters right. Invariant: "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids, skip_special).
    Cost is one decode of the current run per id.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._run = []  # type: List[int]
        self._sent = 0  # characters of decode(self._run) already returned

    def push(self, token_id: int) -> str:
        """Text that became final with this id (often "")."""
        token_id = int(token_id)
        if self._tok.is_special(token_id):
            text = self._end_run()
            return text if self._skip_special else text + self._tok.decode([token_id], skip_special=False)
        if not 0 <= token_id < self._tok.vocab_size:
            return ""  # padded embedding rows: Tokenizer.decode drops them too
        self._run.append(token_id)
        text = self._tok.decode(self._run)
        stable = len(text.rstrip("\ufffd"))
        if stable <= self._sent:
            return ""
        new = text[self._sent:stable]
        self._sent = stable
        return new

    def flush(self) -> str:
        """The rest of the text (an incomplete character included, as U+FFFD); the decoder is then empty."""
        return self._end_run()

    def _end_run(self) -> str:
        text = self._tok.decode(self._run)[self._sent:] if self._run else ""
        self._run, self._sent = [], 0
        return text
