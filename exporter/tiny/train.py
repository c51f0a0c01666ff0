"""A tiny ChatGLM trained from scratch, so precision figures mean something (random weights give flat logits).

Where it stands: test and example support, next to ``exporter.tiny.checkpoint``. ``write_trained_checkpoint`` writes a normal
THUDM-layout checkpoint (the published ChatGLM3 config shrunk, the tiny sentencepiece tokenizer, weights trained
here) that ``glm-export onnx`` exports like any other. The training text is generated from a small grammar with
real structure in Chinese and English (facts, translations, arithmetic, counting, chats), so a held-out set from
the same grammar measures next-token accuracy well above chance.

Training is plain PyTorch on our own export model (``exporter.model.GlmForExport``), deterministic for a given
``TrainSettings`` (seeded data and init, one thread). ``trained_checkpoint`` caches the result under a directory
keyed by a hash of the settings, so tests train once per machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from exporter.tiny.checkpoint import TinyShape

TRAINER_VERSION = 2  # bump when the corpus or the training loop changes: it is part of the cache key
REPORT_FILE = "train_report.json"

# ------------------------------------------------------------------------------------------------ the corpus

_COUNTRIES = [  # (English, capital, 中文, 首都)
    ("France", "Paris", "法国", "巴黎"), ("England", "London", "英国", "伦敦"), ("Japan", "Tokyo", "日本", "东京"),
    ("China", "Beijing", "中国", "北京"), ("Germany", "Berlin", "德国", "柏林"), ("Italy", "Rome", "意大利", "罗马"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("Russia", "Moscow", "俄罗斯", "莫斯科"),
]
_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "小明", "小红"]
_COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("black", "黑色"), ("white", "白色")]
_THINGS = [("apple", "苹果"), ("book", "书"), ("car", "汽车"), ("cat", "猫"), ("dog", "狗"), ("house", "房子"),
           ("computer", "电脑"), ("flower", "花")]
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_WEEKDAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
_ZH_DIGITS = "零一二三四五六七八九十"
_VERBS = [("reads", "读"), ("writes", "写"), ("checks", "检查"), ("likes", "喜欢"), ("needs", "需要")]


def _fact(rng: random.Random) -> str:
    en, cap, zh, zcap = rng.choice(_COUNTRIES)
    return rng.choice([f"The capital of {en} is {cap}.", f"{zh}的首都是{zcap}。",
                       f"{cap} is the capital of {en}, {zh}的首都是{zcap}。"])


def _translation(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    (color, zcolor), (thing, zthing) = rng.choice(_COLORS), rng.choice(_THINGS)
    return f"{name} has a {color} {thing}. 翻译：{name}有一个{zcolor}的{zthing}。"


def _sentence(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    (verb, zverb), (thing, zthing) = rng.choice(_VERBS), rng.choice(_THINGS)
    if rng.random() < 0.5:
        return f"{name} {verb} the {thing} every {rng.choice(_WEEKDAYS)}."
    return f"{name}每个{rng.choice(_WEEKDAYS_ZH)}都{zverb}{zthing}。"


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(0, 10), rng.randrange(0, 10)
    if rng.random() < 0.5:
        return f"{a} + {b} = {a + b}"
    return f"{_ZH_DIGITS[a]}加{_ZH_DIGITS[b]}等于{a + b}。"


def _counting(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        start = rng.randrange(0, 30)
        return "Count: " + ", ".join(str(n) for n in range(start, start + rng.randrange(4, 9)))
    if kind == 1:
        start = rng.randrange(7)
        return ", ".join(_WEEKDAYS[(start + i) % 7] for i in range(rng.randrange(3, 7)))
    start = rng.randrange(0, 6)
    return "数数：" + "，".join(_ZH_DIGITS[i] for i in range(start, start + rng.randrange(3, 6)))


def _turn(rng: random.Random) -> List[Dict[str, str]]:
    en, cap, zh, zcap = rng.choice(_COUNTRIES)
    a, b = rng.randrange(0, 10), rng.randrange(0, 10)
    q, ans = rng.choice([
        (f"What is the capital of {en}?", f"The capital of {en} is {cap}."),
        (f"{zh}的首都是哪里？", f"{zh}的首都是{zcap}。"),
        (f"What is {a} + {b}?", f"{a} + {b} = {a + b}"),
        (f"{a}加{b}等于几？", f"{a}加{b}等于{a + b}。"),
    ])
    return [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]


_CLAUSES = [_fact, _translation, _sentence, _arithmetic, _counting]


def _record(rng: random.Random) -> Dict[str, Any]:
    """One sample: a chat of one or two turns (1 in 6), else one to three clauses of any kind. Combining clauses
    makes the space of records large, so held-out records are new combinations of every kind, not just of the one
    kind with the most combinations."""
    if rng.randrange(6) == 0:
        return {"messages": [m for _ in range(rng.randrange(1, 3)) for m in _turn(rng)]}
    return {"text": " ".join(rng.choice(_CLAUSES)(rng) for _ in range(rng.randrange(1, 4)))}


def corpus_records(n: int, seed: int) -> List[Dict[str, Any]]:
    """``n`` records ({"text": ...} or {"messages": [...]}, as in a calibration JSONL file), seeded."""
    rng = random.Random(seed)
    return [_record(rng) for _ in range(n)]


def heldout_records(n: int, seed: int = 12345, exclude: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Records from the same grammar under another seed, leaving out exact copies of ``exclude``."""
    seen = {json.dumps(r, sort_keys=True, ensure_ascii=False) for r in exclude or []}
    out: List[Dict[str, Any]] = []
    for rng_seed in range(seed, seed + 20):
        if len(out) == n:
            break
        for r in corpus_records(4 * n, rng_seed):
            key = json.dumps(r, sort_keys=True, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                out.append(r)
                if len(out) == n:
                    break
    if len(out) < n:
        raise ValueError(f"the grammar has fewer than {n} records outside the excluded ones")
    return out


# ------------------------------------------------------------------------------------------------ settings


# the sizes trainer version 2 hashed (the key names existing cache entries): hashed always, the other TinyShape
# fields only where they differ from the tiny default, so the same settings keep the same key and trained weights
_KEYED_SIZES = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained weights; its hash names the cache entry."""

    generation: str = "chatglm3"
    shape: TinyShape = TinyShape()  # the model's sizes (exporter.tiny.checkpoint's tiny default)
    train_records: int = 6000
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    max_len: int = 64
    seed: int = 0

    def key_fields(self) -> Dict[str, Any]:
        """The hashed values: every setting, with the shape's sizes flattened in (see ``_KEYED_SIZES``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "shape"}
        default = TinyShape()
        for name, value in dataclasses.asdict(self.shape).items():
            if name in _KEYED_SIZES or value != getattr(default, name):
                fields[name] = value
        return fields

    def key(self) -> str:
        payload = json.dumps(dict(self.key_fields(), trainer_version=TRAINER_VERSION), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ training


def _init_parameters(model, seed: int) -> None:
    """GPT-style init: linear and embedding weights N(0, 0.02), biases 0, norm weights 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _batch_tensors(seqs: List[List[int]], pad_id: int, rule=None):
    """Right-padded ids (B, T), a loss mask (B, T-1) over real next tokens, positions (B, T) (ChatGLM-6B: (B, 2, T),
    numbered by ``rule``, a runtime.positions.PositionRule; right pads then sit after the context, unseen)."""
    import numpy as np
    import torch

    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((len(seqs), t - 1), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        loss_mask[i, : len(s) - 1] = True
    positions = torch.arange(t).expand(len(seqs), t)
    if rule is not None and rule.two_d:
        index = np.broadcast_to(np.arange(t, dtype=np.int64), (len(seqs), t))
        positions = torch.from_numpy(np.ascontiguousarray(rule.rows(seqs).at(index)))
    return ids, loss_mask, positions


def _forward_logits(model, ids, positions):
    """Full-sequence logits (B, T, V) from the export model with an empty cache (right padding needs no mask:
    real tokens never attend to later pads)."""
    import torch

    from exporter.model import torch_empty_past

    mask = torch.ones_like(ids)
    return model(ids, mask, positions, *torch_empty_past(model.spec, ids.shape[0]))[0]


def next_token_accuracy(model, sequences: List[List[int]], pad_id: int, score_from: int = 0,
                        rule=None) -> Dict[str, float]:
    """Greedy next-token accuracy and mean loss over ``sequences``; targets before index ``score_from`` (the
    prompt prefix) are not scored."""
    import torch

    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(sequences), 64):
            chunk = sequences[i : i + 64]
            ids, loss_mask, pos = _batch_tensors(chunk, pad_id, rule)
            logits = _forward_logits(model, ids, pos)[:, :-1]  # (B, T-1, V)
            loss_mask[:, : max(score_from - 1, 0)] = False
            targets = ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            correct += int(((logits.argmax(-1) == targets) & loss_mask).sum())
            total += int(loss_mask.sum())
            loss_sum += float((nll * loss_mask).sum())
    return {"accuracy": correct / total, "loss": loss_sum / total, "tokens": total}


def train(ckpt_dir: str, settings: TrainSettings, progress=None) -> Dict[str, Any]:
    """Train on the generated corpus and return the report; ``ckpt_dir`` already holds config and tokenizer.

    Steps: encode the corpus with the checkpoint's tokenizer; fit a freshly initialised GlmForExport (one thread,
    seeded: the same settings give the same weights byte for byte); write its weights in the THUDM layout and
    ``train_report.json``."""
    import torch

    from exporter.config import spec_from_checkpoint
    from runtime.positions import PositionRule
    from runtime.tokenizer import load_tokenizer

    spec, info = spec_from_checkpoint(ckpt_dir)
    tok = load_tokenizer(ckpt_dir, spec)
    rule = PositionRule.from_spec(spec)
    train_seqs, heldout_seqs = _encoded_corpus(tok, spec, settings, rule)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and polite on a shared machine
    try:
        model, losses, seconds = _fit(spec, train_seqs, settings, progress, rule)
        score_from = len(tok.prefix_ids())
        heldout = next_token_accuracy(model, heldout_seqs, spec.pad_token_id, score_from, rule)
    finally:
        torch.set_num_threads(threads)
    _save_trained_weights(ckpt_dir, model, spec, info.layout)
    report = _report(settings, spec, losses, seconds, heldout, heldout_seqs, score_from)
    with open(os.path.join(ckpt_dir, REPORT_FILE), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report


def _encoded_corpus(tok, spec, settings: TrainSettings, rule=None):
    """(training sequences, 256 held-out sequences): corpus records as the runtime encodes them (chat records in
    the chat format), each cut to ``settings.max_len`` ids. ChatGLM-6B (2D positions) trains on text records only:
    its chat prompt is bidirectional context, so a next-token loss over it would leak."""
    from calibration.data import Sample, sample_ids

    def encode(records):
        if rule is not None and rule.two_d:
            records = [r for r in records if r.get("text") is not None]
        samples = [Sample(text=r.get("text"), messages=r.get("messages")) for r in records]
        return [sample_ids(s, tok, spec)[: settings.max_len] for s in samples]

    train_records = corpus_records(settings.train_records, settings.seed)
    return encode(train_records), encode(heldout_records(256, exclude=train_records))


def _fit(spec, train_seqs: List[List[int]], settings: TrainSettings, progress, rule=None):
    """(the trained model in eval mode, per-step losses, seconds): AdamW with weight decay on the matrices, linear
    warm-up then cosine decay (floored at 2% of ``settings.lr``), gradients clipped at 1."""
    import torch

    from exporter.model import export_model_class

    torch.manual_seed(settings.seed)
    model = export_model_class(spec)[0](spec)  # on the CPU, its inv_freq buffer computed (no meta device here)
    _init_parameters(model, settings.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight_t") or n == "embed.weight"]
    other = [p for n, p in model.named_parameters() if not (n.endswith("weight_t") or n == "embed.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    rng = random.Random(settings.seed)
    start = time.perf_counter()
    losses = []
    steps = range(settings.steps)
    if progress is not None:
        steps = progress.iterate(steps, total=settings.steps, desc="training the tiny ChatGLM")
    for step in steps:
        lr_scale = min(1.0, (step + 1) / settings.warmup)
        lr_scale *= 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in opt.param_groups:
            group["lr"] = settings.lr * max(lr_scale, 0.02)
        batch = [train_seqs[rng.randrange(len(train_seqs))] for _ in range(settings.batch)]
        ids, loss_mask, pos = _batch_tensors(batch, spec.pad_token_id, rule)
        logits = _forward_logits(model, ids, pos)[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * loss_mask).sum() / loss_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    model.eval()
    return model, losses, seconds


def _save_trained_weights(ckpt_dir: str, model, spec, layout: str = "thudm") -> None:
    """The model's parameters as ``model.safetensors`` under THUDM's names (``layout``: "thudm" or "thudm-v1")."""
    from exporter.model import canonical_state
    from exporter.tiny.checkpoint import save_weights, to_layout
    from exporter.weights import canonical_shapes

    state = canonical_state(model)
    assert set(state) == set(canonical_shapes(spec)), "trained parameters do not match the checkpoint layout"
    save_weights(ckpt_dir, to_layout(spec, state, layout), "safetensors")


def _report(settings: TrainSettings, spec, losses: List[float], seconds: float, heldout: Dict[str, float],
            heldout_seqs: List[List[int]], score_from: int) -> Dict[str, Any]:
    """``train_report.json``: the settings and their key, the losses, held-out accuracy against chance and against
    always predicting the most frequent token."""
    targets = [t for s in heldout_seqs for t in s[max(score_from, 1):]]
    majority = max(targets.count(t) for t in set(targets)) / len(targets)
    return {
        "settings": settings.key_fields(),
        "key": settings.key(),
        "trainer_version": TRAINER_VERSION,
        "train_seconds": round(seconds, 1),
        "final_train_loss": round(sum(losses[-20:]) / min(20, len(losses)), 4),
        "heldout_next_token_accuracy": round(heldout["accuracy"], 4),
        "heldout_loss": round(heldout["loss"], 4),
        "heldout_tokens": heldout["tokens"],
        "chance_accuracy": round(1.0 / spec.vocab_size, 5),
        "majority_token_accuracy": round(majority, 4),
        "vocab_size": spec.vocab_size,
        "params": spec.num_params,
    }


def write_trained_checkpoint(out_dir: str, settings: TrainSettings = TrainSettings(), progress=None) -> Dict[str, Any]:
    """A THUDM-layout checkpoint at ``out_dir`` (config, tokenizer, trained model.safetensors, train_report.json)."""
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    write_tiny_checkpoint(out_dir, generation=settings.generation, layout="thudm", seed=settings.seed,
                          **dataclasses.asdict(settings.shape))
    if settings.generation == "chatglm1":
        _without_image_tokens(out_dir)
    return train(out_dir, settings, progress)


def _without_image_tokens(ckpt_dir: str) -> None:
    """ChatGLM-6B as THUDM's later files describe it: num_image_tokens 0, ids without the 20000 offset (vocabulary
    130528 at full size). Here it keeps the trained model's vocabulary (and its training time) small."""
    from runtime.ice_text import IMAGE_TOKENS

    cfg_path, tok_path = os.path.join(ckpt_dir, "config.json"), os.path.join(ckpt_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id"):
        cfg[key] -= IMAGE_TOKENS
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(tok_path, encoding="utf-8") as f:
        tok = json.load(f)
    tok["num_image_tokens"] = 0
    with open(tok_path, "w", encoding="utf-8") as f:
        json.dump(tok, f, indent=2, ensure_ascii=False)


def trained_checkpoint(cache_root: str, settings: TrainSettings = TrainSettings(), progress=None) -> str:
    """The cached trained checkpoint for ``settings`` under ``cache_root`` (trained and cached on first use)."""
    from exporter.staging import staged_directory

    path = os.path.join(os.path.abspath(cache_root), f"trained-{settings.generation}-{settings.key()}")
    if os.path.isfile(os.path.join(path, REPORT_FILE)):
        return path
    with staged_directory(path, overwrite=True, checkpoint_stamp=True) as tmp:
        write_trained_checkpoint(tmp, settings, progress)
    return path

