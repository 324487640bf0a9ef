"""Outputs of an inference run: PNG + JSON sidecar pairs, all or none.

* :class:`OutputWriter` writes each PNG under a hidden temporary name and renames it into place, then the
  sidecar with :func:`diffusers_npu.fsutil.write_json_atomic`, so no half-written file ever carries a final
  name. Existing files are never overwritten (a taken name gets ``-2``, ``-3``...). Used as a context
  manager, it removes every file it wrote -- and ``--output_dir`` if it created it -- when the block fails:
  an exception, Ctrl-C, SIGTERM (see :func:`sigterm_unwinds`) or a full disk (:class:`OutputError`).
* :func:`sigterm_unwinds` turns SIGTERM into :class:`Terminated`, which unwinds like Ctrl-C's
  ``KeyboardInterrupt``, so both signals leave the same thing behind: nothing of this run.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import List

from ..errors import DiffusersNpuError
from ..fsutil import is_disk_full, write_json_atomic

IMAGE_SUFFIXES = (".png", ".json")
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class OutputError(DiffusersNpuError):
    """The outputs could not be written (the disk or quota is full). Exit status 2, one line."""


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException like KeyboardInterrupt, so no ``except Exception`` in a library
    swallows it on its way to the clean-up."""

    removed = 0  # files of this run removed while unwinding (set by the runner)
    kept = 0  # images kept: the signal came after the last one was complete


@contextlib.contextmanager
def sigterm_unwinds():
    """While active (main thread only), SIGTERM raises :class:`Terminated` where the program is. A second
    SIGTERM while unwinding is ignored, so the clean-up it triggered finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM for the few file operations of a clean-up; they are delivered right after."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    except (AttributeError, OSError, ValueError):  # no POSIX signal masks here
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class OutputWriter:
    """Writes PNG + JSON pairs atomically and removes everything it wrote if the run fails (see module)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.created: List[str] = []  # folders this writer created, innermost last
        self.claimed: List[str] = []  # final names this writer took (free when taken), in order
        self.images = 0  # complete PNG + sidecar pairs
        self.removed = 0  # files removed by the last rollback

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.rollback()
        return False

    def _ensure_dir(self):
        missing = []
        path = os.path.abspath(self.output_dir)
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for folder in reversed(missing):
            os.mkdir(folder)
            self.created.append(folder)

    def _free_stem(self, stem: str) -> str:
        candidate, n = stem, 1
        while any(os.path.exists(os.path.join(self.output_dir, candidate + s)) for s in IMAGE_SUFFIXES):
            n += 1
            candidate = f"{stem}-{n}"
        return candidate

    def write(self, stem: str, image, metadata: dict) -> str:
        """Write ``<stem>.png`` and ``<stem>.json``; returns the PNG path. A full disk raises
        :class:`OutputError` (the files of this run are then removed by the context manager)."""
        try:
            return self._write(stem, image, metadata)
        except OutputError:
            raise
        except Exception as exc:
            if is_disk_full(exc):
                raise OutputError(
                    f"--output_dir: no space left on the device while writing image {self.images + 1} to "
                    f"{self.output_dir}; the {self.images} image(s) this run had written were removed again "
                    "(free some space or choose another --output_dir)") from None
            raise

    def _write(self, stem: str, image, metadata: dict) -> str:
        self._ensure_dir()
        stem = self._free_stem(stem)
        final_png = os.path.join(self.output_dir, stem + ".png")
        final_json = os.path.join(self.output_dir, stem + ".json")
        # Temporary names start with "." and end in ".tmp"; open(..., "x") honours the umask.
        tmp_png = os.path.join(self.output_dir, f".{stem}.{os.getpid()}-{os.urandom(4).hex()}.png.tmp")
        try:
            with open(tmp_png, "xb") as f:
                image.save(f, format="PNG")
                f.flush()
                os.fsync(f.fileno())  # a full disk shows here at the latest, not after the rename
            # Claimed before the rename: a signal between rename and bookkeeping still finds the file.
            self.claimed.append(final_png)
            os.replace(tmp_png, final_png)
            tmp_png = None
            self.claimed.append(final_json)
            write_json_atomic(final_json, metadata, indent=2)
        finally:
            if tmp_png is not None and os.path.exists(tmp_png):
                os.remove(tmp_png)
        self.images += 1
        return final_png

    def rollback(self):
        """Remove every file this writer wrote and every folder it created (if empty)."""
        with _signals_held():
            removed = 0
            for path in reversed(self.claimed):
                try:
                    os.remove(path)
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError:
                    pass
            self.claimed.clear()
            for folder in reversed(self.created):
                try:
                    os.rmdir(folder)  # only if empty
                except OSError:
                    pass
            self.created.clear()
            self.removed = removed


def to_pil(image):
    """A pipeline output image (PIL, or a [0, 1] CHW tensor / HWC array) as a PIL image."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        image = image.permute(1, 2, 0) if image.ndim == 3 else image
        image = image.numpy()
    array = (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


__all__ = ["IMAGE_SUFFIXES", "OutputError", "OutputWriter", "Terminated", "sigterm_unwinds", "to_pil"]
