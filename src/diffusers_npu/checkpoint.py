"""Crash-safe folders: write into a temporary folder, fsync, mark complete, then rename into place.

Layout of ``output_dir``::

    checkpoint-500/             complete checkpoint (has the COMPLETE marker)
    .tmp-checkpoint-1000/       a save in progress, or one killed mid-way: never read; collected at start-up
    .tmp-pipeline/              the final save in progress (same rule)
    checkpoint-750.damaged/     failed verification against its manifest at resume: kept for inspection, never
                                resumed, counted, pruned or collected
    unet.old/                   left by a kill inside :func:`install_folder_contents`; collected at start-up

A folder is *good* only when its ``COMPLETE`` marker exists. The marker is written after every file it
vouches for has been listed in ``manifest.json`` (size and CRC of every file, checked across ranks: see
:mod:`diffusers_npu.manifest`) and fsync'ed, and ``os.replace`` of a folder is atomic on POSIX file systems, so a
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

from . import manifest
from .errors import CheckpointDamaged, CheckpointError
from .fsutil import fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a killed run can leave behind: our temp folders and the ".old" side of an install.
_STALE_RE = re.compile(r"^(\.tmp-.+|.+\.old|.+\.tmp-\d+)$")


class Ranks:
    """The processes taking part in a save or a resume: rank, world size and the collectives the protocol
    needs (torch.distributed's default group when it is initialised -- DDP, FSDP and DeepSpeed all run on it --
    else one process)."""

    def __init__(self):
        self.dist = None
        self.rank, self.world = 0, 1
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self.dist, self.rank, self.world = dist, dist.get_rank(), dist.get_world_size()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def from_main(self, obj):
        """The main process's ``obj`` on every rank."""
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, on every rank."""
        if self.dist is None:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out


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


def read_marker(path: str) -> dict:
    """The COMPLETE marker's content ({} for an empty or unreadable marker of an earlier version)."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def check(path: str, hashes: bool = True) -> str | None:
    """None when the checkpoint at ``path`` matches its manifest (or has none: earlier versions), else one
    sentence naming the damaged file and what was expected."""
    marker = read_marker(path)
    if not marker.get("manifest") and not os.path.isfile(os.path.join(path, manifest.MANIFEST)):
        return None
    return manifest.verify(path, marker, hashes=hashes)


def mark_damaged(path: str) -> str:
    """Rename a damaged checkpoint to ``<name>.damaged`` (``.damaged-2``, ... if taken): kept for inspection,
    and no longer a ``checkpoint-N`` name, so it is never resumed, counted, pruned or collected."""
    base = os.path.normpath(path)
    target, n = base + ".damaged", 2
    while os.path.exists(target):
        target, n = f"{base}.damaged-{n}", n + 1
    os.replace(path, target)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return target


