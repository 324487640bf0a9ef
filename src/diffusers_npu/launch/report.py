"""The ModelZoo result lines and ``<CaseName>.log`` from ``train_summary.json``.

``<CaseName>.log`` keys, one ``Key = value`` line each:

==============  ================================================================================
Network         the run's network name (``StableDiffusion_text_to_image``, ...)
RankSize        processes in the job, all nodes (WORLD_SIZE)
BatchSize       batch size per device (``--train_batch_size``)
DeviceType      npu, cuda or cpu
CaseName        ``<Network>_bs<BatchSize>_<RankSize>p_acc`` (``_perf`` for the performance runs)
ActualFPS       images per second, all processes together, steady state
TrainingTime    **milliseconds per optimizer step** = global batch x 1000 / ActualFPS (global batch = per-device
                batch x devices x accumulation steps)
ActualLoss      the loss of the last logged step
E2ETrainingTime seconds, all runs into this output folder (resumes included)
==============  ================================================================================
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Tuple

RESULT_HEADER = "------------------ Final result ------------------"
CASE_KEYS = ("Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
             "ActualLoss", "E2ETrainingTime")


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def global_batch(summary: dict) -> int:
    if summary.get("global_batch"):
        return int(summary["global_batch"])
    accumulation = (summary.get("config") or {}).get("gradient_accumulation_steps") or 1
    return int(summary.get("per_device_batch") or 1) * int(summary.get("world_size") or 1) * int(accumulation)


def training_time_ms(summary: dict) -> float:
    """Milliseconds per optimizer step: the global batch over the images/s of all processes."""
    fps = _num(summary.get("images_per_sec"))
    return global_batch(summary) * 1000.0 / fps if fps > 0 else math.nan


def e2e_seconds(summary: dict) -> Tuple[float, float]:
    """``(all runs, this run)`` in seconds."""
    part = _num(summary.get("e2e_seconds"))
    total = _num(summary.get("e2e_seconds_total", part))
    return total, part


def result_lines(summary: dict) -> List[str]:
    total, part = e2e_seconds(summary)
    e2e = f"E2E Training Duration sec : {total:.0f}"
    if len(summary.get("parts") or []) > 1:
        e2e += f" (this run {part:.0f})"
    return [RESULT_HEADER,
            f"Final Performance images/sec : {_num(summary.get('images_per_sec')):.3f}",
            f"Final Train Loss : {_num(summary.get('final_loss')):.6f}",
            e2e]


def case_name(network: str, per_device_batch: int, world: int, suffix: str = "acc") -> str:
    return f"{network}_bs{per_device_batch}_{world}p_{suffix}"


def case_entries(summary: dict, network: str, suffix: str = "acc", device: Optional[str] = None) -> List[tuple]:
    batch = int(summary.get("per_device_batch") or 0)
    world = int(summary.get("world_size") or 1)
    total, _ = e2e_seconds(summary)
    return [("Network", network), ("RankSize", world), ("BatchSize", batch),
            ("DeviceType", summary.get("device") or device or "unknown"),
            ("CaseName", case_name(network, batch, world, suffix)),
            ("ActualFPS", f"{_num(summary.get('images_per_sec')):.3f}"),
            ("TrainingTime", f"{training_time_ms(summary):.2f}"),
            ("ActualLoss", f"{_num(summary.get('final_loss')):.6f}"),
            ("E2ETrainingTime", f"{total:.0f}")]


def write_case_log(folder: str, entries: List[tuple]) -> str:
    """Write ``<folder>/<CaseName>.log`` whole or not at all (temp file + rename)."""
    name = dict(entries)["CaseName"]
    path = os.path.join(folder, f"{name}.log")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{k} = {v}\n" for k, v in entries)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_fresh_summary(path: str, before: Optional[int]) -> Optional[dict]:
    """The summary at ``path`` if this run wrote it (modified after ``before``, its mtime in ns before the run,
    or ``None`` if it did not exist); ``None`` otherwise."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return None
    if before is not None and mtime == before:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def mtime_ns(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def learning_check_verdict(summary: dict) -> Optional[str]:
    """The failure line when the summary's learning check did not pass; ``None`` when it passed or did not run."""
    check = summary.get("learning_check")
    if not isinstance(check, dict) or check.get("passed", True):
        return None
    agreement, threshold = _num(check.get("agreement")), _num(check.get("threshold"))
    return (f"Learning check FAILED: {agreement:.1%} of the generated digits read as the prompt's digit, below "
            f"the threshold {threshold:.1%} (--learning_check_min); see learning_check.png in the output folder")


__all__ = ["CASE_KEYS", "RESULT_HEADER", "case_entries", "case_name", "e2e_seconds", "global_batch",
           "learning_check_verdict", "mtime_ns", "read_fresh_summary", "result_lines", "training_time_ms",
           "write_case_log"]
