"""Position ids of every graph step, built from the spec in one place: prefill, chunked prefill and decode.

Where it stands: the decode loop (``runtime.generate``), the exporter's verification (``exporter.verify``), the
calibration feeds and accuracy figures and the tests ask :class:`PositionRule` for the ``position_ids`` of a
left-padded batch; nothing else computes them. Two kinds (``spec.position_kind``):

``sequential`` (ChatGLM2/3, GLM-4)   position_ids [batch, seq]: 0, 1, 2, ... counted from each row's first real
                                     token; pads get 0.
``2d_block`` (ChatGLM-6B, v1)        position_ids [batch, 2, seq], as THUDM's chatglm-6b builds them. A prompt holds
                                     a mask token ([MASK], else [gMASK]) and ``<sop>``; the "context" is everything
                                     before the first ``<sop>``. Row 0: a context token's own index, then the mask
                                     token's index for ``<sop>`` and every token after it. Row 1 (block position):
                                     0 in the context, then 1 for ``<sop>``, 2, 3, ... Pads get (0, 0).

The graph derives v1's prefix-LM mask from row 1 itself (a key of the current chunk with block position 0 is
context, seen by every query of the chunk; keys of the cache are all earlier, so causal covers them): no extra
input. The one consequence for the runtime: a chunked prefill must hold the whole context in its first chunk
(:meth:`BatchPositions.context_end`), since context tokens see context tokens after them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from runtime.errors import GenerationError
from runtime.spec import POSITIONS_2D_BLOCK, POSITIONS_SEQUENTIAL, ModelSpec


@dataclass(frozen=True)
class PositionRule:
    """How a model numbers its tokens: the kind, and for 2D the special ids that anchor the numbering."""

    kind: str = POSITIONS_SEQUENTIAL
    sop_id: int = -1  # <sop>: where the context ends
    mask_ids: Tuple[int, ...] = ()  # [MASK] then [gMASK]: the first present gives the position of what follows

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "PositionRule":
        if spec.position_kind != POSITIONS_2D_BLOCK:
            return cls()
        tokens = spec.special_tokens
        masks = tuple(tokens[n] for n in ("[MASK]", "[gMASK]") if n in tokens)
        if "<sop>" not in tokens or not masks:
            raise GenerationError("the manifest's spec has 2D positions but no <sop> / [gMASK] ids; re-export it")
        return cls(POSITIONS_2D_BLOCK, int(tokens["<sop>"]), masks)

    @property
    def two_d(self) -> bool:
        return self.kind == POSITIONS_2D_BLOCK

    def suffix_hint(self) -> str:
        return f"[gMASK] <sop> (ids {self.mask_ids[-1]} {self.sop_id})" if self.two_d else ""

    def prompt_suffix(self) -> List[int]:
        """Ids an id prompt must end with for this numbering: [gMASK] <sop> for 2D, nothing otherwise."""
        return [self.mask_ids[-1], self.sop_id] if self.two_d else []

    def anchors(self, ids: Sequence[int], where: str = "prompt") -> Tuple[int, int]:
        """(mask position, context length) of one unpadded row; (0, 0) for sequential positions.
        GenerationError when a 2D row lacks its mask token or <sop>."""
        if not self.two_d:
            return 0, 0
        ids = [int(t) for t in ids]
        if self.sop_id not in ids:
            raise GenerationError(f"{where} has no <sop> (id {self.sop_id}): a ChatGLM-6B prompt ends with "
                                  f"{self.suffix_hint()}; text prompts get them from the tokenizer")
        context = ids.index(self.sop_id)
        for mask in self.mask_ids:
            if mask in ids[:context]:
                return ids.index(mask), context
        raise GenerationError(f"{where} has no [MASK] or [gMASK] before its <sop>: a ChatGLM-6B prompt ends with "
                              f"{self.suffix_hint()}")

    def rows(self, prompts: Sequence[Sequence[int]]) -> "BatchPositions":
        """The numbering of a batch of unpadded prompts (checked here, before any model work)."""
        where = (lambda i: f"prompt {i}") if len(prompts) > 1 else (lambda i: "prompt")
        pairs = [self.anchors(p, where(i)) for i, p in enumerate(prompts)]
        mask_pos = np.array([m for m, _ in pairs], dtype=np.int64)
        context = np.array([c for _, c in pairs], dtype=np.int64)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        return BatchPositions(self.kind, mask_pos, context, lengths)


@dataclass
class BatchPositions:
    """Position ids of one left-padded batch, for any column: prompt, chunk or decode step."""

    kind: str
    mask_position: np.ndarray  # (B,) index of the mask token in each unpadded row (2D only)
    context_length: np.ndarray  # (B,) tokens before <sop> (2D only)
    prompt_length: np.ndarray  # (B,) real prompt tokens

    def at(self, index: np.ndarray) -> np.ndarray:
        """Position ids of the tokens at unpadded ``index`` (B, S) (negative: a pad):
        (B, S) sequential, (B, 2, S) for 2D."""
        index = np.asarray(index, dtype=np.int64)
        real = index >= 0
        if self.kind != POSITIONS_2D_BLOCK:
            return np.where(real, index, 0).astype(np.int64)
        ctx = self.context_length[:, None]  # (B, 1)
        in_context = index < ctx
        position = np.where(in_context, index, self.mask_position[:, None])  # (B, S)
        block = np.where(in_context, 0, index - ctx + 1)
        return np.stack([np.where(real, position, 0), np.where(real, block, 0)], axis=1).astype(np.int64)

    def prompt(self, n_max: int) -> np.ndarray:
        """Position ids of the left-padded prompts [B, n_max]: (B, n_max) or (B, 2, n_max)."""
        pads = (n_max - self.prompt_length)[:, None]  # (B, 1)
        return self.at(np.arange(n_max, dtype=np.int64)[None, :] - pads)

    def step(self, index: np.ndarray) -> np.ndarray:
        """Position ids of one decode step, the token at unpadded ``index`` (B,) per row: (B,) or (B, 2);
        the graph takes them as [..., None]."""
        return self.at(np.asarray(index, dtype=np.int64)[:, None])[..., 0]

    def context_end(self, n_max: int) -> int:
        """The first padded column a chunked prefill may start a new chunk at: after every row's context."""
        if self.kind != POSITIONS_2D_BLOCK:
            return 0
        return int(((n_max - self.prompt_length) + self.context_length).max())

    def select(self, keep: np.ndarray) -> "BatchPositions":
        """The rows ``keep`` (finished sequences leave the running batch)."""
        return BatchPositions(self.kind, self.mask_position[keep], self.context_length[keep],
                              self.prompt_length[keep])


def chunk_bounds(n: int, chunk: Optional[int], first_end: int = 0) -> List[Tuple[int, int]]:
    """Column ranges of a prefill over ``n`` columns, ``chunk`` at a time (None or 0: one forward); the first range
    reaches at least ``first_end`` (2D positions: the whole context)."""
    step = n if not chunk or chunk >= n else int(chunk)
    bounds = []
    start = 0
    while start < n:
        end = min(max(start + step, first_end if start == 0 else 0), n)
        bounds.append((start, end))
        start = end
    return bounds


def left_pad_positions(spec: ModelSpec, seqs: Sequence[Sequence[int]], pad_id: int
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask [B, n_max] and position_ids ([B, n_max] or [B, 2, n_max]) of left-padded rows,
    numbered by the spec's rule."""
    from runtime.steps import left_pad

    ids, mask, _ = left_pad(seqs, pad_id)
    return ids, mask, PositionRule.from_spec(spec).rows(seqs).prompt(ids.shape[1])
