"""SIGTERM / SIGINT over the WHOLE run: start-up, the loop, the final validation, save and check.

* During start-up (nothing trained yet) a signal stops at once with :class:`Interrupted` (one line, exit
  130/143; the run's half-made output is removed by the caller).
* During training the first signal only sets a flag. The Trainer agrees on it across ranks at the next
  flush (no collective per step), saves a checkpoint and exits 0: rerun the same command to continue.
* After the last step, the first signal lets the current save finish and skips what remains (final
  validation images, the learning check), saving a checkpoint if the final output is not written yet.
* A second signal stops at once with :class:`Interrupted` (one line, no traceback); the last complete
  checkpoint is intact and the run's unfinished temp folders are removed.

Long pipelines (validation, class images, the learning check) call :meth:`Preemption.check` between
denoising steps, which raises :class:`PreemptRequested` when a signal came in.
"""
from __future__ import annotations

import logging
import signal
from typing import Optional

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """Stop now (a signal during start-up, or a second signal). BaseException: nothing must swallow it."""

    def __init__(self, signum: int, phase: str):
        self.signum = signum
        self.phase = phase
        super().__init__(f"{signal.Signals(signum).name} during {phase}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class PreemptRequested(Exception):
    """Raised inside long pipeline calls after a first signal, to abandon optional work."""


class Preemption:
    def __init__(self):
        self.phase = "start-up"
        self.signum: Optional[int] = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "Preemption":
        self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()
        return False

    def _handle(self, signum, frame):
        if self.signum is not None or self.phase == "start-up":
            raise Interrupted(signum, self.phase if self.signum is None else f"{self.phase} (second signal)")
        self.signum = signum
        logger.warning("received %s during %s: %s", signal.Signals(signum).name, self.phase,
                       "saving a checkpoint at the next flush, then exiting" if self.phase == "training"
                       else "finishing the current save, then exiting")

    def enter(self, phase: str) -> None:
        self.phase = phase

    def check(self, *_args, **_kwargs):
        """Usable as a pipeline ``callback_on_step_end``: raises PreemptRequested after a signal."""
        if self.signum is not None:
            raise PreemptRequested(signal.Signals(self.signum).name)
        return _kwargs.get("callback_kwargs", {}) if _kwargs else (_args[3] if len(_args) > 3 else {})
