"""TensorRT optimization profiles: the sizes a generation needs, the profiles made from them, and the choice of
profile for one generation step. The one home of profiles for both TensorRT routes.

A TensorRT engine built from a bundle carries one or more optimization profiles: for every symbolic dimension of the
graph (``batch``, ``seq``, ``past``, ``past_plus_seq``) a min/opt/max range, and for every graph input the min/opt/max
shapes that follow from them. A :class:`ProfileRequest` holds the sizes the user asks for;
:func:`profiles_for_generation` makes the native engines' two profiles (prefill and decode), which
``exporter.tensorrt.build`` builds into the engine and records in ``engine.json`` (``trtexec`` gets them through
``exporter.tensorrt.trtexec``); the TensorRT runtime backend reads them back from there and calls
:func:`select_profile` before every step. onnxruntime's TensorRT execution provider gets :func:`envelope_profile`,
one profile admitting both (``runtime.tensorrt.ep_options``). :func:`shape_spec` writes a profile's shapes as trtexec
and the provider take them.

With B = max batch, L = max input (prompt) length and S = max sequence length (prompt + generated)::

    prefill  batch 1..B, seq 1..L, past 0..S-L, past_plus_seq 1..S    (prompt, from an empty or short cache)
    decode   batch 1..B, seq 1,    past 1..S-1, past_plus_seq 2..S    (one token at a time)
    envelope batch 1..B, seq 1..L, past 0..S-1, past_plus_seq 1..S    (the execution provider's single profile)

Every graph input gets min/opt/max shapes from its symbolic dims, so each ``past_key_values.{i}.key|value`` is covered
along with ``input_ids``, ``attention_mask`` and ``position_ids``. Pure Python (3.8): no TensorRT, no numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from runtime.errors import BundleError, GenerationError, GlmExportError
from runtime.graph_contract import BATCH, PAST, SEQ, TOTAL, TensorSpec
from runtime.manifest import Manifest
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


# ------------------------------------------------------------------------------------------------ requests -> profiles


class EngineOptionError(GlmExportError):
    """A TensorRT engine option (--max-batch, --max-input-len, --max-seq-len, --opt-seq, --fp16, ...) is invalid."""


@dataclass(frozen=True)
class ProfileRequest:
    """The sizes an engine must serve, as the user gives them on the command line.

    ``opt_batch`` and ``opt_seq`` are the sizes TensorRT tunes kernels for: the usual batch and the usual prompt
    length. ``opt_seq`` defaults to half of ``max_input_len``. Decode is tuned for ``opt_seq`` cached tokens.
    """

    max_batch: int
    max_input_len: int
    max_seq_len: int
    opt_batch: int = 1
    opt_seq: Optional[int] = None

    def __post_init__(self) -> None:
        for option, value in (
            ("--max-batch", self.max_batch),
            ("--max-input-len", self.max_input_len),
            ("--max-seq-len", self.max_seq_len),
            ("--opt-batch", self.opt_batch),
            ("--opt-seq", self.opt_seq),
        ):
            if value is None and option == "--opt-seq":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise EngineOptionError(f"{option} must be a whole number, got {value!r}")
            if value < 1:
                raise EngineOptionError(f"{option} must be at least 1, got {value}")
        if self.max_seq_len < 2:
            raise EngineOptionError(
                f"--max-seq-len must be at least 2 (one prompt token and one generated token), got {self.max_seq_len}"
            )
        if self.max_input_len > self.max_seq_len:
            raise EngineOptionError(
                f"--max-input-len {self.max_input_len} is larger than --max-seq-len {self.max_seq_len}; the prompt "
                f"is part of the sequence, so raise --max-seq-len or lower --max-input-len"
            )
        if self.opt_batch > self.max_batch:
            raise EngineOptionError(f"--opt-batch {self.opt_batch} is larger than --max-batch {self.max_batch}")
        if self.opt_seq is not None and self.opt_seq > self.max_input_len:
            raise EngineOptionError(f"--opt-seq {self.opt_seq} is larger than --max-input-len {self.max_input_len}")

    @property
    def prompt_opt(self) -> int:
        return self.opt_seq if self.opt_seq is not None else max(1, self.max_input_len // 2)


DEFAULT_MAX_SEQ_LEN = 2048  # --max-seq-len when not given (or the model's context, when shorter)


def request_with_defaults(
    max_positions: int,
    max_batch: Optional[int] = None,
    max_input_len: Optional[int] = None,
    max_seq_len: Optional[int] = None,
    opt_batch: Optional[int] = None,
    opt_seq: Optional[int] = None,
) -> ProfileRequest:
    """A :class:`ProfileRequest` from command-line values, None meaning "not given": max batch 1, max sequence
    ``min(2048, max_positions)``, max input half the max sequence, opt batch 1, opt seq half the max input."""
    seq = max_seq_len if max_seq_len is not None else min(DEFAULT_MAX_SEQ_LEN, max_positions)
    return ProfileRequest(
        max_batch=max_batch if max_batch is not None else 1,
        max_input_len=max_input_len if max_input_len is not None else max(1, seq // 2),
        max_seq_len=seq,
        opt_batch=opt_batch if opt_batch is not None else 1,
        opt_seq=opt_seq,
    )


def generation_dims(request: ProfileRequest) -> Dict[str, Dict[str, Range]]:
    """The (min, opt, max) of every symbolic dim, for the prefill and the decode profile."""
    b, big_l, s = request.max_batch, request.max_input_len, request.max_seq_len
    ob, os_ = request.opt_batch, request.prompt_opt
    decode_past_opt = min(max(os_, 1), s - 1)
    return {
        "prefill": {
            BATCH: (1, ob, b),
            SEQ: (1, os_, big_l),
            PAST: (0, 0, s - big_l),
            TOTAL: (1, os_, s),
        },
        "decode": {
            BATCH: (1, ob, b),
            SEQ: (1, 1, 1),
            PAST: (1, decode_past_opt, s - 1),
            TOTAL: (2, decode_past_opt + 1, s),
        },
    }


def _check_context(request: ProfileRequest, max_positions: Optional[int]) -> None:
    if max_positions is not None and request.max_seq_len > max_positions:
        raise EngineOptionError(
            f"--max-seq-len {request.max_seq_len} is longer than the model's context of {max_positions} positions; "
            f"use --max-seq-len {max_positions} or less"
        )


def _shapes_for(inputs: Sequence[TensorSpec], dims: Dict[str, Range]) -> Dict[str, ShapeRange]:
    if not inputs:
        raise BundleError("the manifest lists no graph inputs; re-export the bundle")
    return {tensor.name: _input_shape_range(tensor, dims) for tensor in inputs}


def profiles_for_generation(
    inputs: Sequence[TensorSpec], request: ProfileRequest, max_positions: Optional[int] = None
) -> List[Profile]:
    """The prefill and decode profiles for a graph with these inputs; every input is given shapes.

    ``max_positions`` is the model's trained context (``spec.max_position_embeddings``); a longer ``max_seq_len``
    is refused, since positions past it are outside what the model (and its rotary tables) cover.
    """
    _check_context(request, max_positions)
    return [Profile(name=name, dims=dims, shapes=_shapes_for(inputs, dims))
            for name, dims in generation_dims(request).items()]


def profiles_for_manifest(manifest: Manifest, request: ProfileRequest) -> List[Profile]:
    """:func:`profiles_for_generation` for a bundle's manifest, checked against the model's trained context."""
    return profiles_for_generation(manifest.inputs, request, manifest.spec.max_position_embeddings)


def envelope_profile(
    inputs: Sequence[TensorSpec],
    request: ProfileRequest,
    max_positions: Optional[int] = None,
    tune_for: str = "decode",
) -> Profile:
    """One profile admitting every step the prefill and decode profiles admit (each dim's widest range).

    Its opt sizes are those of the ``tune_for`` profile: "decode" (the default; a generation runs one decode step
    per new token and one prefill per prompt) or "prefill".
    """
    _check_context(request, max_positions)
    per_profile = generation_dims(request)
    if tune_for not in per_profile:
        raise ValueError(f"tune_for must be one of {sorted(per_profile)}, got {tune_for!r}")
    dims: Dict[str, Range] = {}
    for dim, (_, opt, _) in per_profile[tune_for].items():
        dims[dim] = (min(p[dim][0] for p in per_profile.values()), opt, max(p[dim][2] for p in per_profile.values()))
    return Profile(name="generation", dims=dims, shapes=_shapes_for(inputs, dims))


def _input_shape_range(tensor: TensorSpec, dims: Dict[str, Range]) -> ShapeRange:
    lo: List[int] = []
    opt: List[int] = []
    hi: List[int] = []
    for d in tensor.shape:
        if isinstance(d, int):
            r: Tuple[int, int, int] = (d, d, d)
        elif d in dims:
            r = dims[d]
        else:
            raise BundleError(
                f"input {tensor.name!r} has dimension {d!r}, which is none of {sorted(dims)}; glm-export cannot size "
                f"it for TensorRT; re-export the bundle with the current glm-export"
            )
        lo.append(r[0])
        opt.append(r[1])
        hi.append(r[2])
    shapes: Tuple[Shape, Shape, Shape] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes
