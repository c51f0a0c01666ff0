"""The tokenizer.json written for GLM-4's tiktoken ranks tokenizes exactly like the runtime's tiktoken tokenizer."""
from __future__ import annotations

import os

from runtime.manifest import read_manifest
from runtime.tokenizer import GLM4_SPECIALS, load_tokenizer


def _corpus():
    from exporter.tiny.train import corpus_records

    texts = []
    for r in corpus_records(150, seed=11):
        texts += [r["text"]] if "text" in r else [m["content"] for m in r["messages"]]
    texts += ["def f(x):\n    return x**2  # square\n\n\n", "  multiple   spaces\t\ttabs\r\nCRLF  ",
              "emoji 😀🎉 mixed 中文English123456789 0.5e-3", "'s 're 'LL I'M", "<|user|> written as text", "\n",
              " leading space", "trailing space ", "ÀÉÎõü ß ﬁ", "日本語のテキスト、한국어"]
    return texts


def test_glm4_tokenizer_json_matches_tiktoken(tiny_models):
    from tokenizers import Tokenizer

    _, bundle = tiny_models.case("glm4-thudm")
    manifest = read_manifest(bundle)
    assert manifest.spec.tokenizer_kind == "tiktoken" and "tokenizer.json" in manifest.files
    ours = load_tokenizer(bundle, manifest.spec)
    hf = Tokenizer.from_file(os.path.join(bundle, "tokenizer.json"))
    hf.encode_special_tokens = True  # special-token text is ordinary text, as in our encode
    texts = _corpus()
    mismatched = [t for t in texts if hf.encode(t, add_special_tokens=False).ids != ours.encode(t)]
    assert mismatched == [], mismatched[:3]
    for t in texts:
        assert hf.decode(ours.encode(t), skip_special_tokens=False) == ours.decode(ours.encode(t), skip_special=False)
    base = manifest.spec.special_tokens["<|endoftext|>"]
    assert [hf.token_to_id(s) for s in GLM4_SPECIALS] == list(range(base, base + len(GLM4_SPECIALS)))
    hf.encode_special_tokens = False
    assert hf.encode("[gMASK]<sop><|user|>", add_special_tokens=False).ids == \
        [ours.token_to_id(s) for s in ("[gMASK]", "<sop>", "<|user|>")]
