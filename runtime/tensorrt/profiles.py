"""TensorRT optimization profiles as data, and the choice of profile for one generation step.

A TensorRT engine built from a bundle carries one or more optimization profiles: for every symbolic dimension of the
graph (``batch``, ``seq``, ``past``, ``past_plus_seq``) a min/opt/max range, and for every graph input the min/opt/max
shapes that follow from them. ``runtime.tensorrt.ep_options`` makes them (prefill and decode), ``exporter.tensorrt.build`` builds
them into the engine and records them in ``engine.json``; the TensorRT runtime backend reads them back from there
and calls :func:`select_profile` before every step. :func:`shape_spec` writes a profile's shapes as trtexec and
onnxruntime's TensorRT provider take them. Pure Python: no TensorRT, no numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from runtime.errors import BundleError, GenerationError
from runtime.graph_contract import BATCH, PAST, SEQ, TOTAL
from runtime.tensorrt.engine_record import BUILD_COMMAND

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

    def shapes_at(self, k: int) -> List[Tuple[str, Shape]]:
        """Every input's min (``k`` 0), opt (1) or max (2) shape, in graph-input order: what :func:`shape_spec`
        formats."""
        return [(name, ranges[k]) for name, ranges in self.shapes.items()]

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


def shape_spec(shapes: Sequence[Tuple[str, Shape]], quote_colons: bool = False) -> str:
    """``[("input_ids", (1, 8)), ...]`` -> ``input_ids:1x8,...``: the shape lists of trtexec's ``--minShapes`` /
    ``--optShapes`` / ``--maxShapes`` (``quote_colons``: a name holding ':' is wrapped in single quotes) and of
    onnxruntime's TensorRT provider options ``trt_profile_*_shapes`` (no quoting, so no ':' in names).

    BundleError, naming the input, for a name the format cannot hold: ',' always, and a quote (trtexec) or ':'
    (onnxruntime).
    """
    parts = []
    for name, shape in shapes:
        if quote_colons and any(c in name for c in ",'"):
            raise BundleError(f"trtexec cannot name the input {name!r} (it holds ',' or a quote)")
        if not quote_colons and any(c in name for c in ":,"):
            raise BundleError(
                f"input {name!r} holds ':' or ',', which onnxruntime's trt_profile_*_shapes cannot express"
            )
        label = f"'{name}'" if quote_colons and ":" in name else name
        parts.append(label + ":" + "x".join(str(int(d)) for d in shape))
    return ",".join(parts)


def step_dims(batch: int, seq: int, past: int) -> Dict[str, int]:
    """The value of every symbolic dim for a step of ``seq`` new tokens after ``past`` cached ones."""
    return {BATCH: batch, SEQ: seq, PAST: past, TOTAL: past + seq}


def rebuild_engine(option: str = "") -> str:
    """The remedy for a step outside a native engine's profiles: rebuild with a larger size option."""
    return f"rebuild the engine with '{BUILD_COMMAND} --overwrite{' ' + option if option else ''}'"


def select_profile(
    profiles: Sequence[Profile],
    batch: int,
    seq: int,
    past: int,
    owner: str = "the engine's",
    remedy: Callable[[str], str] = rebuild_engine,
) -> int:
    """Index of the profile to run a step of ``seq`` new tokens after ``past`` cached ones, for ``batch`` rows.

    Among the profiles that admit the step, the one with the narrowest ``seq`` range wins (so a one-token step after
    a non-empty cache runs on the decode profile even where the prefill profile would admit it too); ties go to the
    lower index. A step that no profile admits is refused with a message that says which limit it breaks and how the
    engine was built: ``owner`` names whose limits they are ("the engine's"), ``remedy(option)`` says how to get
    larger ones (by default: rebuild the engine with that size option, e.g. ``--max-batch 4``).
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
    raise GenerationError(_refusal(profiles, batch, seq, past, owner, remedy))


def widest(profiles: Sequence[Profile], dim: str) -> int:
    """The largest value of ``dim`` any of the profiles admits (0 where none has the dim)."""
    return max((p.dims[dim][2] for p in profiles if dim in p.dims), default=0)


def prefill_chunk_refusal(profiles: Sequence[Profile], chunk: Optional[int]) -> Optional[str]:
    """None when a prompt prefilled ``chunk`` tokens per forward runs on these profiles for every prompt length they
    admit in one forward (up to the widest ``seq``), else why not. None or 0 means the whole prompt in one forward,
    which always fits. A chunk fits when each step after the first (``chunk`` new tokens after a multiple of
    ``chunk`` cached ones) lies in some profile: a native engine's prefill profile takes at most max-seq-len minus
    max-input-len cached tokens."""
    max_in = widest(profiles, SEQ)
    if not chunk or chunk >= max_in:
        return None
    past = int(chunk)
    while past < max_in:
        seq = min(int(chunk), max_in - past)
        if not any(p.admits(1, seq, past) for p in profiles):
            return (
                f"a prompt of {max_in} tokens prefilled {chunk} tokens at a time needs a {seq}-token step after "
                f"{past} cached tokens, which no optimization profile admits"
            )
        past += int(chunk)
    return None


def _refusal(
    profiles: Sequence[Profile], batch: int, seq: int, past: int, owner: str, remedy: Callable[[str], str]
) -> str:
    """Why no profile admits the step, phrased in the size options the user can change."""
    max_batch, max_seq, max_total = widest(profiles, BATCH), widest(profiles, SEQ), widest(profiles, TOTAL)
    if batch > max_batch:
        return f"batch of {batch} rows is larger than {owner} max batch {max_batch}; {remedy(f'--max-batch {batch}')}"
    if seq > max_seq:
        return (
            f"a prompt of {seq} tokens is longer than {owner} max input length {max_seq}; shorten the prompt "
            f"or {remedy(f'--max-input-len {seq}')}"
        )
    if past + seq > max_total:
        return (
            f"{past} cached + {seq} new tokens = {past + seq} exceeds {owner} max sequence length {max_total}; "
            f"start a new conversation or {remedy(f'--max-seq-len {past + seq}')}"
        )
    multi = [p for p in profiles if SEQ in p.dims and PAST in p.dims and p.dims[SEQ][2] >= seq]
    if seq > 1 and multi and past > max(p.dims[PAST][2] for p in multi):
        limit = max(p.dims[PAST][2] for p in multi)
        return (
            f"a {seq}-token step after {past} cached tokens: {owner} profiles take several tokens at once only "
            f"after at most {limit} cached tokens (max-seq-len minus max-input-len); prefill the prompt in one step "
            f"instead of chunks, feed one token at a time, or {remedy(f'--max-input-len {max_total - past}')}"
        )
    ranges = "; ".join(
        p.name + ": " + ", ".join(f"{d} {lo}..{hi}" for d, (lo, _, hi) in p.dims.items()) for p in profiles
    )
    return (
        f"no optimization profile admits a step of {seq} new tokens after {past} cached tokens (batch {batch}); "
        f"{owner} profiles are {ranges}"
    )
