"""TensorRT optimization profiles as data, and the choice of profile for one generation step.

A TensorRT engine built from a bundle carries one or more optimization profiles: for every symbolic dimension of the
graph (``batch``, ``seq``, ``past``, ``past_plus_seq``) a min/opt/max range, and for every graph input the min/opt/max
shapes that follow from them. ``exporter.trt_profiles`` makes them (prefill and decode), ``exporter.trt_engine``
builds them into the engine and records them in ``engine.json``; the TensorRT runtime backend reads them back from
there and calls :func:`select_profile` before every step. Pure Python: no TensorRT, no numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from .errors import BundleError, GenerationError
from .graph_contract import BATCH, PAST, SEQ, TOTAL

Range = Tuple[int, int, int]  # (min, opt, max)
Shape = Tuple[int, ...]
ShapeRange = Tuple[Shape, Shape, Shape]  # (min shape, opt shape, max shape)

STEP_DIMS = (BATCH, SEQ, PAST, TOTAL)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a range per symbolic dim and the shapes of every graph input."""

    name: str  # "prefill" or "decode"
    dims: Dict[str, Range]  # "batch" -> (1, 1, 4), "seq" -> ..., "past" -> ..., "past_plus_seq" -> ...
    shapes: Dict[str, ShapeRange]  # input name -> (min, opt, max) shapes, in graph-input order

    def __post_init__(self) -> None:
        for dim, (lo, opt, hi) in self.dims.items():
            if not 0 <= lo <= opt <= hi:
                raise ValueError(f"profile {self.name!r}: {dim} range {lo}/{opt}/{hi} is not 0 <= min <= opt <= max")

    def admits(self, batch: int, seq: int, past: int) -> bool:
        """Whether a step with these sizes lies inside every range of this profile."""
        values = step_dims(batch, seq, past)
        return all(lo <= values[d] <= hi for d, (lo, _, hi) in self.dims.items() if d in values)

    def max_of(self, dim: str) -> int:
        return self.dims[dim][2]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "dims": {d: list(r) for d, r in self.dims.items()},
            "shapes": {n: [list(s) for s in r] for n, r in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Profile":
        try:
            dims = {str(k): _range(v) for k, v in d["dims"].items()}
            shapes = {str(k): _shape_range(v) for k, v in d["shapes"].items()}
            return cls(name=str(d["name"]), dims=dims, shapes=shapes)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"malformed optimization profile record ({type(e).__name__}: {e})") from None


def _range(v: Sequence[int]) -> Range:
    lo, opt, hi = (int(x) for x in v)
    return (lo, opt, hi)


def _shape_range(v: Sequence[Sequence[int]]) -> ShapeRange:
    lo, opt, hi = (tuple(int(x) for x in s) for s in v)
    return (lo, opt, hi)


def step_dims(batch: int, seq: int, past: int) -> Dict[str, int]:
    """The value of every symbolic dim for a step of ``seq`` new tokens after ``past`` cached ones."""
    return {BATCH: batch, SEQ: seq, PAST: past, TOTAL: past + seq}


def select_profile(profiles: Sequence[Profile], batch: int, seq: int, past: int) -> int:
    """Index of the profile to run a step of ``seq`` new tokens after ``past`` cached ones, for ``batch`` rows.

    Among the profiles that admit the step, the one with the narrowest ``seq`` range wins (so a one-token step after
    a non-empty cache runs on the decode profile even where the prefill profile would admit it too); ties go to the
    lower index. A step that no profile admits is refused with a message that says which limit it breaks and how the
    engine was built.
    """
    if batch < 1 or seq < 1 or past < 0:
        raise GenerationError(f"invalid step: batch {batch}, {seq} new tokens, {past} cached tokens")
    if not profiles:
        raise GenerationError("the engine records no optimization profiles; rebuild it with glm-export")
    candidates: List[Tuple[int, int]] = []
    for i, p in enumerate(profiles):
        if p.admits(batch, seq, past):
            lo, _, hi = p.dims.get(SEQ, (seq, seq, seq))
            candidates.append((hi - lo, i))
    if candidates:
        return min(candidates)[1]
    raise GenerationError(_refusal(profiles, batch, seq, past))


def _refusal(profiles: Sequence[Profile], batch: int, seq: int, past: int) -> str:
    """Why no profile admits the step, phrased in the build options the user can change."""

    def widest(dim: str) -> int:
        return max((p.dims[dim][2] for p in profiles if dim in p.dims), default=0)

    max_batch, max_seq, max_total = widest(BATCH), widest(SEQ), widest(TOTAL)
    rebuild = "rebuild the engine with 'glm-export tensorrt'"
    if batch > max_batch:
        return f"batch of {batch} rows is larger than the engine's max batch {max_batch}; {rebuild} --max-batch {batch}"
    if seq > max_seq:
        return (
            f"a prompt of {seq} tokens is longer than the engine's max input length {max_seq}; shorten the prompt "
            f"or {rebuild} --max-input-len {seq}"
        )
    if past + seq > max_total:
        return (
            f"{past} cached + {seq} new tokens = {past + seq} exceeds the engine's max sequence length {max_total}; "
            f"start a new conversation or {rebuild} --max-seq-len {past + seq}"
        )
    multi = [p for p in profiles if SEQ in p.dims and PAST in p.dims and p.dims[SEQ][2] >= seq]
    if seq > 1 and multi and past > max(p.dims[PAST][2] for p in multi):
        limit = max(p.dims[PAST][2] for p in multi)
        return (
            f"a {seq}-token step after {past} cached tokens: the engine takes several tokens at once only after at "
            f"most {limit} cached tokens (max-seq-len minus max-input-len); prefill the prompt in one step instead "
            f"of chunks, feed one token at a time, or {rebuild} with a smaller --max-input-len"
        )
    ranges = "; ".join(
        p.name + ": " + ", ".join(f"{d} {lo}..{hi}" for d, (lo, _, hi) in p.dims.items()) for p in profiles
    )
    return (
        f"no optimization profile admits a step of {seq} new tokens after {past} cached tokens (batch {batch}); "
        f"the engine's profiles are {ranges}"
    )
