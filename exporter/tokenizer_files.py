"""Which tokenizer a checkpoint ships, and which of its files an export bundle must carry.

Where this stands in the flow: ``exporter.config`` calls ``detect_tokenizer`` while it builds the spec, so the
tokenizer kind, chat format and special-token ids go into the manifest, and the bundle writer copies
``TokenizerFacts.files``. The runtime's ``load_tokenizer`` later reads the same files and checks them against the
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


def _remote_code_chat_format(ckpt_dir: str) -> Optional[str]:
    """THUDM's tokenization_chatglm.py, read as text (never imported): ChatGLM3's defines the role tokens,
    ChatGLM2's does not. None when the file is absent or unreadable."""
    path = os.path.join(ckpt_dir, REMOTE_TOKENIZER_CODE)
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError:
        return None
    return CHAT_CHATGLM3 if "<|observation|>" in source else CHAT_CHATGLM2


def _sentencepiece_chat_format(ckpt_dir: str, config: Mapping[str, Any], template: Optional[str], hint: str) -> str:
    """chatglm2 or chatglm3, from the first signal found: role tokens declared in tokenizer_config.json; the
    checkpoint's tokenization_chatglm.py (as text); "chatglm2"/"chatglm3" in tokenizer_config.json's name_or_path;
    else the hint (chatglm2 when the hint is not a sentencepiece format)."""
    if _config_declares_role_tokens(config, template):
        return CHAT_CHATGLM3
    from_code = _remote_code_chat_format(ckpt_dir)
    if from_code is not None:
        return from_code
    name = str(config.get("name_or_path") or config.get("_name_or_path") or "").lower()
    for chat_format in (CHAT_CHATGLM2, CHAT_CHATGLM3):
        if chat_format in name:
            return chat_format
    return hint if hint in (CHAT_CHATGLM2, CHAT_CHATGLM3) else CHAT_CHATGLM2


def _ice_text_facts(ckpt_dir: str, files: List[str]) -> TokenizerFacts:
    """ChatGLM-6B's ice_text.model: special ids are its pieces' ids + 20000 (read when sentencepiece is installed;
    the config's own ids are used otherwise)."""
    specials: Dict[str, int] = {}
    try:
        import sentencepiece as spm
    except ImportError:
        spm = None
    if spm is not None:
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
    keep = [f for f in files if f != TOKENIZER_MODEL_FILE]
    return TokenizerFacts(TOKENIZER_ICE_TEXT, CHAT_CHATGLM1, specials, keep)


def detect_tokenizer(ckpt_dir: str, chat_format_hint: str) -> TokenizerFacts:
    """The tokenizer a checkpoint directory ships: kind, chat format, special ids and the files to copy.

    ice_text.model -> "ice_text" (ChatGLM-6B, chat format chatglm1);
    tokenizer.json -> "tokenizer.json" (chat format "template" when tokenizer_config.json has a chat_template, else
    the hint); else a sentencepiece tokenizer.model -> "sentencepiece" (chatglm2 or chatglm3); else a tokenizer.model
    of base64-rank lines -> "tiktoken" (chat format glm4); no tokenizer file -> kind and chat format "none".
    ``chat_format_hint`` ("chatglm2", "chatglm3" or "glm4") is what the config reader inferred from config.json.
    """
    files = _present(ckpt_dir)
    if ICE_TEXT_FILE in files:
        return _ice_text_facts(ckpt_dir, files)
    config = read_tokenizer_config(ckpt_dir)
    template = read_chat_template(ckpt_dir, config)
    json_path = os.path.join(ckpt_dir, TOKENIZER_JSON_FILE)
    model_path = os.path.join(ckpt_dir, TOKENIZER_MODEL_FILE)
    if TOKENIZER_JSON_FILE in files:
        if TOKENIZER_MODEL_FILE in files:  # the runtime would never read it
            files.remove(TOKENIZER_MODEL_FILE)
        chat = CHAT_TEMPLATE if template else chat_format_hint
        return TokenizerFacts(TOKENIZER_JSON, chat, _json_specials(json_path), files)
    if TOKENIZER_MODEL_FILE not in files:
        return TokenizerFacts(TOKENIZER_NONE, CHAT_NONE, {}, [])
    pieces = _sentencepiece_size(model_path)
    if pieces is not None:
        chat = _sentencepiece_chat_format(ckpt_dir, config, template, chat_format_hint)
        names = SP_BASE_SPECIALS + (SP_ROLE_SPECIALS if chat == CHAT_CHATGLM3 else ())
        return TokenizerFacts(TOKENIZER_SENTENCEPIECE, chat, {n: pieces + i for i, n in enumerate(names)}, files)
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
    specials = {n: len(ranks) + i for i, n in enumerate(GLM4_SPECIALS)}
    return TokenizerFacts(TOKENIZER_TIKTOKEN, CHAT_GLM4, specials, files)  # only GLM-4 ships this format
