"""Run the planned command: every line of its output goes to the log file (appended, after a marker line),
step lines drive the terminal's progress display, and a few lines are relayed to the terminal as they come.

The child runs in its own session, so a Ctrl-C or SIGTERM reaches it once, forwarded by the launcher (a
terminal would otherwise signal the whole process group, and torchrun would pass a second copy to its
workers): the trainer then saves a checkpoint and exits as pre-empted. Under torchrun the launcher signals
torchrun's workers themselves, not torchrun: torchrun, signalled, gives its workers only its shutdown timeout
(30 s unless ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) before SIGKILL and exits 1 with a ``SignalException``; workers
signalled directly save for as long as they need, exit 0, and torchrun exits 0 with them.
"""
from __future__ import annotations

import collections
import datetime
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from typing import List

from .progress import Progress, parse_step

MARKER_RE = re.compile(r"^==== diffusers-npu launch: part (\d+) ")
# Child lines worth seeing on the terminal as they happen (everything is in the log file).
RELAY_PREFIXES = ("error:", "CPU threads:")
RESUMED_RE = re.compile(r"\bresumed from (.+)$", re.IGNORECASE)
TAIL_LINES = 25
# kept: enough to hold torchrun's closing traceback too, which the report leaves out
KEPT_LINES = 100


@dataclass
class RunResult:
    returncode: int
    part: int                                    # 1 for the first run into this log, 2 for the first rerun...
    tail: List[str] = field(default_factory=list)        # this run's last lines, for failure reports
    learning_check: List[str] = field(default_factory=list)
    preempted_line: bool = False
    forwarded_signal: bool = False


def count_parts(log_path: str) -> int:
    """How many runs have written to ``log_path`` (its marker lines)."""
    if not os.path.isfile(log_path):
        return 0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if MARKER_RE.match(line))


def marker(part: int, command_text: str) -> str:
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (f"==== diffusers-npu launch: part {part} of this log, started {when} on {socket.gethostname()} ====\n"
            f"==== command: {command_text}\n")


def children(pid: int) -> List[int]:
    """The direct child processes of ``pid`` (Linux ``/proc``; empty where it cannot be read)."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(name))
    return found


def execute(command: List[str], env: dict, log_path: str, progress: Progress, command_text: str = "",
            after_last_step: str = "", workers_of_child: bool = False) -> RunResult:
    """Run ``command`` with ``env`` added to the environment; return its exit status and what was seen.
    ``workers_of_child``: the command is torchrun, whose child processes (the ranks) get the signals."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    part = count_parts(log_path) + 1
    result = RunResult(returncode=0, part=part)
    tail = collections.deque(maxlen=KEPT_LINES)
    child_env = dict(os.environ, **env)
    child_env["PYTHONUNBUFFERED"] = "1"  # step lines reach the pipe when printed, not when a buffer fills
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(marker(part, command_text or " ".join(command)))
        log.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                                start_new_session=True)

        def forward(signum, _frame):
            result.forwarded_signal = True
            if proc.poll() is not None:
                return
            sig = signal.SIGTERM if signum == signal.SIGHUP else signum
            ranks = children(proc.pid) if workers_of_child else []
            for pid in ranks:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if not ranks:  # one process, or the ranks are not started yet: torchrun itself
                proc.send_signal(sig)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                previous[sig] = signal.signal(sig, forward)
            except ValueError:  # not the main thread: signals stay with their current handlers
                pass
        said_done = False
        try:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                log.write(line)
                log.flush()
                text = line.rstrip("\r\n")
                tail.append(text)
                step = parse_step(text)
                if step is not None:
                    progress.step(step)
                    if step.step >= step.total and not said_done and after_last_step:
                        progress.message(after_last_step)
                        said_done = True
                elif text.startswith("Learning check"):
                    result.learning_check.append(text)
                elif text.startswith("Pre-empted"):
                    result.preempted_line = True
                elif text.startswith(RELAY_PREFIXES):
                    progress.message(text)
                elif RESUMED_RE.search(text):
                    progress.message("Resumed from " + RESUMED_RE.search(text).group(1))
            result.returncode = proc.wait()
        finally:
            if proc.poll() is None:  # the launcher itself is failing: do not leave the trainer orphaned
                proc.terminate()
                proc.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            progress.end_line()
    result.tail = list(tail)
    return result


__all__ = ["MARKER_RE", "RunResult", "children", "count_parts", "execute", "marker"]
