"""What the processes of one job must agree on, and what they say when one of them is gone.

* :func:`process_state` -- the process group, made once per process with the ``--nccl_timeout`` (upstream
  diffusers' name; it applies to every backend: NCCL, HCCL, gloo). Long single-process phases (class-image
  generation, validation, the learning check, the final save) run while the other ranks wait in a collective;
  torch's defaults (10 minutes for NCCL, 30 for gloo) would kill a job whose phase is merely long.
* :func:`writers_first` -- one writer per shared folder: the global main process first, then the main process
  of each other node (a no-op where the folder is shared: everything already exists; a node-local folder gets
  its own single writer), then the rest, who only read.
* :func:`check_same_folder` -- several nodes need ``--output_dir`` on a filesystem every node shares (each
  rank writes its own shards and RNG state into the same checkpoint folder). Rank 0 writes a token file there;
  every rank must see it, or every rank stops at start with one line naming the ranks and hosts that did not.
* :func:`record_exit` -- each rank records its exit code where the launcher reads it
  (``$DIFFUSERS_NPU_EXIT_DIR``): torchrun turns any failing rank's code into 1.
* :func:`peer_lost_message` -- when a peer rank dies, the survivors' collective fails with a raw backend
  error ("Connection closed by peer"); this turns it into one line: who left, and the checkpoint to resume from.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Callable, List, Optional, Tuple

from ..errors import UsageError

#: seconds a collective may wait before the job fails (--nccl_timeout's default; see its help)
DEFAULT_TIMEOUT_S = 3600
#: where the launcher asks each rank to record its exit code (``rank-<RANK>.json``)
EXIT_DIR_ENV = "DIFFUSERS_NPU_EXIT_DIR"
#: how long a rank looks for rank 0's token file before saying it does not see it (network filesystems may
#: show a new file to other clients a little late)
VISIBLE_WITHIN_S = 5.0

# (host, pid) of every rank, filled in by check_same_folder: who a dead peer was.
_peers: List[Tuple[str, int]] = []


def process_state(device_kind: str, timeout_s: Optional[float] = None):
    """accelerate's ``PartialState`` (the process group) with the job's collective timeout. The first call in a
    process creates the group; later calls return the same state (accelerate keeps one per process)."""
    from datetime import timedelta

    from accelerate import PartialState

    kwargs = {}
    if timeout_s:
        kwargs["timeout"] = timedelta(seconds=float(timeout_s))
    return PartialState(cpu=device_kind == "cpu", **kwargs)


def group_timeout_s() -> Optional[float]:
    """The default process group's timeout in seconds as its backend holds it (None without a group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.distributed_c10d._get_default_group()
    backend = group._get_backend(torch.device("cpu"))
    return backend.options._timeout.total_seconds()


@contextlib.contextmanager
def writers_first(is_main: bool, is_local_main: bool, barrier: Callable[[], None]):
    """Run the body on the global main process, then on each other node's main process, then on the rest;
    everybody leaves together. The body writes only on a node's main process and only what is missing, so a
    shared folder has exactly one writer (the global main) and a node-local one has one per node."""
    if not is_main:
        barrier()  # the global main writes first
    if not is_local_main:
        barrier()  # then the other nodes' main processes
    try:
        yield
    finally:
        if is_main:
            barrier()
        if is_local_main:
            barrier()


def _world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def check_same_folder(folder: str, flag: str = "--output_dir") -> None:
    """Every rank must see the file rank 0 writes into ``folder`` (already created by rank 0); otherwise raise
    the same :class:`UsageError` on every rank, naming the ranks and hosts that did not see it."""
    global _peers
    dist = _world()
    if dist is None:
        return
    import uuid

    rank = dist.get_rank()
    box = [None]
    if rank == 0:
        box = [f".tmp-same-folder-{uuid.uuid4().hex}"]  # .tmp-: collected if left by a kill
        with open(os.path.join(folder, box[0]), "w", encoding="utf-8") as f:
            f.write(socket.gethostname())
            f.flush()
            os.fsync(f.fileno())
    dist.broadcast_object_list(box, src=0)
    token = os.path.join(folder, box[0])
    seen = _appears(token, VISIBLE_WITHIN_S)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (socket.gethostname(), os.getpid(), seen))
    if rank == 0:
        with contextlib.suppress(OSError):
            os.remove(token)
    _peers = [(host, pid) for host, pid, _ in rows]
    blind = [(r, host) for r, (host, _, ok) in enumerate(rows) if not ok]
    if blind:
        ranks = ", ".join(str(r) for r, _ in blind)
        hosts = ", ".join(sorted({h for _, h in blind}))
        raise UsageError(
            f"{flag} {folder} is not one shared folder: rank{'s' if len(blind) > 1 else ''} {ranks} (host "
            f"{hosts}) did not see the file rank 0 (host {rows[0][0]}) wrote there. With several nodes, "
            f"{flag} must be on a filesystem every node mounts at the same path (NFS, Lustre, ...): give that "
            f"path on every node; nothing was trained")


