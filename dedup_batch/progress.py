"""Stage timing and logging set-up.

``stage(name)`` times a pipeline stage and logs its start and end; the CLI configures handlers
with :func:`configure_logging`. Library code only logs through ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["StageTimer", "configure_logging", "stage"]

log = logging.getLogger("dedup_batch")


class StageTimer:
    """Collects per-stage wall times (seconds) for ``summary.json``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with stage(name):
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.timings[name] = round(time.perf_counter() - t0, 4)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Log the start and end (with wall time) of a pipeline stage."""
    log.info("%s: started", name)
    t0 = time.perf_counter()
    yield
    log.info("%s: done in %.2fs", name, time.perf_counter() - t0)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send the package's log records to stderr (the CLI calls this, never the library)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("dedup_batch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
