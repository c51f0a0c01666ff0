"""A ``tokenizer.json`` for GLM-4's tiktoken-format ``tokenizer.model``, built with the ``tokenizers`` library.

Where it stands: the exporter writes it into a bundle whose checkpoint ships only the tiktoken ranks (THUDM GLM-4),
so tools that read only ``tokenizer.json`` (onnxruntime-genai's tokenizer, transformers' fast tokenizers) tokenize
like our runtime. ``tests/exporter/test_tokenizer_json.py`` checks the ids against the runtime's tiktoken tokenizer
on a mixed Chinese/English/code/whitespace corpus.

The conversion (the standard way to express tiktoken BPE as a merges list, written here against the tokenizers API):
token bytes are spelled in GPT-2's byte-to-unicode alphabet; each multi-byte token of rank r contributes the merges
(left, right) of every split whose halves are tokens, ordered by the halves' ranks, and merges are sorted by r. So
the BPE applies merges in the order tiktoken's ranks do; ``ignore_merges`` emits a pre-token that is itself a token
directly, as tiktoken does. The pre-tokenizer is GLM-4's split pattern, then byte-level mapping without its own
regex; special tokens follow the ranks (``runtime.tokenizer.GLM4_SPECIALS``).

ChatGLM2/3's sentencepiece models are not converted: sentencepiece's normalisation (whitespace handling, dummy
prefix) would have to be reproduced rule by rule, and a tokenizer.json that disagrees on some text is worse than
none; those bundles keep ``tokenizer.model``, which our runtime and chatglm.cpp read.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from runtime.tokenizer import GLM4_SPECIALS, GLM4_SPLIT_PATTERN


def byte_alphabet() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to themselves, the other
    bytes to code points from 256 on, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def vocab_and_merges(ranks: Dict[bytes, int]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """tiktoken ranks -> (BPE vocabulary, merges in application order)."""
    alphabet = byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    merges: List[Tuple[int, int, int, str, str]] = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], spell(left), spell(right)))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges]


def tokenizer_from_tiktoken(ranks: Dict[bytes, int]):
    """A ``tokenizers.Tokenizer`` equivalent to GLM-4's tiktoken encoding over ``ranks``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    base = len(ranks)
    specials = [AddedToken(s, special=True, normalized=False) for s in GLM4_SPECIALS]
    tok.add_special_tokens(specials)
    for i, s in enumerate(GLM4_SPECIALS):  # they must land right after the ranks
        if tok.token_to_id(s) != base + i:
            raise ValueError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {base + i}")
    return tok


def write_tokenizer_json(tiktoken_file: str, out_path: str) -> None:
    from runtime.tokenizer import read_tiktoken_ranks

    tokenizer_from_tiktoken(read_tiktoken_ranks(tiktoken_file)).save(out_path)
