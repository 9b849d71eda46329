"""Progress bars for long command-line steps (shard writing, export, eval): totals, rate and ETA.

tqdm when it is installed, else a plain line on stderr rewritten in place. Quiet when stderr is not a terminal
(logs, CI, Ray workers), so piped output and log files hold no bar noise.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class _Plain:
    """A minimal bar: `desc: n/total unit (rate/s, ETA s)`, redrawn at most every 0.2 s."""

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.t0 = self._drawn = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._drawn >= 0.2 or (self.total is not None and self.n >= self.total):
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.n / max(now - self.t0, 1e-9)
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.1f}/s, ETA {eta:.0f}s)"
        else:
            text = f"{self.desc}: {self.n} {self.unit} ({rate:.1f}/s)"
        sys.stderr.write("\r" + text)
        sys.stderr.flush()

    def write(self, line: str) -> None:
        sys.stderr.write("\r" + line + "\n")
        self._draw(time.monotonic())

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


class _Quiet:
    def update(self, n: int = 1) -> None: ...

    def write(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None: ...


class Progress:
    """Context manager around one bar; ``update(n)`` advances it."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool | None = None,
                 unit_scale: bool = False):
        show = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = _Quiet()
        if show:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                                 leave=True, dynamic_ncols=True)  # the final state stays: totals, time
            except ImportError:
                self._bar = _Plain(total, desc, unit)

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn (callers skip work only a bar needs, such as counting a total)."""
        return not isinstance(self._bar, _Quiet)

    def set_total(self, total: int) -> None:
        self._bar.total = total
        if hasattr(self._bar, "refresh"):
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def write(self, line: str) -> None:
        """A log line on stderr that does not tear the bar (printed plainly when there is no bar)."""
        if isinstance(self._bar, (_Plain, _Quiet)):
            self._bar.write(line)
        else:
            self._bar.write(line, file=sys.stderr)  # tqdm's class-level write, which defaults to stdout

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
