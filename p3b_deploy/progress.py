"""Progress that reads well in a terminal and in a log file.

On a terminal: a tqdm bar (rate, ETA). Elsewhere (CI logs, `| tee`, files) a bar's refreshes
become hundreds of carriage-return lines, so `progress_bar` prints a few plain lines instead:
one per `every` fraction of the work (default 25%), each with count, rate, ETA and the postfix.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class LineProgress:
    """tqdm's update / set_postfix / close, printed as a handful of plain lines."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it",
                 every: float = 0.25, file: TextIO | None = None) -> None:
        self.total, self.n, self.desc, self.unit = int(total), int(initial), desc, unit
        self.file = file if file is not None else sys.stderr
        self.step_every = max(1, round(every * max(1, self.total - self.n)))
        self._start_n, self._t0, self._next = self.n, time.monotonic(), self.n + self.step_every
        self.postfix: dict[str, Any] = {}
        self.lines = 0  # lines written (tests count them)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n >= self._next and self.n < self.total:
            self._print()
            self._next = self.n + self.step_every

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def _print(self) -> None:
        dt = max(1e-9, time.monotonic() - self._t0)
        rate = (self.n - self._start_n) / dt
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        post = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        pct = 100.0 * self.n / max(1, self.total)
        eta_s = time.strftime("%M:%S", time.gmtime(eta)) if eta == eta else "?"
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({pct:.0f}%), {rate:.2f} {self.unit}/s, "
              f"ETA {eta_s} {post}".rstrip(), file=self.file, flush=True)
        self.lines += 1

    def close(self) -> None:
        if self.n > self._start_n:
            self._print()


def progress_bar(total: int, initial: int = 0, desc: str = "", unit: str = "it", file: TextIO | None = None):
    """A tqdm bar on a terminal, a LineProgress elsewhere."""
    stream = file if file is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, desc=desc, file=stream)
    return LineProgress(total, initial, desc, unit, file=stream)
