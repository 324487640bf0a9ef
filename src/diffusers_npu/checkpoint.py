"""Crash-safe folders: write into a temporary folder, fsync, mark complete, then rename into place.

Layout of ``output_dir``::

    checkpoint-500/             complete checkpoint (has the COMPLETE marker)
    .tmp-checkpoint-1000/       a save in progress, or one killed mid-way: never read; collected at start-up
    .tmp-pipeline/              the final save in progress (same rule)
    unet.old/                   left by a kill inside :func:`install_folder_contents`; collected at start-up

A folder is *good* only when its ``COMPLETE`` marker exists. The marker is written after every file it
vouches for has been fsync'ed, and ``os.replace`` of a folder is atomic on POSIX file systems, so a
``kill -9`` at any moment leaves either the old set of checkpoints or the new one. ``latest`` resolves to
the newest good checkpoint; pruning renames a checkpoint to a temp
name before deleting it, so a half-deleted checkpoint is never visible, and it never removes the newest good
one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

from .errors import CheckpointError
from .fsutil import fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a killed run can leave behind: our temp folders and the ".old" side of an install.
_STALE_RE = re.compile(r"^(\.tmp-.+|.+\.old|.+\.tmp-\d+)$")


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
                              f"interrupted while being written or deleted; use an older checkpoint or 'latest'")
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
    """fsync everything in ``tmp``, mark it complete and move it to ``final`` (replacing a same-named one)."""
    fsync_tree(tmp)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(dict(info or {}, time=time.time()), f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if os.path.exists(final):
        # Same-named folder (e.g. re-saving a step): move the old one aside first, so that at every moment
        # one complete copy exists under some name.
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        remove_tree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    return final


def abort(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(path: str) -> None:
    """Delete a folder so that no half-deleted copy is ever visible under its name: it is renamed to a temp
    name first (atomic), then removed; a kill in between leaves a ``.tmp-`` folder that the next start
    collects."""
    parent, name = os.path.split(os.path.abspath(path))
    doomed = os.path.join(parent, f".tmp-removing-{name}")
    if os.path.exists(doomed):
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    fsync_dir(parent)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(output_dir: str, total_limit: int | None, keep: str | None = None) -> list[str]:
    """Keep at most ``total_limit`` complete checkpoints (newest first); never delete ``keep`` or the newest
    complete one. Returns the removed paths."""
    if not total_limit or total_limit <= 0:
        return []
    ckpts = list_checkpoints(output_dir)
    removed = []
    excess = len(ckpts) - total_limit
    for _step, path in ckpts[:-1]:  # the newest good checkpoint is never a candidate
        if excess <= 0:
            break
        if keep and os.path.abspath(path) == os.path.abspath(keep):
            continue
        remove_tree(path)
        removed.append(path)
        excess -= 1
    return removed


def collect_stale(output_dir: str) -> list[str]:
    """Remove what killed runs left in ``output_dir``: temp folders/files of saves that never completed,
    ``<name>.old`` folders of an interrupted install, and checkpoint folders without their marker (a prune
    or a save killed half-way). Returns the removed paths (the caller logs them)."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        stale = bool(_STALE_RE.match(name)) or (bool(_CKPT_RE.match(name)) and os.path.isdir(path)
                                                 and not is_complete(path))
        if not stale:
            continue
        if name.endswith(".old") and not os.path.exists(path[:-4]):
            # The install was killed between moving the old folder aside and moving the new one in:
            # the ".old" copy is the only one, so put it back instead of deleting it.
            os.replace(path, path[:-4])
            removed.append(f"{path} (restored as {path[:-4]})")
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        removed.append(path)
    return removed


def install_folder_contents(src: str, dst: str) -> list[str]:
    """Move a freshly saved output from ``src`` into ``dst`` so that ``dst`` is loadable only when complete.

    When the new content is a pipeline (has ``model_index.json``), the old ``model_index.json`` goes first
    and the new one last (loaders start from it). When it is not (LoRA weights, learned embeddings, a
    ControlNet), an existing pipeline in ``dst`` is left loadable. Returns the names installed.
    """
    os.makedirs(dst, exist_ok=True)
    names = sorted((n for n in os.listdir(src) if n != MARKER), key=lambda n: n == "model_index.json")
    index = os.path.join(dst, "model_index.json")
    if "model_index.json" in names and os.path.exists(index):
        os.remove(index)
    for name in names:
        target = os.path.join(dst, name)
        if os.path.isdir(target) and not os.path.islink(target):
            old = target + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(os.path.join(src, name), target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(os.path.join(src, name), target)
    fsync_dir(dst)
    return names


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


__all__ = ["MARKER", "CheckpointError", "abort", "begin", "check_writable", "collect_stale", "commit",
           "install_folder_contents", "is_complete", "list_checkpoints", "prune", "remove_tree",
           "resolve_resume", "tmp_path_for"]