def _select(resume_from: str | None, output_dir: str, hashes: bool) -> str | None:
    """Main process: the checkpoint to resume from (see :func:`resolve_resume`)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        for step, path in reversed(list_checkpoints(output_dir)):
            problem = check(path, hashes)
            if problem is None:
                if not os.path.isfile(os.path.join(path, manifest.MANIFEST)):
                    logger.info("%s has no %s (written by an earlier version): resuming without verifying its files",
                                path, manifest.MANIFEST)
                return path
            moved = mark_damaged(path)
            older = [p for _s, p in list_checkpoints(output_dir)]
            logger.warning("checkpoint %s is damaged: %s; renamed to %s (kept for inspection); %s", path, problem,
                           os.path.basename(moved), "trying " + os.path.basename(older[-1]) if older
                           else "no other checkpoint: starting from step 0")
        return None
    path = resume_from
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(output_dir, resume_from)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume_from_checkpoint: {resume_from!r} does not exist "
                              f"(expected a checkpoint-N folder or 'latest')")
    if not is_complete(path):
        raise CheckpointError(f"--resume_from_checkpoint: {path} is incomplete (no {MARKER} marker): it was "
                              f"interrupted while being written or deleted; use an older checkpoint or 'latest'")
    problem = check(path, hashes)
    if problem:
        raise CheckpointDamaged(f"--resume_from_checkpoint: {path} is damaged: {problem}; resume from an earlier "
                                f"checkpoint, or use 'latest' to fall back to the newest one that verifies")
    if not os.path.isfile(os.path.join(path, manifest.MANIFEST)):
        logger.info("%s has no %s (written by an earlier version): resuming without verifying its files", path,
                    manifest.MANIFEST)
    return path


def resolve_resume(resume_from: str | None, output_dir: str, hashes: bool = True,
                   ranks: "Ranks | None" = None) -> str | None:
    """Turn ``--resume_from_checkpoint`` into a checkpoint folder (or None to start fresh). Collective: every
    rank calls it; the main process decides and every rank gets its answer (or its error).

    ``latest`` picks the newest complete checkpoint in ``output_dir`` that verifies against its manifest
    (sizes always, CRCs with ``hashes``); a damaged one is renamed ``<name>.damaged`` with one warning line
    and the next older one is tried; None when none is left (so rerunning the same command after a
    pre-emption just continues). An explicit path must be a complete checkpoint that verifies, else a
    CheckpointError names it (a damaged one: :class:`CheckpointDamaged`, exit 3).
    """
    ranks = ranks or Ranks()
    answer = None
    if ranks.is_main:
        try:
            answer = ("ok", _select(resume_from, output_dir, hashes))
        except CheckpointError as e:
            answer = (type(e).__name__, str(e))
    kind, value = ranks.from_main(answer)
    if kind != "ok":
        raise (CheckpointDamaged if kind == "CheckpointDamaged" else CheckpointError)(value)
    return value


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


def commit(tmp: str, final: str, info: dict | None = None, ranks: "Ranks | None" = None) -> str:
    """Write the manifest, fsync everything in ``tmp``, mark it complete and move it to ``final`` (replacing a
    same-named one). Collective: every rank calls it after writing its files (the listing and the CRCs are
    shared out over the ranks, see :mod:`diffusers_npu.manifest`); only the main process writes the marker and
    renames. A rank that sees other files than the main process is refused (CheckpointError on every rank)."""
    ranks = ranks or Ranks()
    error = None
    try:
        manifest.write_rank_part(tmp, ranks.rank, ranks.world)
    except OSError as e:  # e.g. the disk filled up on this rank: every rank must learn it, not wait forever
        error = e
    failed = ranks.gather(None if error is None else f"rank {ranks.rank}: {error}")
    if error is not None:
        raise error
    if any(failed):
        raise CheckpointError(f"{final} was not committed: {next(f for f in failed if f)}")
    answer = None
    if ranks.is_main:
        try:
            merged = manifest.merge_rank_parts(tmp, ranks.world)
            answer = ("ok", len(merged["files"]))
        except CheckpointError as e:
            answer = ("error", str(e))
        except OSError as e:
            answer = ("oserror", e)
    kind, value = ranks.from_main(answer)
    if kind == "oserror":
        raise value
    if kind == "error":
        raise CheckpointError(value)
    if not ranks.is_main:
        return final
    fsync_tree(tmp)
    vouch = {"manifest": manifest.MANIFEST, "manifest_crc32": manifest.file_crc(os.path.join(tmp, manifest.MANIFEST)),
             "files": value}
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(dict(info or {}, **vouch, time=time.time()), f)
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


__all__ = ["MARKER", "CheckpointDamaged", "CheckpointError", "abort", "check", "begin", "check_writable", "collect_stale", "commit",
           "install_folder_contents", "is_complete", "list_checkpoints", "mark_damaged", "prune",
           "read_marker", "remove_tree", "resolve_resume", "tmp_path_for", "Ranks"]
