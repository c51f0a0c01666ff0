"""Calibration and evaluation text -> token sequences, and the seeded held-out split.

Where it stands: the first step of the precision stage (``glm-export quantize`` and ``glm-export eval``). A text file
(one sample per line) or JSONL (one ``{"text": ...}`` or ``{"messages": [...]}`` object per line) is read into
samples; each sample becomes one token sequence exactly as the runtime would see it: plain text as a prompt (the
model's prefix ids, then the text), messages through the model's chat format (``runtime.chat.build_chat_ids``).
A seeded shuffle then holds part of them out for the accuracy report and samples the calibration set from the rest.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from runtime.errors import GenerationError, TokenizerError
from runtime.spec import ModelSpec
from runtime.user_input import MAX_LINE_CHARS

from calibration.errors import CalibrationDataError

MIN_TOKENS = 4  # a sequence shorter than this (prefix included) says nothing about the model; it is skipped
MIN_SAMPLES = 2  # one to calibrate on and one held out
FORMATS = ("auto", "text", "jsonl")


@dataclass(frozen=True)
class Sample:
    """One calibration sample: plain text or a chat; ``line`` is its 1-based line in the file, for messages."""

    text: Optional[str] = None
    messages: Optional[List[Dict[str, Any]]] = None
    line: int = 0


@dataclass
class DataSplit:
    """Token sequences (each a list of ids, at most seq_len long) for calibration and for the accuracy report."""

    calibration: List[List[int]]
    heldout: List[List[int]]
    skipped_short: int = 0  # samples under MIN_TOKENS tokens, left out

    def describe(self) -> Dict[str, Any]:
        return {
            "calibration_samples": len(self.calibration),
            "calibration_tokens": sum(len(s) for s in self.calibration),
            "heldout_samples": len(self.heldout),
            "heldout_tokens": sum(len(s) for s in self.heldout),
            "skipped_short": self.skipped_short,
        }


# ------------------------------------------------------------------------------------------------ reading


MAX_LINE_BYTES = 4 * MAX_LINE_CHARS  # one sample: 1 Mi characters of UTF-8 at most
MAX_FILE_BYTES = 512 * 1024**2  # a calibration or evaluation file


def read_text_file(path: str) -> str:
    """The file's text (UTF-8, an optional BOM removed); CalibrationDataError naming the problem otherwise."""
    if not os.path.exists(path):
        raise CalibrationDataError(f"{path}: calibration file not found")
    if os.path.isdir(path):
        raise CalibrationDataError(f"{path}: is a directory; give a text or JSONL file")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise CalibrationDataError(f"{path}: {size / 2**20:.0f} MiB, more than the {MAX_FILE_BYTES >> 20} MiB read; "
                                   "calibration and evaluation need a few hundred samples: give a smaller file")
    # read line by line with a bound, so one enormous line is an error rather than a 1 GB string for the tokenizer
    lines: List[str] = []
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                if len(raw) > MAX_LINE_BYTES:
                    raise CalibrationDataError(f"{path}: line {len(lines) + 1} is longer than {MAX_LINE_BYTES} bytes; "
                                               "give one sample per line")
                try:
                    lines.append(raw.decode("utf-8-sig" if not lines else "utf-8"))
                except UnicodeDecodeError as e:
                    raise CalibrationDataError(
                        f"{path}: not UTF-8 text (undecodable byte at offset {offset + e.start}, line "
                        f"{len(lines) + 1}); save it as UTF-8"
                    ) from None
                offset += len(raw)
    except OSError as e:
        raise CalibrationDataError(f"{path}: cannot read it ({e.strerror or e})") from None
    return "".join(lines)


def _looks_like_jsonl(first_line: str) -> bool:
    if not first_line.lstrip().startswith("{"):
        return False
    try:
        obj = json.loads(first_line)
    except ValueError:
        return False
    return isinstance(obj, dict) and ("text" in obj or "messages" in obj)


def _jsonl_sample(line: str, lineno: int, path: str) -> Sample:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise CalibrationDataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or ("text" in obj) == ("messages" in obj):
        raise CalibrationDataError(f'{where}: expected an object with exactly one of "text" or "messages"')
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise CalibrationDataError(f'{where}: "text" must be a string')
        return Sample(text=obj["text"], line=lineno)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise CalibrationDataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    return Sample(messages=messages, line=lineno)


