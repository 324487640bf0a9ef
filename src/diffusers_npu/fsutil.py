"""Small file-system helpers shared by training, inference and the benchmarks.

* :func:`write_json_atomic` -- THE json writer of the project: temp file, fsync, rename.
* :func:`fsync_tree` -- flush every file under a folder to disk (before a marker vouches for them).
* :func:`is_disk_full` -- recognise "no space left" however the writer reported it (``OSError(28)``,
  safetensors' ``SafetensorError``, ``torch.save``'s ``RuntimeError`` wrapping the C++ error).
"""
from __future__ import annotations

import errno
import json
import os


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """fsync every regular file below ``folder`` and every directory (files first)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fsync_file(path)
        fsync_dir(root)


def write_json_atomic(path: str, data, indent: int = 1) -> str:
    """Write ``data`` as JSON to ``path`` so that readers see the old file or the whole new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return str(value)


_DISK_FULL_TEXT = ("no space left", "disk full", "not enough space", "enospc", "errno 28", "error code: 28")


def is_disk_full(exc: BaseException, path: str | None = None) -> bool:
    """True for any exception (or one it wraps) that means the disk or quota is full. torch.save reports a
    full disk as a bare stream error ("basic_ios::clear", "unexpected pos ..."); with ``path`` such an I/O
    error counts when the file system holding ``path`` has (almost) no space left."""
    dcp = type(exc).__name__ == "CheckpointException"  # torch.distributed.checkpoint: wraps each rank's error
    if path is not None and (dcp or isinstance(exc, (OSError, RuntimeError))) and free_bytes(path) < 16 * 2**20:
        return True
    if dcp and any(isinstance(f, BaseException) and is_disk_full(f) for f in getattr(exc, "failures", {}).values()):
        return True
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: str) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent); large if unknown."""
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return 2**62
    return st.f_bavail * st.f_frsize


__all__ = ["free_bytes", "fsync_dir", "fsync_file", "fsync_tree", "is_disk_full", "write_json_atomic"]
