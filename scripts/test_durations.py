"""Writes tests/durations.json, the expected seconds of each test that takes 0.5 s or more, from timelines of
earlier runs of the suite: the order tests/scheduling.py hands tests to the pytest workers.

    UNIMO_TEST_TIMELINE=/tmp/tl.txt bash scripts/test.sh -q      # one or more whole runs
    python scripts/test_durations.py /tmp/tl.txt [more timelines]  # the mean per test over them

A timeline line is ``<unix time> <worker> start|end <test id>`` (tests/conftest.py writes them).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "durations.json"
KEEP_S = 0.5  # shorter tests count as tests/scheduling.DEFAULT_S


def seconds_per_test(timeline: Path) -> dict[str, float]:
    """Seconds each test ran in one timeline (start to end on its worker)."""
    started: dict[tuple[str, str], float] = {}
    took: dict[str, float] = defaultdict(float)
    for line in timeline.read_text().splitlines():
        parts = line.split(None, 3)
        if len(parts) != 4:
            continue
        when, worker, event, test = float(parts[0]), parts[1], parts[2], parts[3].strip()
        if event == "start":
            started[(worker, test)] = when
        elif (worker, test) in started:
            took[test] += when - started.pop((worker, test))
    return dict(took)


def mean_seconds(timelines: list[Path]) -> dict[str, float]:
    """Each test's mean over the timelines it appears in, rounded to 0.1 s; only those of KEEP_S or more."""
    runs = [seconds_per_test(t) for t in timelines]
    tests = {test for run in runs for test in run}
    means = {test: sum(r[test] for r in runs if test in r) / sum(test in r for r in runs) for test in tests}
    return {test: round(s, 1) for test, s in sorted(means.items()) if s >= KEEP_S}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    missing = [a for a in argv if not Path(a).is_file()]
    if missing:
        print(f"no such timeline: {', '.join(missing)}; write one with UNIMO_TEST_TIMELINE=FILE bash "
              "scripts/test.sh -q", file=sys.stderr)
        return 2
    durations = mean_seconds([Path(a) for a in argv])
    OUT.write_text(json.dumps(durations, indent=0, sort_keys=True) + "\n")
    print(f"{OUT}: {len(durations)} tests of {KEEP_S} s or more, {sum(durations.values()):.0f} s in all, "
          f"from {len(argv)} timeline(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
