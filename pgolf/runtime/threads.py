"""Run a function over items in threads, results in item order: the compressors (zlib, lzma,
zstd, brotli) release the GIL, so the artifact's candidates and streams compress in parallel."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def thread_map(fn: Callable[[T], R], items: Sequence[T], jobs: int | None = None) -> list[R]:
    """[fn(x) for x in items], `jobs` at a time (default: up to 8, the CPU count)."""
    workers = min(len(items), jobs or min(8, os.cpu_count() or 1))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, items))
