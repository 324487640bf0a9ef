"""Progress on the terminal while the full training output goes to the log file.

The trainer prints one line per logged step when its stdout is not a terminal (the launcher's pipe)::

    step 120/1200 step_loss=0.1234 FPS: 85.3 lr=1.000e-03 [key=value ...]

:class:`Progress` turns those into

* on a terminal: ONE line, rewritten in place (``\\r``): step, loss, images/s, ETA;
* elsewhere (CI logs, ``| tee``): throttled lines -- the first step, the last, and one about every 10% of the
  run or every 30 s, whichever comes first -- so a CI log shows progress without repeating the whole log.

The ETA is measured: remaining steps over the step rate seen since this run's first step line (a resumed run
starts counting at the step it resumed from).
"""
from __future__ import annotations

import re
import time
from typing import Callable, NamedTuple, Optional, TextIO

STEP_RE = re.compile(r"^step (\d+)/(\d+) step_loss=(\S+) FPS: (\S+)")


class StepLine(NamedTuple):
    step: int
    total: int
    loss: float
    fps: float


def parse_step(line: str) -> Optional[StepLine]:
    m = STEP_RE.match(line)
    if not m:
        return None
    try:
        return StepLine(int(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4)))
    except ValueError:
        return None


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, stream: TextIO, tty: bool, every_fraction: float = 0.1, every_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stream, self.tty, self.clock = stream, tty, clock
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.first: Optional[tuple] = None      # (step, time) of this run's first step line
        self.last_print: Optional[float] = None
        self.last_bucket = -1
        self.live = False                      # a live line is on screen, unterminated
        self.last: Optional[StepLine] = None
        self._width = 0

    def eta(self, s: StepLine, now: float) -> Optional[float]:
        if self.first is None or s.step <= self.first[0] or now <= self.first[1]:
            return None
        rate = (s.step - self.first[0]) / (now - self.first[1])
        return (s.total - s.step) / rate

    def text(self, s: StepLine, now: float) -> str:
        pct = 100.0 * s.step / s.total if s.total else 0.0
        eta = self.eta(s, now)
        eta_text = "done" if s.step >= s.total else ("ETA " + format_duration(eta) if eta is not None else "ETA ?")
        return f"step {s.step}/{s.total} ({pct:.0f}%)  loss {s.loss:.4f}  {s.fps:.1f} images/s  {eta_text}"

    def step(self, s: StepLine) -> None:
        now = self.clock()
        if self.first is None:
            self.first = (s.step, now)
        self.last = s
        if self.tty:
            text = self.text(s, now)
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._width, self.live = len(text), True
            return
        # The epsilon keeps 300/1000/0.1 = 2.9999... in bucket 3, so the 30% line comes at step 300.
        bucket = int(s.step / s.total / self.every_fraction + 1e-9) if s.total else 0
        due = (self.last_print is None or s.step >= s.total or bucket > self.last_bucket
               or now - self.last_print >= self.every_seconds)
        if due:
            self.stream.write(self.text(s, now) + "\n")
            self.stream.flush()
            self.last_print, self.last_bucket = now, bucket

    def message(self, text: str) -> None:
        """Print a line of its own (ending the live line first, which stays visible above it)."""
        self.end_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
            self.live, self._width = False, 0


__all__ = ["Progress", "StepLine", "format_duration", "parse_step"]