def read_samples(path: str, fmt: str = "auto") -> List[Sample]:
    """Samples of a calibration file. ``fmt`` "auto": JSONL for a .jsonl/.json name or when the first line is a
    JSON object with "text" or "messages", else plain text with one sample per non-blank line."""
    if fmt not in FORMATS:
        raise CalibrationDataError(f"calibration format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    text = read_text_file(path)
    lines = text.splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise CalibrationDataError(f"{path}: no samples (the file is empty or has only blank lines)")
    if fmt == "auto":
        is_json_name = path.lower().endswith((".jsonl", ".json"))
        fmt = "jsonl" if is_json_name or _looks_like_jsonl(numbered[0][1]) else "text"
    if fmt == "jsonl":
        return [_jsonl_sample(line, n, path) for n, line in numbered]
    return [Sample(text=line, line=n) for n, line in numbered]


# ------------------------------------------------------------------------------------------------ tokenizing


def sample_ids(sample: Sample, tokenizer, spec: ModelSpec) -> List[int]:
    """The ids the runtime would feed for this sample: prefix + text, or the chat format of the messages
    (with the assistant's turn opened when the chat ends on a user message)."""
    if sample.text is not None:
        # the text as model output: after the prefix ids, as ChatGLM2+ prompts run and as ChatGLM-6B generates
        # (after [gMASK] <sop>); equal to encode_prompt for every format that puts the prefix first
        return list(tokenizer.prefix_ids()) + list(tokenizer.encode(sample.text))
    from runtime.chat import build_chat_ids

    last_role = sample.messages[-1].get("role") if sample.messages else None
    return list(build_chat_ids(tokenizer, spec, sample.messages, add_generation_prompt=last_role != "assistant"))


def tokenize_samples(
    samples: Sequence[Sample], tokenizer, spec: ModelSpec, seq_len: int, path: str = "calibration data"
):
    """-> (sequences of at most ``seq_len`` ids, count of samples skipped for being under MIN_TOKENS)."""
    sequences: List[List[int]] = []
    short = 0
    for s in samples:
        try:
            ids = sample_ids(s, tokenizer, spec)
        except (GenerationError, TokenizerError) as e:
            raise CalibrationDataError(f"{path}:{s.line}: {e}") from None
        if len(ids) < MIN_TOKENS:
            short += 1
            continue
        sequences.append(ids[:seq_len])
    return sequences, short


# ------------------------------------------------------------------------------------------------ splitting


def check_counts(calib_samples: int, seq_len: int, eval_samples: int = 0) -> None:
    """Option values, checked before any work."""
    if isinstance(calib_samples, bool) or not isinstance(calib_samples, int) or calib_samples < 1:
        raise CalibrationDataError(f"--calib-samples must be at least 1, got {calib_samples!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_TOKENS:
        raise CalibrationDataError(f"--calib-seq-len must be at least {MIN_TOKENS}, got {seq_len!r}")
    if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples < 0:
        raise CalibrationDataError(f"--eval-samples must be 0 or more, got {eval_samples!r}")


def split_sequences(
    sequences: List[List[int]], calib_samples: int, eval_samples: int, seed: int, path: str, skipped: int = 0
) -> DataSplit:
    """Seeded split: a quarter of the sequences (at least 1, at most ``eval_samples``; none when it is 0) are held
    out for evaluation, and up to ``calib_samples`` of the rest, chosen at random, calibrate."""
    need = MIN_SAMPLES if eval_samples else 1
    if len(sequences) < need:
        raise CalibrationDataError(
            f"{path}: too short: {len(sequences)} usable sample(s) of at least {MIN_TOKENS} tokens "
            f"({skipped} shorter ones skipped); need at least {need}"
            + (" (one to calibrate, one held out for the accuracy report)" if eval_samples else "")
        )
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    n_eval = min(eval_samples, max(1, len(order) // 4)) if eval_samples else 0
    heldout = [sequences[i] for i in order[:n_eval]]
    calibration = [sequences[i] for i in order[n_eval : n_eval + calib_samples]]
    return DataSplit(calibration=calibration, heldout=heldout, skipped_short=skipped)


def load_split(
    path: str,
    tokenizer,
    spec: ModelSpec,
    calib_samples: int,
    seq_len: int,
    eval_samples: int,
    seed: int,
    fmt: str = "auto",
) -> DataSplit:
    """Read, tokenize and split a calibration file (see ``split_sequences``)."""
    check_counts(calib_samples, seq_len, eval_samples)
    sequences, short = tokenize_samples(read_samples(path, fmt), tokenizer, spec, seq_len, path)
    return split_sequences(sequences, calib_samples, eval_samples, seed, path, short)


def load_eval_sequences(path: str, tokenizer, spec: ModelSpec, seq_len: int, max_samples: int = 0,
                        seed: int = 0, fmt: str = "auto") -> List[List[int]]:
    """Every usable sample of an evaluation file (a seeded choice of ``max_samples`` of them when > 0)."""
    check_counts(1, seq_len, max_samples)
    sequences, short = tokenize_samples(read_samples(path, fmt), tokenizer, spec, seq_len, path)
    if not sequences:
        raise CalibrationDataError(
            f"{path}: too short: no sample has at least {MIN_TOKENS} tokens ({short} shorter ones skipped)"
        )
    if max_samples and len(sequences) > max_samples:
        order = list(range(len(sequences)))
        random.Random(seed).shuffle(order)
        sequences = [sequences[i] for i in sorted(order[:max_samples])]
    return sequences
