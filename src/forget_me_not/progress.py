"""Progress of long work: a bar on a terminal, a few plain lines in a log.

A non-interactive run (CI, a log file, a web job) gets one line when a stage starts, its loss
about every tenth of the way, and one line with its time when it ends, instead of thousands of
redrawn bars.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

LOG_EVERY = 10  # lines per stage in a log, besides its first and last
# Who else hears every stage's progress in this thread (the web page's job, for its bar).
_LISTENER: contextvars.ContextVar[Callable[[str, int, int], None] | None] = \
    contextvars.ContextVar("fmn_progress_listener", default=None)


@contextlib.contextmanager
def listening(callback: Callable[[str, int, int], None]) -> Iterator[None]:
    """Within: every Progress calls `callback(label, done, total)` on each step."""
    token = _LISTENER.set(callback)
    try:
        yield
    finally:
        _LISTENER.reset(token)


class Progress:
    """`update(**values)` once per step; `close()` at the end."""

    def __init__(self, total: int, label: str, *, enabled: bool = True,
                 stream: TextIO | None = None, callback: Any = None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.callback = callback  # called with (done, total, values), e.g. by the web page
        self.started = time.perf_counter()
        self.bar = None
        self.lines = enabled and not _is_terminal(self.stream)
        if enabled and not self.lines:
            self.bar = tqdm(total=total, desc=label, file=self.stream)
        elif self.lines:
            self._line(f"{label}: {total} steps")

    def update(self, **values: float) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total, values)
        listener = _LISTENER.get()
        if listener is not None:
            listener(self.label, self.done, self.total)
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(shown, refresh=False)
        elif self.lines:
            every = max(1, self.total // LOG_EVERY)
            if self.done % every == 0 and self.done < self.total:
                self._line(f"{self.label}: step {self.done}/{self.total} {shown}".rstrip())

    def note(self, text: str) -> None:
        """One line about the stage (e.g. where a run stopped), on a terminal or in the log."""
        if self.bar is not None:
            self.bar.write(f"{self.label}: {text}", file=self.stream)
        elif self.lines:
            self._line(f"{self.label}: {text}")

    def close(self) -> None:
        seconds = time.perf_counter() - self.started
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            self._line(f"{self.label}: done, {self.done} steps in {seconds:.1f} s")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
