"""Which tokenizer a checkpoint ships, and which of its files an export bundle must carry.

Where this stands in the flow: ``exporter.detect`` calls ``scan_tokenizer`` once while it gathers a checkpoint's
signals; once the family is decided, ``tokenizer_facts`` gives the tokenizer kind, chat format and special-token
ids for the manifest, and the bundle writer copies ``TokenizerFacts.files``. The runtime's ``load_tokenizer`` later reads the same files and checks them against the
spec. Only files are read: a checkpoint's ``tokenization_chatglm.py`` is never imported or copied.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from runtime.errors import TokenizerError, read_json_object
from runtime.ice_text import ICE_TEXT_FILE, ICE_TEXT_SPECIALS, image_offset
from runtime.spec import (
    CHAT_CHATGLM1,
    CHAT_CHATGLM2,
    CHAT_CHATGLM3,
    CHAT_GLM4,
    CHAT_NONE,
    CHAT_TEMPLATE,
    TOKENIZER_ICE_TEXT,
    TOKENIZER_JSON,
    TOKENIZER_NONE,
    TOKENIZER_SENTENCEPIECE,
    TOKENIZER_TIKTOKEN,
)
from runtime.tokenizer import (
    CHAT_TEMPLATE_FILE,
    GLM4_SPECIALS,
    SP_BASE_SPECIALS,
    SP_ROLE_SPECIALS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_JSON_FILE,
    TOKENIZER_MODEL_FILE,
    read_chat_template,
    read_tiktoken_ranks,
    read_tokenizer_config,
)

REMOTE_TOKENIZER_CODE = "tokenization_chatglm.py"  # THUDM's remote code: read as text for a signal, never imported

# Copied into a bundle when present, in this order.
BUNDLE_TOKENIZER_FILES = (
    ICE_TEXT_FILE,
    TOKENIZER_MODEL_FILE,
    TOKENIZER_JSON_FILE,
    TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json",
    "generation_config.json",
    CHAT_TEMPLATE_FILE,
)


@dataclass
class TokenizerFacts:
    """What the exporter records about a checkpoint's tokenizer."""

    kind: str  # one of runtime.spec.TOKENIZER_KINDS
    chat_format: str  # one of runtime.spec.CHAT_FORMATS
    special_tokens: Dict[str, int] = field(default_factory=dict)  # "[gMASK]" -> id, ...
    files: List[str] = field(default_factory=list)  # file names to copy into the bundle


def _present(ckpt_dir: str) -> List[str]:
    return [name for name in BUNDLE_TOKENIZER_FILES if os.path.isfile(os.path.join(ckpt_dir, name))]


def _json_specials(path: str) -> Dict[str, int]:
    """Special added tokens of a tokenizer.json, read as JSON (no need to build the tokenizer for this)."""
    added = read_json_object(path, TokenizerError).get("added_tokens") or []
    try:
        return {str(t["content"]): int(t["id"]) for t in added if t.get("special")}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TokenizerError(f"{path}: malformed 'added_tokens' list") from None


def _sentencepiece_size(path: str) -> Optional[int]:
    """Piece count when the file parses as a sentencepiece model, else None (also when sentencepiece is missing)."""
    try:
        import sentencepiece as spm
    except ImportError:
        return None
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (RuntimeError, OSError, ValueError):
        return None
    return sp.get_piece_size()


def _config_declares_role_tokens(config: Mapping[str, Any], template: Optional[str]) -> bool:
    """ChatGLM3's later tokenizer_config.json names its role tokens (added_tokens_decoder, or a chat_template with
    ``<|assistant|>`` / ``<|{{ role }}|>``); ChatGLM2's never does."""
    added = config.get("added_tokens_decoder") or {}
    names = {str(t.get("content")) for t in added.values() if isinstance(t, dict)} if isinstance(added, dict) else set()
    names |= {t for t in config.get("additional_special_tokens") or [] if isinstance(t, str)}
    markers = ("<|user|>", "<|assistant|>", "<|{{")
    return "<|user|>" in names or (template is not None and any(m in template for m in markers))


