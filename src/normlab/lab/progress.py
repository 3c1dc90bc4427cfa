"""The progress of a run on stderr: a live bar for a person at a terminal, plain lines for a log.

A terminal gets tqdm's bar, redrawn in place. Anywhere else (a file, a pipe, a CI log) a bar
would write one carriage-return-separated line per update, so :class:`PlainProgress` prints a
line every ``every`` percent instead (and at the end)::

    normlab: 35% (4,200 of 12,000 steps, 42 s, about 78 s left)

Example::

    >>> import io
    >>> stream = io.StringIO()
    >>> with progress_display(100, stream=stream, every=50) as bar:
    ...     for _ in range(4):
    ...         bar.update(25)
    >>> [line.split(" (")[0] for line in stream.getvalue().splitlines()]
    ['normlab: 50%', 'normlab: 100%']
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["PlainProgress", "progress_display"]


class PlainProgress:
    """Counts steps and prints a plain line each time another ``every`` percent of ``total`` is done."""

    def __init__(self, total: int, stream: IO[str], every: int = 5):
        if not 1 <= every <= 100:
            raise ValueError(f"every must be a whole percentage in 1..100, got {every!r}.")
        self.total, self.stream, self.every = total, stream, every
        self.done, self.shown = 0, 0  # steps done; the last percentage printed
        self.started = time.monotonic()

    def update(self, steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        percent = 100 * self.done // self.total if self.total else 100
        mark = percent - percent % self.every
        if mark > self.shown:
            self.shown = mark
            elapsed = time.monotonic() - self.started
            left = f", about {elapsed * (self.total - self.done) / self.done:.0f} s left" if self.done < self.total else ""
            print(f"normlab: {mark}% ({self.done:,} of {self.total:,} steps, {elapsed:.0f} s{left})",
                  file=self.stream, flush=True)

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _Silent:
    def update(self, steps: int = 1) -> None:
        return None

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def progress_display(total: int, *, enabled: bool = True, stream: IO[str] | None = None, every: int = 5):
    """A context manager with ``update(steps)``: tqdm's bar on a terminal, :class:`PlainProgress`
    lines every ``every`` percent elsewhere, nothing when not ``enabled``. ``stream`` defaults to
    ``sys.stderr`` at the time of the call."""
    stream = sys.stderr if stream is None else stream
    if not enabled or stream is None:  # no stderr at all (pythonw): nowhere to show it
        return _Silent()
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="step", dynamic_ncols=True, leave=False, file=stream)
    return PlainProgress(total, stream, every)
