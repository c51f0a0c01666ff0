"""Progress reporting for long work (loading, exporting, calibrating, building).

The library reports through a ``Progress`` object and logs; only the CLI turns it into something printed (tqdm bars).
``NullProgress`` is the default for library calls, so embedding glm-export prints nothing.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator, Optional, Sequence, TypeVar

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


    def iterate_bytes(self, items: Sequence[T], sizes: Sequence[int], desc: str = "") -> Iterator[T]:
        """Iterate ``items`` whose work is ``sizes`` bytes each; logs each item with bytes done and an ETA."""
        total, done, start = sum(sizes), 0, time.perf_counter()
        for i, (item, size) in enumerate(zip(items, sizes)):
            yield item
            done += size
            elapsed = time.perf_counter() - start
            eta = elapsed * (total - done) / done if done else 0.0
            log.info("%s: %d/%d %s, %.1f/%.1f MB, ETA %.0fs", desc, i + 1, len(items),
                     getattr(item, "name", item), done / 1e6, total / 1e6, eta)


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

    def iterate_bytes(self, items: Sequence[T], sizes: Sequence[int], desc: str = "") -> Iterator[T]:
        """A tqdm bar in bytes (done, total, rate and ETA) advanced as each item's work is done."""
        from tqdm import tqdm

        with tqdm(total=sum(sizes), desc=desc, disable=not self.enabled, leave=False, unit="B", unit_scale=True,
                  unit_divisor=1024) as bar:
            for item, size in zip(items, sizes):
                bar.set_postfix_str(str(getattr(item, "name", item))[-40:], refresh=False)
                yield item
                bar.update(size)
                log.debug("%s: %s done", desc, getattr(item, "name", item))