def remote_code_chat_format(ckpt_dir: str) -> Optional[str]:
    """THUDM's tokenization_chatglm.py, read as text (never imported): ChatGLM3's defines the role tokens,
    ChatGLM2's does not. None when the file is absent or unreadable."""
    path = os.path.join(ckpt_dir, REMOTE_TOKENIZER_CODE)
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError:
        return None
    return CHAT_CHATGLM3 if "<|observation|>" in source else CHAT_CHATGLM2


@dataclass
class TokenizerScan:
    """What a checkpoint's tokenizer files say, before any decision about the model family."""

    kind: str  # one of runtime.spec.TOKENIZER_KINDS
    files: List[str]  # file names to copy into the bundle
    base_size: int = 0  # sentencepiece pieces or tiktoken ranks (specials are appended after them)
    json_specials: Dict[str, int] = field(default_factory=dict)  # tokenizer.json's (or ice_text's) special tokens
    declares_role_tokens: bool = False  # tokenizer_config.json / chat template names ChatGLM3's role tokens
    has_template: bool = False  # a chat_template ships with the checkpoint


def _ice_text_specials(ckpt_dir: str) -> Dict[str, int]:
    """ChatGLM-6B's ice_text.model: special ids are its pieces' ids + the image-token offset (read when sentencepiece
    is installed; the config's own ids are used otherwise)."""
    specials: Dict[str, int] = {}
    try:
        import sentencepiece as spm
    except ImportError:
        return specials
    path = os.path.join(ckpt_dir, ICE_TEXT_FILE)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (RuntimeError, OSError, ValueError):
        raise TokenizerError(f"{path}: not a sentencepiece model") from None
    offset = image_offset(read_tokenizer_config(ckpt_dir), path)
    for name in ICE_TEXT_SPECIALS:
        if sp.id_to_piece(sp.piece_to_id(name)) == name:
            specials[name] = sp.piece_to_id(name) + offset
    return specials


def scan_tokenizer(ckpt_dir: str) -> TokenizerScan:
    """Read the tokenizer files as data: which kind, how many base tokens, which specials are declared.

    ice_text.model is ChatGLM-6B's (kind "ice_text"); tokenizer.json wins over tokenizer.model (the runtime would never
    read the latter); a tokenizer.model is a
    sentencepiece model when it parses as one, else tiktoken base64-rank lines; no tokenizer file -> kind "none".
    """
    files = _present(ckpt_dir)
    config = read_tokenizer_config(ckpt_dir)
    template = read_chat_template(ckpt_dir, config)
    roles = _config_declares_role_tokens(config, template)
    json_path = os.path.join(ckpt_dir, TOKENIZER_JSON_FILE)
    model_path = os.path.join(ckpt_dir, TOKENIZER_MODEL_FILE)
    if ICE_TEXT_FILE in files:
        keep = [f for f in files if f != TOKENIZER_MODEL_FILE]
        return TokenizerScan(TOKENIZER_ICE_TEXT, keep, 0, _ice_text_specials(ckpt_dir), roles, template is not None)
    if TOKENIZER_JSON_FILE in files:
        if TOKENIZER_MODEL_FILE in files:
            files.remove(TOKENIZER_MODEL_FILE)
        return TokenizerScan(TOKENIZER_JSON, files, 0, _json_specials(json_path), roles, template is not None)
    if TOKENIZER_MODEL_FILE not in files:
        return TokenizerScan(TOKENIZER_NONE, [], 0, {}, roles, template is not None)
    pieces = _sentencepiece_size(model_path)
    if pieces is not None:
        return TokenizerScan(TOKENIZER_SENTENCEPIECE, files, pieces, {}, roles, template is not None)
    try:
        ranks = read_tiktoken_ranks(model_path)
    except TokenizerError:
        if importlib.util.find_spec("sentencepiece") is None:
            raise TokenizerError(f"{model_path}: not tiktoken base64-rank lines; if it is a sentencepiece model, "
                                 "reading it needs: pip install sentencepiece") from None
        raise TokenizerError(
            f"{model_path}: neither a sentencepiece model nor tiktoken base64-rank lines; the checkpoint's "
            "tokenizer file is corrupt or of an unknown kind"
        ) from None
    return TokenizerScan(TOKENIZER_TIKTOKEN, files, len(ranks), {}, roles, template is not None)


