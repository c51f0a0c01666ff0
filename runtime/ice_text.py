"""ChatGLM-6B's (v1) tokenizer: ``ice_text.model``, a sentencepiece model read with THUDM's text rules.

Where this stands in the flow: ``runtime.tokenizer.load_tokenizer`` builds an :class:`IceTextTokenizer` when the
manifest says ``tokenizer_kind: ice_text``; ``runtime.chat`` builds v1's chat prompt with it. The rules (THUDM's
``tokenization_chatglm.py`` for chatglm-6b, re-implemented here from its description, never imported):

* every sentencepiece id is offset by ``num_image_tokens`` (tokenizer_config.json; THUDM's default 20,000, the
  first release's vocabulary of 150528): ids below it are image tokens and decode to nothing. THUDM's later files
  say ``num_image_tokens: 0`` (vocabulary 130528, [gMASK] 130001), which reads the same way with no offset;
* before encoding, ``\\n`` becomes the piece ``<n>``, a tab ``<|tab|>`` and each run of 2..80 spaces
  ``<|blank_n|>`` (longest runs first); decoding reverses it;
* the specials ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`` are pieces of the model itself
  (their ids come from the file: published 130000, 130001, 130002, 130003, 130004, 130005, ...);
* a prompt ends with ``[gMASK] <sop>`` (ChatGLM2+ put them first): :meth:`IceTextTokenizer.encode_prompt`.

sentencepiece does the segmentation (a well-kept library); only the text rules above are written here, because no
library knows them. Runs on Python 3.8; sentencepiece is imported by the loader only.
"""
from __future__ import annotations

import os
import re
from typing import Any, List, Mapping, Sequence

from runtime.errors import TokenizerError
from runtime.spec import TOKENIZER_ICE_TEXT, ModelSpec
from runtime.tokenizer import Tokenizer, _unique, sentencepiece_processor

ICE_TEXT_FILE = "ice_text.model"
IMAGE_TOKENS = 20000  # THUDM's default num_image_tokens: ids [0, 20000) are image tokens, text ids start here
MAX_BLANK = 80  # longest run of spaces with its own piece
ICE_TEXT_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"


def blank_piece(n: int) -> str:
    """The piece for a run of ``n`` (2..80) spaces."""
    return "<|blank_%d|>" % n


_SPACES = re.compile(" {2,%d}" % MAX_BLANK)
_PIECES = re.compile(r"<n>|<\|tab\|>|<\|blank_(\d+)\|>")


def text_to_pieces(text: str) -> str:
    """THUDM's preprocessing: newlines, tabs and space runs as their pieces' text. A run longer than 80 spaces
    becomes <|blank_80|> followed by the rest (THUDM replaces the longest runs first, which gives the same)."""
    text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)
    return _SPACES.sub(lambda m: blank_piece(len(m.group(0))), text)


def pieces_to_text(text: str) -> str:
    """The inverse of :func:`text_to_pieces`, on decoded text."""

    def one(m: "re.Match[str]") -> str:
        if m.group(0) == NEWLINE_PIECE:
            return "\n"
        if m.group(0) == TAB_PIECE:
            return "\t"
        n = int(m.group(1))
        return " " * n if 2 <= n <= MAX_BLANK else m.group(0)

    return _PIECES.sub(one, text)


class IceTextTokenizer(Tokenizer):
    """ChatGLM-6B: sentencepiece ids + 20000, THUDM's whitespace rules, specials taken from the model's pieces."""

    kind = TOKENIZER_ICE_TEXT

    def __init__(self, sp, image_tokens: int = IMAGE_TOKENS, extra_eos: Sequence[int] = ()):
        self._offset = int(image_tokens)
        specials = {}
        for name in ICE_TEXT_SPECIALS:
            piece_id = sp.piece_to_id(name)
            if sp.id_to_piece(piece_id) == name:  # piece_to_id answers unk for a missing piece
                specials[name] = piece_id + self._offset
        eos = [specials["<eop>"]] if "<eop>" in specials else []
        super().__init__(specials, self._offset + sp.get_piece_size(), _unique(list(extra_eos) + eos))
        self._sp = sp

    def _encode_plain(self, text: str) -> List[int]:
        return [i + self._offset for i in self._sp.encode(text_to_pieces(text))]

    def _decode_plain(self, ids: List[int]) -> str:
        pieces = [i - self._offset for i in ids if i >= self._offset]  # image tokens have no text
        return pieces_to_text(self._sp.decode(pieces)) if pieces else ""

    def encode_prompt(self, text: str) -> List[int]:
        """Ids of a plain prompt: encode(text), then [gMASK] <sop> (v1 puts them at the end)."""
        return self.encode(text) + self.prefix_ids()


def image_offset(config: Mapping[str, Any], where: str) -> int:
    """tokenizer_config.json's num_image_tokens (THUDM's default 20000 when absent)."""
    value = config.get("num_image_tokens", IMAGE_TOKENS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TokenizerError(f"{where}: tokenizer_config.json 'num_image_tokens' must be a whole number, got {value!r}")
    return value


def load_ice_text(bundle_dir: str, spec: ModelSpec, config: Mapping[str, Any]) -> Tokenizer:
    path = os.path.join(bundle_dir, ICE_TEXT_FILE)
    sp = sentencepiece_processor(path)
    tok = IceTextTokenizer(sp, image_offset(config, path), extra_eos=spec.eos_token_ids)
    missing = [n for n in ("[gMASK]", "<sop>", "<eop>") if n not in tok.special_ids]
    if missing:
        raise TokenizerError(f"{path}: has no {missing[0]} piece; an ice_text.model of ChatGLM-6B has "
                             + ", ".join(ICE_TEXT_SPECIALS[:6]))
    return tok
