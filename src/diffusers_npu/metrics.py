"""Throughput and loss bookkeeping, ModelZoo-style log lines and the loss / images-per-second plot.

images/s follows the ModelZoo convention: images of *all* processes divided by the step time minus the time
spent waiting for data. Because the training step never blocks on the device between flushes, times are
taken over the interval of steps that ends at a flush (a host synchronisation).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional

import torch


class LossBuffer:
    """Per-step values (the loss, task metrics, the gradient norm) kept as device tensors until a flush."""

    def __init__(self):
        self.steps: List[int] = []
        self.lrs: List[float] = []
        self.values: Dict[str, List[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, lr: float, values: Dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        self.lrs.append(lr)
        for name, v in values.items():
            if hasattr(v, "full_tensor"):  # a DTensor (FSDP's gradient norm): its value, no host sync
                v = v.full_tensor()
            self.values.setdefault(name, []).append(v.detach().float().reshape(()))

    def flush(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> List[dict]:
        """One row per step, read from the device in ONE transfer (after ``reduce``, e.g. a mean over
        ranks). Clears the buffer."""
        if not self.steps:
            return []
        names = [n for n in self.values if len(self.values[n]) == len(self.steps)]
        stacked = torch.stack([torch.stack(self.values[n]) for n in names])  # [names, steps]
        if reduce is not None:
            stacked = reduce(stacked)
        table = stacked.tolist()
        rows = [{"step": s, "lr": lr, **{n: table[i][j] for i, n in enumerate(names)}}
                for j, (s, lr) in enumerate(zip(self.steps, self.lrs))]
        self.steps, self.lrs, self.values = [], [], {}
        return rows


class ThroughputMeter:
    """Accumulates (images, wall seconds, data seconds) per interval; steady state skips warm-up steps."""

    def __init__(self, images_per_step: int, warmup_steps: int = 3, history: Optional[List[dict]] = None):
        self.images_per_step = images_per_step
        self.warmup_steps = warmup_steps
        self.history: List[dict] = list(history or [])  # one row per step: step, loss, fps, lr, ...
        self._steady_images = 0
        self._steady_time = 0.0

    def record(self, first_step: int, rows: List[dict], wall: float, data: float) -> float:
        n = len(rows)
        compute = max(wall - data, 1e-9)
        fps = self.images_per_step * n / compute
        for r in rows:
            self.history.append({**r, "fps": fps, "data_s": data / n, "step_s": wall / n})
        if first_step > self.warmup_steps:  # intervals wholly after warm-up make the steady figure
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


def step_line(step: int, max_steps: int, loss: float, fps: float, lr: Optional[float],
              extra: Optional[dict] = None) -> str:
    """The per-step log line (the launcher and ModelZoo tooling parse it): ``step N/M step_loss=L FPS: F lr=X``
    followed by ``key=value`` tokens."""
    parts = [f"step {step}/{max_steps}", f"step_loss={loss:.6f}", f"FPS: {fps:.3f}"]
    if lr is not None:
        parts.append(f"lr={lr:.3e}")
    for k, v in (extra or {}).items():
        parts.append(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def plot_history(history: List[dict], path: str) -> Optional[str]:
    """Loss and images/s over steps as one PNG (None if matplotlib is missing)."""
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
    if all(h["loss"] > 0 for h in history if math.isfinite(h["loss"])):
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
