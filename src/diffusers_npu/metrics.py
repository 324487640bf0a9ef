"""Throughput and loss bookkeeping, ModelZoo-style log lines, the run summary and its plot.

images/s follows the ModelZoo convention: images of *all* processes divided by the step time minus the time
spent waiting for data. Because the training step never blocks on the device between log points, times are
taken over an interval of steps ending at a host synchronisation.
"""
from __future__ import annotations

import json
import math
import os
import time


class ThroughputMeter:
    """Accumulates (images, wall seconds, data seconds) per interval; steady state skips warm-up steps."""

    def __init__(self, images_per_step: int, warmup_steps: int = 3):
        self.images_per_step = images_per_step
        self.warmup_steps = warmup_steps
        self.history: list[dict] = []  # one row per step: step, loss, fps, lr
        self._steady_images = 0
        self._steady_time = 0.0

    def record_interval(self, first_step: int, steps: list[int], losses: list[float], wall: float, data: float,
                        lrs: list[float] | None = None) -> float:
        compute = max(wall - data, 1e-9)
        n = len(steps)
        fps = self.images_per_step * n / compute
        for i, (s, l) in enumerate(zip(steps, losses)):
            self.history.append({"step": s, "loss": l, "fps": fps, "lr": (lrs[i] if lrs else None),
                                 "data_s": data / n, "step_s": wall / n})
        # Steady state: intervals that lie wholly after warm-up.
        if first_step > self.warmup_steps:
            self._steady_images += self.images_per_step * n
            self._steady_time += compute
        return fps

    @property
    def steady_fps(self) -> float:
        if self._steady_time > 0:
            return self._steady_images / self._steady_time
        fps = [h["fps"] for h in self.history]
        return sum(fps) / len(fps) if fps else 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of steps (at least 1): a single step's loss is too noisy to report."""
        finite = [h["loss"] for h in self.history if math.isfinite(h["loss"])]
        if not finite:
            return float("nan")
        k = max(1, len(finite) // 10)
        return sum(finite[-k:]) / k


def step_line(step: int, max_steps: int, loss: float, fps: float, lr: float | None, extra: dict | None = None) -> str:
    parts = [f"step {step}/{max_steps}", f"step_loss={loss:.6f}", f"FPS: {fps:.3f}"]
    if lr is not None:
        parts.append(f"lr={lr:.3e}")
    for k, v in (extra or {}).items():
        parts.append(f"{k}={v}")
    return " ".join(parts)


def write_json_atomic(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def plot_history(history: list[dict], path: str) -> str | None:
    """Loss and images/s over steps as one PNG (skipped silently if matplotlib is missing)."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [h["step"] for h in history]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    a1.plot(steps, [h["loss"] for h in history], lw=0.8)
    a1.set_ylabel("loss")
    a1.set_yscale("log")
    a2.plot(steps, [h["fps"] for h in history], lw=0.8, color="tab:orange")
    a2.set_ylabel("images/s")
    a2.set_xlabel("step")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
