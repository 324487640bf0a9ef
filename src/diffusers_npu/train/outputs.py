"""What this run wrote, so that a failure removes only what the run left unfinished.

The rule (never delete what a run finished): on any error or signal the run removes its temp folders and
files, and removes ``--output_dir`` only if this run created it AND finished nothing in it. Finished work
(a checkpoint, the final output, generated class or instance images, validation grids, the summary) is
recorded here the moment it is complete, and is never deleted by the clean-up.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import List, Optional

logger = logging.getLogger(__name__)


class OutputLedger:
    def __init__(self, output_dir: str):
        self.output_dir = os.path.abspath(output_dir)
        self.created_dir = not os.path.exists(self.output_dir)
        self.unfinished: List[str] = []
        self.finished: List[str] = []
        self.checkpoints: List[str] = []

    def begin(self, path: str) -> str:
        """Register a temp file/folder this run is writing (removed on failure unless :meth:`done`)."""
        self.unfinished.append(os.path.abspath(path))
        return path

    def done(self, temp: Optional[str] = None, final: Optional[str] = None) -> None:
        if temp is not None and os.path.abspath(temp) in self.unfinished:
            self.unfinished.remove(os.path.abspath(temp))
        if final is not None:
            self.finished.append(os.path.abspath(final))
            if os.path.basename(final).startswith("checkpoint-"):
                self.checkpoints.append(os.path.abspath(final))

    def last_checkpoint(self) -> Optional[str]:
        from ..checkpoint import list_checkpoints

        ckpts = list_checkpoints(self.output_dir)
        return ckpts[-1][1] if ckpts else None

    def safety_note(self) -> str:
        """What is still there, for error messages ("the last complete checkpoint is ...")."""
        last = self.last_checkpoint()
        if last:
            return f"the last complete checkpoint is {last}"
        if self.finished:
            return f"finished output kept in {self.output_dir}"
        return "no checkpoint was saved yet"

    def cleanup(self) -> List[str]:
        """Remove what this run left unfinished; returns the removed paths."""
        removed = []
        for path in reversed(self.unfinished):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
            else:
                continue
            removed.append(path)
        self.unfinished = []
        if self.created_dir and not self.finished and os.path.isdir(self.output_dir):
            shutil.rmtree(self.output_dir, ignore_errors=True)
            removed.append(self.output_dir)
        for path in removed:
            logger.info("removed unfinished %s", path)
        return removed
