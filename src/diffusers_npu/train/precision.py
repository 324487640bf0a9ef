"""Mixed precision: autocast, the loss scaler, and counting the steps fp16 overflow skipped.

Done here rather than by accelerate because accelerate's CPU path silently ignores fp16: this way the same
GradScaler behaviour (skip on overflow, unscale before clipping) runs on every device, tests included. The
scaler comes from the device layer (torch_npu's own on NPU, torch's ShardedGradScaler under FSDP -- on NPU the
class torch_npu patches in for it, its private ``_ShardedGradScaler``). A checkpoint's scaler state from another
device is translated on resume. Under DeepSpeed the engine owns precision and loss scaling, and this class
neither autocasts nor scales.

No host synchronisation per step: after each step the scale is recorded as a device tensor; at a flush
(:meth:`flush`) the recorded scales are read once. A step was skipped exactly when the scale went down.
More than ``max_consecutive`` skipped steps in a row stops the run with a :class:`TrainingError`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import List, Optional

import torch

from ..errors import CheckpointError, TrainingError

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    def __init__(self, mixed_precision: str, device: torch.device, sharded: bool = False,
                 engine_owns_scaling: bool = False, max_consecutive: int = 25):
        self.mode = mixed_precision
        self.device = device
        self.amp_dtype: Optional[torch.dtype] = DTYPES.get(mixed_precision)
        self.weight_dtype = self.amp_dtype or torch.float32
        self.max_consecutive = max_consecutive
        self.engine_owns_scaling = engine_owns_scaling
        self.scaler = None
        if mixed_precision == "fp16" and not engine_owns_scaling:
            from ..device import make_grad_scaler

            self.scaler = make_grad_scaler(device.type, sharded=sharded)
        self._scales: List[torch.Tensor] = []
        self._last_scale: Optional[float] = None   # the scale before the first recorded step
        self.skipped = 0                            # fp16 steps skipped so far (whole run)
        self.consecutive = 0                        # skipped in a row, across flushes

    def autocast(self):
        if self.amp_dtype is None or self.engine_owns_scaling:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: multiplied by the fp16 loss scale when a GradScaler is in use."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer) -> None:
        """Unscale the gradients (before clipping); a no-op without a scaler."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
        # GradScaler keeps its scale as a device tensor (`_scale`): cloning it costs no host sync, unlike
        # get_scale(), which returns a Python float.
        self._scales.append(self.scaler._scale.detach().clone())

    def flush(self) -> int:
        """Read the recorded scales (one host sync), count skipped steps; returns how many were skipped since
        the last flush. Raises TrainingError after too many consecutive skips."""
        if self.scaler is None or not self._scales:
            return 0
        values = torch.cat([s.reshape(1).float() for s in self._scales]).tolist()
        self._scales.clear()
        prev = self._last_scale
        new = 0
        for v in values:
            if prev is not None and v < prev:
                new += 1
                self.consecutive += 1
            else:
                self.consecutive = 0
            prev = v
        self._last_scale = prev
        self.skipped += new
        if new:
            logger.warning("fp16 overflow: the GradScaler skipped %d step(s) (scale now %g)", new, prev)
        if self.consecutive > self.max_consecutive:
            raise TrainingError(
                f"fp16: the last {self.consecutive} steps all overflowed and were skipped (scale now {prev:g}); "
                f"the run is not training. Lower --learning_rate, use --mixed_precision bf16 or no, or raise "
                f"--max_consecutive_overflows; the last complete checkpoint is intact")
        return new

    def first_scale(self) -> None:
        """Remember the scale before the first step (one host sync at set-up, none in the loop)."""
        if self.scaler is not None and self._last_scale is None:
            self._last_scale = float(self.scaler.get_scale())

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        """Resume the scaler; a state saved on another device (torch's scaler on CUDA/CPU, torch_npu's on NPU)
        is translated by :func:`diffusers_npu.device.translate_scaler_state`, or refused with the reason."""
        if self.scaler is not None and state.get("scaler") is not None:
            from ..device import translate_scaler_state

            try:
                translated = translate_scaler_state(state["scaler"], self.scaler)
            except ValueError as exc:
                raise CheckpointError(f"cannot resume the fp16 loss scaler on {self.device.type}: {exc}; resume "
                                    f"with --mixed_precision bf16 or no, or start a new run") from None
            self.scaler.load_state_dict(translated)
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self._last_scale = None
