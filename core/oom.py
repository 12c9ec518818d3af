"""Running a batched computation in smaller parts when the accelerator runs out of memory.

A GPU shared with other jobs (or a `base` model on a small card) can run out of memory on a
batch that fits most of the time. The design asks for a working fallback, not a stack trace:
the batch is split in halves and the computation goes on; the smaller size is kept for the
rest of the job, so each later batch does not fail first. Only one item that does not fit on
its own is an error, and its message says what to do.

Written here because torch has no such helper (``torch.cuda.empty_cache`` frees the cache;
splitting the work is the caller's job) and the three callers (batch scoring, the window
choice and Captum's integration steps) share it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


class AcceleratorOutOfMemory(RuntimeError):
    """Out of memory even for one item: the message says how to get out of it."""


def free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def too_big(what: str) -> AcceleratorOutOfMemory:
    return AcceleratorOutOfMemory(
        f"out of GPU memory on {what}, even one at a time: free the GPU (other jobs, a "
        "larger model loaded elsewhere), or run on the CPU with FRAUDLENS_DEVICE=cpu"
    )


class PartSizer:
    """Runs work over n items in parts of at most ``limit`` items, halving the limit each time
    a part runs out of memory. One sizer per job: what it learnt holds for the later batches."""

    def __init__(self, what: str, limit: int | None = None) -> None:
        self.what = what
        self.limit = limit
        self.splits = 0

    def run(self, n: int, work: Callable[[slice], T]) -> Iterator[tuple[slice, T]]:
        """(part, work(part)) for consecutive parts covering range(n), in order."""
        lo = 0
        while lo < n:
            size = n - lo if self.limit is None else min(self.limit, n - lo)
            part = slice(lo, lo + size)
            try:
                out = work(part)
            except torch.OutOfMemoryError:
                if size <= 1:
                    raise too_big(self.what) from None
                self.limit = size // 2
                self.splits += 1
                free_cached_memory()
                log.warning(
                    "out of memory on %d %s; going on %d at a time", size, self.what, self.limit
                )
                continue
            yield part, out
            lo = part.stop
