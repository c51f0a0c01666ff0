"""What the comparison benchmarks share: their command-line options and the interleaved rounds with medians.

Both ``decode_peers.py`` and ``precision_bench.py`` run every contender once per round, round after round, and compare
the medians as ratios: this machine's absolute speed varies with its neighbours, the ratios much less. Imported by
the scripts as ``_common`` (a script's own directory is first on ``sys.path``).
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List, Mapping


def common_args(description: str) -> argparse.ArgumentParser:
    """A parser with the options every comparison takes (add more before ``parse_args``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    return parser


def interleaved_medians(
    measures: Mapping[str, Callable[[], Mapping[str, float]]], rounds: int
) -> Dict[str, Dict[str, float]]:
    """Run every measure once per round for ``rounds`` rounds, the order reversed every other round (so no contender
    always runs first or right after the same neighbour); the median of each figure per name.

    ``measures`` maps a name to a call returning that run's figures ({"decode_tps": ..., ...}).
    """
    runs: Dict[str, Dict[str, List[float]]] = {name: {} for name in measures}
    order = list(measures.items())
    for r in range(rounds):
        for name, measure in (order if r % 2 == 0 else order[::-1]):
            for key, value in measure().items():
                runs[name].setdefault(key, []).append(value)
    return {name: {k: statistics.median(v) for k, v in figures.items()} for name, figures in runs.items()}