def tokenizer_facts(scan: TokenizerScan, chat_format: str) -> TokenizerFacts:
    """The tokenizer record for a decided chat format: special-token ids follow from the kind and the format.

    A checkpoint without tokenizer files keeps the decided chat format (the bundle can take a tokenizer later);
    a tokenizer.json with a chat template uses the template.
    """
    if scan.kind == TOKENIZER_ICE_TEXT:
        return TokenizerFacts(TOKENIZER_ICE_TEXT, CHAT_CHATGLM1, dict(scan.json_specials), list(scan.files))
    if scan.kind == TOKENIZER_JSON:
        chat = CHAT_TEMPLATE if scan.has_template else chat_format
        return TokenizerFacts(TOKENIZER_JSON, chat, dict(scan.json_specials), list(scan.files))
    if scan.kind == TOKENIZER_NONE:
        return TokenizerFacts(TOKENIZER_NONE, chat_format, {}, [])
    if scan.kind == TOKENIZER_SENTENCEPIECE:
        names = SP_BASE_SPECIALS + (SP_ROLE_SPECIALS if chat_format == CHAT_CHATGLM3 else ())
        specials = {n: scan.base_size + i for i, n in enumerate(names)}
        return TokenizerFacts(TOKENIZER_SENTENCEPIECE, chat_format, specials, list(scan.files))
    specials = {n: scan.base_size + i for i, n in enumerate(GLM4_SPECIALS)}
    return TokenizerFacts(TOKENIZER_TIKTOKEN, CHAT_GLM4, specials, list(scan.files))


def detect_tokenizer(ckpt_dir: str, chat_format_hint: str) -> TokenizerFacts:
    """The tokenizer of a checkpoint directory on its own (kind, chat format, specials, files to copy), for callers
    without a checkpoint config: the sentencepiece family is decided from the tokenizer's own signals (declared
    role tokens, tokenization_chatglm.py read as text, name_or_path), else ``chat_format_hint``. The exporter does
    not use this: ``exporter.detect`` gathers these signals with the config's and decides once."""
    scan = scan_tokenizer(ckpt_dir)
    if scan.kind == TOKENIZER_NONE:
        return TokenizerFacts(TOKENIZER_NONE, CHAT_NONE, {}, [])
    if scan.kind == TOKENIZER_SENTENCEPIECE:
        chat = _sentencepiece_chat_format(ckpt_dir, read_tokenizer_config(ckpt_dir), scan, chat_format_hint)
        return tokenizer_facts(scan, chat)
    return tokenizer_facts(scan, chat_format_hint)


def _sentencepiece_chat_format(ckpt_dir: str, config: Mapping[str, Any], scan: TokenizerScan, hint: str) -> str:
    if scan.declares_role_tokens:
        return CHAT_CHATGLM3
    from_code = remote_code_chat_format(ckpt_dir)
    if from_code is not None:
        return from_code
    name = str(config.get("name_or_path") or config.get("_name_or_path") or "").lower()
    for chat_format in (CHAT_CHATGLM2, CHAT_CHATGLM3):
        if chat_format in name:
            return chat_format
    return hint if hint in (CHAT_CHATGLM2, CHAT_CHATGLM3) else CHAT_CHATGLM2
