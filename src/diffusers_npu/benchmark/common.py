"""Shared pieces of the benchmark harnesses: environment record, FLOP counting, timing, tables."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from typing import Iterable, Sequence

import torch


def environment(device: str) -> dict:
    """What a figure needs next to it to be reproducible: card, date, command and software versions."""
    from ..device import device_name

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # not installed / no __version__
            return None

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device,
        "device_name": _safe(lambda: device_name(device)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": getattr(torch.version, "cuda", None),
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "accelerate": version("accelerate"),
        "datasets": version("datasets"),
        "peft": version("peft"),
        "diffusers_npu": version("diffusers_npu"),
        "git_commit": _git_commit(),
    }
    if device == "npu":
        env["torch_npu"] = version("torch_npu")
    if os.environ.get("CI"):
        env["ci"] = True
    return env


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # a description must never stop a benchmark
        return f"unknown ({type(e).__name__})"


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return None


def sync(device: str) -> None:
    from ..device import synchronize

    synchronize(device)


def peak_memory(device: str) -> int:
    from ..device import peak_memory_bytes

    return peak_memory_bytes(device)


def reset_memory(device: str, collect: bool = True) -> None:
    """Free what the previous measurement left (``collect``: run the garbage collector first) and restart the
    peak-memory counter."""
    import gc

    from ..device import empty_cache, reset_peak_memory

    if collect:
        gc.collect()
    empty_cache(device)
    reset_peak_memory(device)


def memory_kind(device: str) -> str:
    if device == "cpu":
        return "process peak RSS so far (CPU; cannot be reset between modes, so it only grows)"
    return "peak bytes allocated by the device allocator during the mode"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_num(x, digits=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:  # nan
            return "-"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{digits}f}" if abs(x) >= 1 else f"{x:.{max(digits, 3)}f}"
    return str(x)


def format_table(headers: Sequence[str], rows: Iterable[Sequence], markdown: bool = False) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    if markdown:
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                         + [line(r) for r in rows])
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in  # noqa: E731
                                   enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def write_json(path: str, data: dict) -> None:
    from ..fsutil import write_json_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, data)


def resolve_device(flag: str | None) -> str:
    from ..device import apply_device_settings, detect_device

    device = detect_device(None if flag in (None, "", "auto") else flag)
    apply_device_settings(device)
    return device


def run_on_device(args, body):
    """Resolve ``args.device`` and run ``body(args)`` with the harnesses' thread policy: 1 torch thread on CPU
    unless ``--threads`` says otherwise (2 threads on a shared 2-core machine were 4-5x slower and erratic).
    The caller's thread count is restored afterwards."""
    old_threads = torch.get_num_threads()
    args.device = resolve_device(args.device)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        return body(args)
    finally:
        torch.set_num_threads(old_threads)


def publish(result: dict, table: str, json_path: str | None) -> dict:
    """Print the table, keep it in the result, and write the result to ``json_path`` when given."""
    print(table, flush=True)
    result["table"] = table
    if json_path:
        write_json(json_path, result)
        print(f"wrote {json_path}", flush=True)
    return result


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def error_line(exc: BaseException) -> str:
    """One line for a failed measurement: the exception's class and first line (OOMs said as such)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
    return ("out of memory: " + line) if is_oom(exc) else line