def _appears(path: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        if os.path.isfile(path):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------ exit codes
def record_exit(rc: int, error: str = "") -> None:
    """Write this rank's exit code where the launcher reads it (only when it asked, via the environment)."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    path = os.path.join(folder, f"rank-{rank}.json")
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"rank": int(rank), "rc": int(rc), "host": socket.gethostname(), "error": error}, f)
        os.replace(path + ".tmp", path)
    except OSError:  # the launcher then falls back to torchrun's own exit status
        pass


def read_exits(folder: str) -> dict:
    """``{rank: record}`` of the ranks that recorded their exit in ``folder``."""
    out = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith("rank-") and name.endswith(".json"):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    rec = json.load(f)
                out[int(rec["rank"])] = rec
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return out


def job_exit_code(records: dict, process_rc: int) -> int:
    """The job's exit code: rank 0's when it failed, else the lowest failing rank's, else (nothing recorded
    a failure) the process's own (torchrun's or the single trainer's)."""
    failing = sorted(r for r, rec in records.items() if rec.get("rc"))
    if failing:
        return int(records[failing[0]]["rc"])
    return process_rc


# ------------------------------------------------------------------------------------------ a peer left
# What torch's backends say when the other end of a collective is gone (gloo, NCCL, HCCL).
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
              "remote process exited", "ncclremoteerror", "ncclsystemerror", "timed out", "timeout")


def is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank is gone (or stuck past the timeout)."""
    if _world() is None:
        return False
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistBackendError", None), getattr(dist, "DistNetworkError", None),
                              getattr(dist, "DistError", None)) if k is not None)
    if kinds and isinstance(exc, kinds):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _PEER_GONE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed rank stays a zombie until torchrun reaps it
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _survivors_folder(output_dir: str) -> str:
    """Where the ranks that saw a peer fail sign in (the shared output folder; ``.tmp-`` folders are collected
    at the next start), so that a survivor that has already exited is not taken for the one that died."""
    key = f"{_peers[0][0]}-{_peers[0][1]}" if _peers else "job"
    return os.path.join(output_dir, f".tmp-survivors-{key}")


def gone_peers(output_dir: str) -> List[str]:
    """The ranks that died: those on this host whose process no longer exists and that did not sign in as
    survivors (the others of a torn-down job exit soon after the first failure)."""
    folder = _survivors_folder(output_dir)
    rank = os.environ.get("RANK", "0")
    with contextlib.suppress(OSError):
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f"rank-{rank}"), "w").close()
    here = socket.gethostname()
    me = os.getpid()
    dead = [r for r, (host, pid) in enumerate(_peers) if host == here and pid != me and not _alive(pid)]
    return [f"rank {r} (host {_peers[r][0]}, pid {_peers[r][1]})" for r in dead
            if not os.path.exists(os.path.join(folder, f"rank-{r}"))]


def peer_lost_message(output_dir: str, exc: BaseException) -> str:
    """The one line (without ``error:``) a surviving rank prints instead of the backend's traceback."""
    from ..checkpoint import list_checkpoints

    gone = gone_peers(output_dir)
    if gone:
        who = ", ".join(gone) + (" has" if len(gone) == 1 else " have") + " ended"
    else:
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        who = f"a peer rank left or stopped answering (a rank on another node, or stuck; the backend said: {text})"
    # No collective here (the peers are gone or stuck in another one) and nothing renamed (every survivor runs
    # this at once): the newest checkpoint whose COMPLETE marker exists; the rerun's resume verifies it.
    done = list_checkpoints(output_dir)
    latest = done[-1][1] if done else None
    if latest:
        then = (f"the last complete checkpoint is {latest}: rerun the same command (with "
                f"--resume_from_checkpoint latest) to continue from it")
    else:
        then = f"there is no complete checkpoint in {output_dir} yet: a rerun starts from the beginning"
    return f"the job lost a process: {who}; {then}"


__all__ = ["DEFAULT_TIMEOUT_S", "EXIT_DIR_ENV", "check_same_folder", "group_timeout_s", "is_peer_failure",
           "job_exit_code", "peer_lost_message", "process_state", "read_exits", "record_exit", "writers_first"]
