"""Which model a checkpoint directory holds, decided once from every signal it carries.

Where this stands in the flow: ``exporter.config.spec_from_checkpoint`` calls :func:`detect_checkpoint` first.
It gathers the signals (config.json's ``model_type``, ``architectures``, ``auto_map``, ``padded_vocab_size``,
``position_encoding_2d``, ``eos_token_id``, ``_name_or_path``; the tokenizer files; the shipped
``tokenization_chatglm.py`` read as text, never run), decides the weight layout and the model family in one step,
and returns the decision with the signal that decided it (recorded in the manifest), plus what the shipped
``modeling_chatglm.py`` (read as text) does with ``rope_ratio``. Nothing after it reads those files again.

Each signal votes for a set of layouts and/or families; the decision is the intersection. An empty intersection is
a conflict: the error names the disagreeing signals and the override (``--generation``). Where signals leave a
choice (a THUDM checkpoint with no tokenizer and no name), the default is ChatGLM3, as ChatGLM2/3 share one block.
ChatGLM-6B (v1: ``chatglm1``) has its votes here (its own config fields, ice_text.model, vocabulary, name) and its
spec fields in ``exporter.config``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

from runtime.errors import ConfigError, UnsupportedModelError
from runtime.spec import (
    ROPE_SCALING_BASE,
    ROPE_SCALING_INTERPOLATION,
    TOKENIZER_ICE_TEXT,
    TOKENIZER_JSON,
    TOKENIZER_SENTENCEPIECE,
    TOKENIZER_TIKTOKEN,
)

from exporter.tokenizer_files import REMOTE_TOKENIZER_CODE, TokenizerScan, scan_tokenizer

log = logging.getLogger("glm_export")

REMOTE_MODELING_CODE = "modeling_chatglm.py"  # THUDM's remote code: read as text, never imported

LAYOUT_THUDM = "thudm"  # transformer.encoder.layers.N, fused query_key_value (remote-code checkpoints)
LAYOUT_GLM = "glm"  # transformers' glm: model.layers.N, split q/k/v (glm-4-9b-chat-hf)
LAYOUT_GLM4 = "glm4"  # transformers' glm4: + sandwich norms (GLM-4-0414)
LAYOUTS = (LAYOUT_THUDM, LAYOUT_GLM, LAYOUT_GLM4)

FAMILY_CHATGLM1 = "chatglm1"  # ChatGLM-6B (v1): 2D positions, prefix-LM mask
FAMILY_CHATGLM2 = "chatglm2"
FAMILY_CHATGLM3 = "chatglm3"
FAMILY_GLM4 = "glm4"  # GLM-4-9B-chat, THUDM or -hf layout
FAMILY_GLM4_0414 = "glm4-0414"
FAMILIES = (FAMILY_CHATGLM1, FAMILY_CHATGLM2, FAMILY_CHATGLM3, FAMILY_GLM4, FAMILY_GLM4_0414)
SUPPORTED_FAMILIES = FAMILIES  # values of --generation
# where several families remain, the first of these wins (ChatGLM2 and ChatGLM3 share the block; only the
# tokenizer and chat format differ, and those have their own signals)
DEFAULT_ORDER = (FAMILY_CHATGLM3, FAMILY_CHATGLM2, FAMILY_GLM4, FAMILY_GLM4_0414, FAMILY_CHATGLM1)
# config.json fields only ChatGLM-6B (v1) has (ChatGLM2+ configs have none of them)
CHATGLM1_CONFIG_FIELDS = ("position_encoding_2d", "inner_hidden_size", "max_sequence_length", "gmask_token_id")

# which layouts each family is published in
LAYOUTS_OF_FAMILY = {
    FAMILY_CHATGLM1: (LAYOUT_THUDM,),
    FAMILY_CHATGLM2: (LAYOUT_THUDM,),
    FAMILY_CHATGLM3: (LAYOUT_THUDM,),
    FAMILY_GLM4: (LAYOUT_THUDM, LAYOUT_GLM),
    FAMILY_GLM4_0414: (LAYOUT_GLM4,),
}

ALL_LAYOUTS: FrozenSet[str] = frozenset(LAYOUTS)
ALL_FAMILIES: FrozenSet[str] = frozenset(FAMILIES)
_THUDM_FAMILIES = frozenset({FAMILY_CHATGLM1, FAMILY_CHATGLM2, FAMILY_CHATGLM3, FAMILY_GLM4})

# config.json model_type -> (layouts, families)
MODEL_TYPES = {
    "chatglm": (frozenset({LAYOUT_THUDM}), _THUDM_FAMILIES),
    "glm": (frozenset({LAYOUT_GLM}), frozenset({FAMILY_GLM4})),
    "glm4": (frozenset({LAYOUT_GLM4}), frozenset({FAMILY_GLM4_0414})),
}
# config.json architectures[i] -> layout
ARCHITECTURES = {
    "ChatGLMModel": LAYOUT_THUDM,
    "ChatGLMForConditionalGeneration": LAYOUT_THUDM,
    "ChatGLMForSequenceClassification": LAYOUT_THUDM,
    "GlmForCausalLM": LAYOUT_GLM,
    "Glm4ForCausalLM": LAYOUT_GLM4,
}
# the published vocabulary sizes (THUDM padded_vocab_size; transformers vocab_size)
VOCAB_SIZES = {
    151552: frozenset({FAMILY_GLM4, FAMILY_GLM4_0414}),
    65024: frozenset({FAMILY_CHATGLM2, FAMILY_CHATGLM3}),
    130528: frozenset({FAMILY_CHATGLM1}),
}
GLM4_EOS_IDS = (151329, 151336, 151338)
# tokenization_chatglm.py markers, most specific first (text search only; the file is never imported)
REMOTE_CODE_MARKERS = (
    ("ChatGLM4Tokenizer", frozenset({FAMILY_GLM4})),
    ("import tiktoken", frozenset({FAMILY_GLM4})),
    ("num_image_tokens", frozenset({FAMILY_CHATGLM1})),  # v1's SPTokenizer (early: image tokens)
    ("max_blank_length", frozenset({FAMILY_CHATGLM1})),  # v1's SPTokenizer (its blank-run text rules)
    ("<|observation|>", frozenset({FAMILY_CHATGLM3})),
    ("class ChatGLMTokenizer", frozenset({FAMILY_CHATGLM2})),  # ChatGLM2's: no role tokens, no image tokens
)
# name fragments in _name_or_path / name_or_path, most specific first
NAME_MARKERS = (
    ("0414", frozenset({FAMILY_GLM4_0414})),  # GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1-*-0414
    ("glm-4", frozenset({FAMILY_GLM4, FAMILY_GLM4_0414})),
    ("glm4", frozenset({FAMILY_GLM4, FAMILY_GLM4_0414})),
    ("chatglm3", frozenset({FAMILY_CHATGLM3})),
    ("chatglm2", frozenset({FAMILY_CHATGLM2})),
    ("chatglm-6b", frozenset({FAMILY_CHATGLM1})),
)


@dataclass(frozen=True)
class Signal:
    """One thing the checkpoint says about itself, and what it is compatible with."""

    source: str  # where it was read: "config.json model_type", "tokenizer.model", ...
    value: str  # what was read, short
    layouts: FrozenSet[str] = ALL_LAYOUTS
    families: FrozenSet[str] = ALL_FAMILIES

    def describe(self) -> str:
        return f"{self.source} {self.value}"

    def to_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "value": self.value, "layouts": sorted(self.layouts),
                "families": sorted(self.families)}


@dataclass(frozen=True)
class Detection:
    """The decision: layout and family, which signal decided each, and every signal seen."""

    layout: str
    family: str
    layout_decided_by: str
    family_decided_by: str
    signals: Tuple[Signal, ...]
    tokenizer: TokenizerScan = field(compare=False)
    overridden: bool = False
    # what the shipped modeling_chatglm.py (read as text) does with rope_ratio: (kind, how it was read), or None
    rope_meaning: Optional[Tuple[str, str]] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "layout": self.layout,
            "family": self.family,
            "layout_decided_by": self.layout_decided_by,
            "family_decided_by": self.family_decided_by,
            "overridden_by_user": self.overridden,
            "signals": [s.to_dict() for s in self.signals],
        }


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _config_signals(cfg: Mapping[str, Any], where: str) -> List[Signal]:
    out: List[Signal] = []
    model_type = cfg.get("model_type")
    if model_type is not None:
        if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
            known = ", ".join(sorted(MODEL_TYPES))
            raise UnsupportedModelError(
                f"{where}: field 'model_type' = {model_type!r} is not supported (known: {known})")
        layouts, families = MODEL_TYPES[model_type]
        out.append(Signal("config.json model_type", repr(model_type), layouts, families))
    archs = cfg.get("architectures") or []
    known_archs = [a for a in archs if isinstance(a, str) and a in ARCHITECTURES] if isinstance(archs, list) else []
    if known_archs:
        layouts = frozenset(ARCHITECTURES[a] for a in known_archs)
        out.append(Signal("config.json architectures", repr(known_archs), layouts,
                          _THUDM_FAMILIES if layouts == {LAYOUT_THUDM} else ALL_FAMILIES))
    auto_map = cfg.get("auto_map")
    if isinstance(auto_map, dict) and any("modeling_chatglm" in str(v) for v in auto_map.values()):
        out.append(Signal("config.json auto_map", "names modeling_chatglm", frozenset({LAYOUT_THUDM}),
                          _THUDM_FAMILIES))
    v1_fields = [k for k in CHATGLM1_CONFIG_FIELDS if k in cfg]
    if v1_fields:
        out.append(Signal("config.json " + "/".join(v1_fields), "present", frozenset({LAYOUT_THUDM}),
                          frozenset({FAMILY_CHATGLM1})))
    for key in ("padded_vocab_size", "vocab_size"):
        vocab = cfg.get(key)
        if isinstance(vocab, int) and vocab in VOCAB_SIZES:
            out.append(Signal(f"config.json {key}", str(vocab), families=VOCAB_SIZES[vocab]))
            break
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list) and any(e in GLM4_EOS_IDS for e in eos):
        out.append(Signal("config.json eos_token_id", str(eos), families=frozenset({FAMILY_GLM4, FAMILY_GLM4_0414})))
    return out


def _name_signal(source: str, name: Any) -> Optional[Signal]:
    text = str(name or "").lower()
    for marker, families in NAME_MARKERS:
        if marker in text:
            return Signal(source, repr(str(name)), families=families)
    return None


def _tokenizer_signals(ckpt_dir: str, scan: TokenizerScan) -> List[Signal]:
    out: List[Signal] = []
    if scan.kind == TOKENIZER_ICE_TEXT:
        out.append(Signal("ice_text.model", "present", frozenset({LAYOUT_THUDM}), frozenset({FAMILY_CHATGLM1})))
    elif scan.kind == TOKENIZER_TIKTOKEN:
        out.append(Signal("tokenizer.model", "tiktoken base64 ranks", families=frozenset({FAMILY_GLM4})))
    elif scan.kind == TOKENIZER_SENTENCEPIECE:
        families = ({FAMILY_CHATGLM3} if scan.declares_role_tokens
                    else {FAMILY_CHATGLM1, FAMILY_CHATGLM2, FAMILY_CHATGLM3})
        what = "sentencepiece" + (" + ChatGLM3 role tokens in tokenizer_config.json" if scan.declares_role_tokens
                                  else "")
        out.append(Signal("tokenizer.model", what, frozenset({LAYOUT_THUDM}), frozenset(families)))
    elif scan.kind == TOKENIZER_JSON:
        out.append(Signal("tokenizer.json", "present", families=frozenset({FAMILY_GLM4, FAMILY_GLM4_0414})))
    code = _read_text(os.path.join(ckpt_dir, REMOTE_TOKENIZER_CODE))
    if code is not None:
        for marker, families in REMOTE_CODE_MARKERS:
            if marker in code:
                out.append(Signal(REMOTE_TOKENIZER_CODE, f"contains {marker!r}", frozenset({LAYOUT_THUDM}), families))
                break
    return out


def rope_meaning_from_remote_code(ckpt_dir: str) -> Optional[Tuple[str, str]]:
    """THUDM's remote code is the ground truth for ``rope_ratio``: ChatGLM2-6B-32k's divides positions
    (``seq_idx / self.rope_ratio``), ChatGLM3-6B-32k's and GLM-4's multiply the base (``base * self.rope_ratio``)."""
    text = _read_text(os.path.join(ckpt_dir, REMOTE_MODELING_CODE))
    if text is None:
        return None
    if re.search(r"base\s*\*\s*self\.rope_ratio", text):
        return ROPE_SCALING_BASE, f"{REMOTE_MODELING_CODE} multiplies the base by rope_ratio"
    if re.search(r"/\s*self\.rope_ratio", text):
        return ROPE_SCALING_INTERPOLATION, f"{REMOTE_MODELING_CODE} divides positions by rope_ratio"
    return None


def gather_signals(ckpt_dir: str, cfg: Mapping[str, Any], where: str) -> Tuple[List[Signal], TokenizerScan]:
    """Every signal the directory carries, strongest first, and the tokenizer scan they came from."""
    from runtime.tokenizer import read_tokenizer_config

    signals = _config_signals(cfg, where)
    scan = scan_tokenizer(ckpt_dir)
    signals += _tokenizer_signals(ckpt_dir, scan)
    for source, name in (("config.json _name_or_path", cfg.get("_name_or_path")),
                         ("tokenizer_config.json name_or_path", read_tokenizer_config(ckpt_dir).get("name_or_path"))):
        sig = _name_signal(source, name)
        if sig is not None:
            signals.append(sig)
    return signals, scan


def _conflict(where: str, what: str, signals: List[Signal], pick) -> ConfigError:
    listing = "; ".join(f"{s.describe()} says {'/'.join(sorted(pick(s)))}" for s in signals)
    return ConfigError(f"{where}: the checkpoint's signals disagree about the {what}: {listing}; fix the file that "
                       f"is wrong or pass --generation {'|'.join(SUPPORTED_FAMILIES)}")


def _narrow(universe: FrozenSet[str], signals: List[Signal], pick, where: str, what: str):
    """Intersect the votes of the signals that restrict ``universe``; (result, those signals). A vote that leaves
    nothing is a conflict naming the signals it clashes with."""
    voters = [s for s in signals if pick(s) != universe]
    result = universe
    for s in voters:
        narrowed = result & pick(s)
        if not narrowed:
            clash = [v for v in voters if not (pick(v) & pick(s))] + [s]
            raise _conflict(where, what, list(dict.fromkeys(clash)), pick)
        result = narrowed
    return result, voters


def decide(signals: List[Signal], where: str, generation: Optional[str] = None) -> Tuple[str, str, str, str]:
    """(layout, family, layout decided by, family decided by) from the signals, or from ``generation``."""
    if generation is not None and generation not in SUPPORTED_FAMILIES:
        raise ConfigError(f"--generation: expected one of {', '.join(SUPPORTED_FAMILIES)}, got {generation!r}")
    layout_votes = [s for s in signals if s.layouts != ALL_LAYOUTS]
    if not layout_votes:
        raise ConfigError(f"{where}: no 'model_type', known 'architectures' or 'auto_map' says which model this is "
                          "(expected model_type chatglm, glm or glm4)")
    if generation is not None:
        allowed = frozenset(LAYOUTS_OF_FAMILY[generation])
        for s in layout_votes:  # the strongest layout signal compatible with the family the user named
            if s.layouts & allowed:
                layout = sorted(s.layouts & allowed)[0]
                return layout, generation, s.describe(), "--generation (set by the user)"
        return LAYOUTS_OF_FAMILY[generation][0], generation, "--generation", "--generation (set by the user)"
    layouts, _ = _narrow(ALL_LAYOUTS, signals, lambda s: s.layouts, where, "layout")
    families, family_voters = _narrow(ALL_FAMILIES, signals, lambda s: s.families, where, "model family")
    families = frozenset(f for f in families if layouts & frozenset(LAYOUTS_OF_FAMILY[f]))
    if not families:
        raise _conflict(where, "model family", signals, lambda s: s.families)
    layout = sorted(layouts)[0] if len(layouts) == 1 else LAYOUT_THUDM
    layout_by = next(s.describe() for s in layout_votes if layout in s.layouts)
    if len(families) == 1:
        family = next(iter(families))
        candidates = _candidates_for(layout)
        family_by = next((s.describe() for s in family_voters if s.families & candidates == families), None)
        if family_by is None:
            family_by = " + ".join(s.describe() for s in family_voters) or "the layout"
    else:
        family = next(f for f in DEFAULT_ORDER + FAMILIES if f in families)
        family_by = f"default ({'/'.join(sorted(families))} remained; no signal separates them)"
    return layout, family, layout_by, family_by


def _candidates_for(layout: str) -> FrozenSet[str]:
    return frozenset(f for f, layouts in LAYOUTS_OF_FAMILY.items() if layout in layouts)


def detect_checkpoint(ckpt_dir: str, cfg: Mapping[str, Any], where: str,
                      generation: Optional[str] = None) -> Detection:
    """Gather every signal of ``ckpt_dir`` (whose parsed config.json is ``cfg``), decide once, log the decision."""
    signals, scan = gather_signals(ckpt_dir, cfg, where)
    layout, family, layout_by, family_by = decide(signals, where, generation)
    if generation is not None:
        disagree = [s.describe() for s in signals if generation not in s.families]
        if disagree:
            log.warning("--generation %s overrides: %s", generation, "; ".join(disagree))
    log.info("%s: %s layout (%s), %s (%s)", ckpt_dir, layout, layout_by, family, family_by)
    return Detection(layout, family, layout_by, family_by, tuple(signals), scan, generation is not None,
                     rope_meaning_from_remote_code(ckpt_dir) if layout == LAYOUT_THUDM else None)
