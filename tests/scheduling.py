"""The order the suite's tests are handed to its pytest workers: each worker's share begins with its longest
test files and ends with its shortest, and the shares take about as long as each other.

Why: scripts/test.sh runs two workers with xdist's ``--dist worksteal``, which hands each worker a contiguous
block of the collected tests (the first half to one, the rest to the other) and lets a worker that runs dry
steal the back half of the other's queue. In the collection's alphabetical order the blocks' sums differed
and the last tests were multi-minute integration tests, so one worker often stood idle for the last 20-60 s of
the run (timelines of 2026-12-07, docs/BENCHMARKS.md). Here the blocks are filled longest file first, each
file into the block with the least expected time that has room for it, and each block is run longest first:
what is left to steal at the end are short tests.

Expected times come from tests/durations.json (seconds per test id, the tests that take 0.5 s or more),
written by ``python scripts/test_durations.py TIMELINE...`` from timelines of earlier runs
(``UNIMO_TEST_TIMELINE``).
A test it does not list counts as DEFAULT_S; only the order changes, never what runs, so a stale file costs
time, not correctness. A file's tests stay together and in their order (its module fixtures set up once),
except where a block's room ends inside a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

DURATIONS = Path(__file__).with_name("durations.json")
DEFAULT_S = 0.05  # a test the file does not list: most tests take well under a tenth of a second

T = TypeVar("T")


def block_sizes(n: int, workers: int) -> list[int]:
    """How many of ``n`` tests xdist's worksteal hands each worker at the start (first idle worker first)."""
    sizes, left = [], n
    for i in range(workers):
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    return sizes


def balanced_order(items: Sequence[T], workers: int, file_of: Callable[[T], str],
                   seconds: Callable[[T], float]) -> list[T]:
    """``items`` reordered as described in the module doc for ``workers`` workers."""
    if workers < 2 or len(items) < 2:
        return list(items)
    files: dict[str, list[T]] = {}
    for item in items:
        files.setdefault(file_of(item), []).append(item)
    sizes = block_sizes(len(items), workers)
    room, load = list(sizes), [0.0] * workers
    blocks: list[list[tuple[float, str, list[T]]]] = [[] for _ in range(workers)]
    by_time = sorted(files.items(), key=lambda kv: (-sum(seconds(i) for i in kv[1]), kv[0]))
    for name, tests in by_time:
        fits = [b for b in range(workers) if room[b] >= len(tests)]
        parts = ([(min(fits, key=lambda b: (load[b], b)), tests)] if fits else _split(tests, room))
        for b, part in parts:
            took = sum(seconds(i) for i in part)
            blocks[b].append((took, name, part))
            room[b] -= len(part)
            load[b] += took
    ordered: list[T] = []
    for block in blocks:
        for _, _, part in sorted(block, key=lambda p: (-p[0], p[1])):
            ordered.extend(part)
    return ordered


def _split(tests: list[T], room: list[int]) -> list[tuple[int, list[T]]]:
    """A file too big for any block's room: its tests, in order, into the roomiest blocks."""
    parts, rest = [], list(tests)
    for b in sorted(range(len(room)), key=lambda b: (-room[b], b)):
        if not rest:
            break
        take = min(room[b], len(rest))
        if take:
            parts.append((b, rest[:take]))
            rest = rest[take:]
    return parts


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    """Seconds per test id from ``path``; empty (every test DEFAULT_S) when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


class Scheduling:
    """The pytest plugin: reorders the collection in each xdist worker (each computes the same order)."""

    def __init__(self, workers: int, durations: dict[str, float]):
        self.workers, self.durations = workers, durations

    @pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselection: the blocks are of the tests that run
    def pytest_collection_modifyitems(self, items):
        order = balanced_order(items, self.workers, lambda i: i.nodeid.split("::")[0],
                               lambda i: self.durations.get(i.nodeid, DEFAULT_S))
        items[:] = order
