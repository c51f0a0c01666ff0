"""Progress reporting for long work (loading, exporting, calibrating, building).

The library reports through a ``Progress`` object and logs; only the CLI turns it into something printed (tqdm bars).
``NullProgress`` is the default for library calls, so embedding glm-export prints nothing.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger("glm_export")


class NullProgress:
    """Logs stage names at INFO; iterates without drawing anything."""

    def stage(self, message: str) -> None:
        log.info(message)

    def iterate(self, items: Iterable[T], total: Optional[int] = None, desc: str = "") -> Iterator[T]:
        if desc:
            log.info(desc)
        return iter(items)


class TqdmProgress(NullProgress):
    """Draws a tqdm bar on stderr for each iteration and prints stage lines; used by the CLI only."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def stage(self, message: str) -> None:
        log.info(message)
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message)

    def iterate(self, items: Iterable[T], total: Optional[int] = None, desc: str = "") -> Iterator[T]:
        from tqdm import tqdm

        return iter(tqdm(items, total=total, desc=desc, disable=not self.enabled, leave=False, unit="it"))
