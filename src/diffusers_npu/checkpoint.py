"""Crash-safe checkpoints: write to a temporary folder, mark complete, then rename into place.

Layout of ``output_dir``::

    checkpoint-500/             complete checkpoint (has COMPLETE marker)
    .tmp-checkpoint-1000/       a save in progress or one killed mid-way: never read, removed on next save
    <pipeline files>            the final pipeline, also written through a temporary folder

A checkpoint is *good* only when its ``COMPLETE`` marker exists; ``latest`` resolves to the newest good one,
and pruning (``--checkpoints_total_limit``) only ever deletes good checkpoints older than the newest good one.
``os.replace`` of a folder is atomic on POSIX file systems, so a ``kill -9`` at any moment leaves either the
old set of checkpoints or the new one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

MARKER = "COMPLETE"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def list_checkpoints(output_dir: str, complete_only: bool = True) -> list[tuple[int, str]]:
    """(step, path) pairs sorted by step."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = _CKPT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path) and (not complete_only or is_complete(path)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def resolve_resume(resume_from: str | None, output_dir: str) -> str | None:
    """Turn ``--resume_from_checkpoint`` into a checkpoint folder (or None to start fresh).

    ``latest`` picks the newest complete checkpoint in ``output_dir`` and returns None when there is none
    (so rerunning the same command after a pre-emption just continues). An explicit path must be a complete
    checkpoint, else a CheckpointError names it.
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    path = resume_from
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(output_dir, resume_from)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume_from_checkpoint: {resume_from!r} does not exist "
                              f"(expected a checkpoint-N folder or 'latest')")
    if not is_complete(path):
        raise CheckpointError(f"--resume_from_checkpoint: {path} is incomplete (no {MARKER} marker): it was "
                              f"interrupted while being written; use an older checkpoint or 'latest'")
    return path


def tmp_path_for(final: str) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".tmp-{name}")


def begin(final: str) -> str:
    """Create (empty) the temporary folder for ``final``, removing a stale one from a killed save."""
    tmp = tmp_path_for(final)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, final: str, info: dict | None = None) -> str:
    """Mark ``tmp`` complete and move it to ``final`` (replacing an older folder of the same name)."""
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(dict(info or {}, time=time.time()), f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        # Same-named folder (e.g. re-saving a step): move the old one aside first, so that at every moment
        # one complete copy exists under some name.
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def abort(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def prune(output_dir: str, total_limit: int | None, keep: str | None = None) -> list[str]:
    """Keep at most ``total_limit`` complete checkpoints (newest first); never delete ``keep`` or the newest
    complete one. Incomplete temp folders are left for :func:`begin` to clean. Returns the removed paths."""
    if not total_limit or total_limit <= 0:
        return []
    ckpts = list_checkpoints(output_dir)
    removed = []
    excess = len(ckpts) - total_limit
    for step, path in ckpts[:-1]:  # the newest good checkpoint is never a candidate
        if excess <= 0:
            break
        if keep and os.path.abspath(path) == os.path.abspath(keep):
            continue
        shutil.rmtree(path)
        removed.append(path)
        excess -= 1
    return removed


def check_writable(folder: str, flag: str = "--output_dir") -> None:
    """Fail early, naming the flag, when ``folder`` cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"{flag}: {folder} is not writable ({e.strerror or e})") from e
