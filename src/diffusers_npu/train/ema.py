"""Exponential moving average of the trained weights (``--use_ema``, ``--offload_ema``, ``--foreach_ema``).

The decay follows diffusers' ``EMAModel`` defaults, so results match the upstream scripts: at optimizer step
``n`` the decay is ``min(ema_decay, (1 + k) / (10 + k))`` with ``k = n - 1`` (0 for the first step, which
copies the weights). Written here instead of using ``EMAModel`` because the shadows must follow the
parameters' layout: under FSDP each shadow is the same kind of shard as its parameter (a ``DTensor``), so
the EMA is sharded for free and saved shard-aware like the model (``<model>_ema/`` in diffusers format).
Python floats only: no host synchronisation per step.
"""
from __future__ import annotations

from typing import Dict, List

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, offload: bool = False, foreach: bool = False):
        self.model = model
        self.decay = decay
        self.offload = offload
        self.foreach = foreach
        self.step_count = 0
        self._stash = None
        # Shadows for every state entry (buffers too) so that "<model>_ema/" is a complete model folder;
        # only trained parameters move.
        self.names: List[str] = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        device = "cpu" if offload else None
        self.shadow: Dict[str, torch.Tensor] = {
            n: t.detach().clone().to(device) if device else t.detach().clone()
            for n, t in model.state_dict().items()}

    def current_decay(self) -> float:
        k = max(0, self.step_count - 1)
        if k <= 0:
            return 0.0
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        w = 1.0 - self.current_decay()
        shadows = [self.shadow[n] for n in self.names]
        if self.offload:
            # One round trip per step: the shadows live in host memory between updates.
            moved = [s.to(p.device, non_blocking=True) for s, p in zip(shadows, self.params)]
            self._update(moved, w)
            for s, m in zip(shadows, moved):
                s.copy_(m, non_blocking=True)
        else:
            self._update(shadows, w)

    def _update(self, shadows, w: float) -> None:
        params = [p.detach() for p in self.params]
        if self.foreach:
            torch._foreach_lerp_(shadows, params, w)
        else:
            for s, p in zip(shadows, params):
                s.lerp_(p, w)

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the averaged weights into the model (before the final validation and save, as upstream does);
        the training weights are kept aside (CPU) for :meth:`swap_out`."""
        self._stash = [p.detach().to("cpu", copy=True) for p in self.params]
        for n, p in zip(self.names, self.params):
            p.copy_(self.shadow[n].to(p.device))

    @torch.no_grad()
    def swap_out(self) -> None:
        """Undo :meth:`swap_in` (a checkpoint must hold the training weights, not the averaged ones)."""
        for p, saved in zip(self.params, self._stash or []):
            p.copy_(saved.to(p.device))
        self._stash = None

    def state_for_save(self) -> Dict[str, torch.Tensor]:
        return self.shadow

    def load(self, shadow: Dict[str, torch.Tensor], step_count: int) -> None:
        for n, t in shadow.items():
            if n in self.shadow:
                self.shadow[n].copy_(t)
        self.step_count = int(step_count)
