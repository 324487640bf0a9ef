"""Checkpoints of a training run: what goes in, how it is written safely, and how a run resumes exactly.

``checkpoint-N/`` holds the trained models in the form users load (``unet/`` in diffusers format,
``unet_ema/`` with EMA, ``controlnet/``, ``text_encoder/``, ``pytorch_lora_weights.safetensors``,
``learned_embeds.safetensors``; written by the task) next to what an exact resume needs:

    train_state.json      step, data position, counters, loss history, the run's fingerprint
    optimizer.pt          optimizer state (one process / DDP)
    optimizer/            sharded optimizer state, one file per rank (FSDP, torch.distributed.checkpoint)
    deepspeed/            the DeepSpeed engine's own checkpoint (ZeRO shards)
    lr_scheduler.pt, precision.pt (GradScaler), rng_<rank>.pt

It is written through the crash-safe protocol of :mod:`diffusers_npu.checkpoint` (temp folder, fsync,
COMPLETE marker, rename). Before the marker is written every rank checks on its device that the trained
weights and the optimizer state are finite (one host sync per save): a checkpoint of poisoned weights is
never committed. Resume reads this layout and the one of earlier versions (``unet.safetensors``,
``ema.pt``), and refuses a run whose batch, resolution, seed, data or world size changed.
"""
from __future__ import annotations

import json
import logging
import os
import random
from typing import Optional

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..errors import CheckpointError, TrainingError
from ..fsutil import is_disk_full, write_json_atomic

logger = logging.getLogger(__name__)

#: flags whose change makes an exact resume impossible (the data a step sees would differ)
FINGERPRINT_FLAGS = ("train_batch_size", "gradient_accumulation_steps", "resolution", "seed", "max_train_samples",
                     "aspect_ratio_buckets", "center_crop", "random_flip", "cache_latents", "streaming",
                     "shuffle_buffer_size")


class TrainState:
    """Counters that survive a restart (train_state.json)."""

    def __init__(self):
        self.global_step = 0
        self.position = 0          # global micro-batches consumed from the sampler
        self.bad_steps = 0         # non-finite fp32/bf16 losses skipped (--max_bad_steps)
        self.bad_images = 0        # rows replaced by --skip_bad_images
        self.history: list = []    # one row per step (loss, lr, fps, ...)
        self.fingerprint: dict = {}
        self.ema_steps = 0
        self.precision: dict = {}

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if k in self.__dict__:
                setattr(self, k, v)
        # earlier versions counted fp16 skips here
        if "overflow_steps" in d and not self.precision:
            self.precision = {"skipped": d["overflow_steps"]}


def fingerprint(args, world_size: int, num_samples: int) -> dict:
    fp = {k: getattr(args, k, None) for k in FINGERPRINT_FLAGS}
    fp.update(world_size=world_size, num_samples=num_samples, learning_rate=args.learning_rate,
              task=getattr(args, "task_name", None))
    return fp


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    npu = getattr(torch, "npu", None)
    if npu is not None and hasattr(npu, "get_rng_state_all"):
        try:
            state["npu"] = npu.get_rng_state_all()
        except Exception:  # torch_npu present but no device
            pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "npu" in state and hasattr(getattr(torch, "npu", None), "set_rng_state_all"):
        torch.npu.set_rng_state_all(state["npu"])


def _load(path: str, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"--resume_from_checkpoint: {os.path.dirname(path)} has no {what} "
                              f"({os.path.basename(path)}); the checkpoint is incomplete") from None


class Checkpointer:
    """Saves and restores a Trainer's state (needs its accelerator, task, model, optimizer, ...)."""

    def __init__(self, trainer):
        self.t = trainer

    # ------------------------------------------------------------------------------------------- save
    def save(self) -> str:
        t = self.t
        a, acc, rt = t.args, t.accelerator, t.rt
        step = t.state.global_step
        final = os.path.join(a.output_dir, f"checkpoint-{step}")
        tmp = ckpt.tmp_path_for(final)
        if rt.is_main:
            t.ledger.begin(tmp)
            ckpt.begin(final)
        acc.wait_for_everyone()
        try:
            self._write(tmp)
            self._check_finite(final)
        except BaseException as e:
            full = is_disk_full(e, a.output_dir)  # before the temp folder goes and frees the space
            if rt.is_main:
                ckpt.abort(tmp)
                t.ledger.done(temp=tmp)
            if full:
                raise TrainingError(f"disk full while writing {final}: {str(e).splitlines()[0] if str(e) else e}; "
                                    f"{t.ledger.safety_note()}") from None
            raise
        acc.wait_for_everyone()
        if rt.is_main:
            ckpt.commit(tmp, final, {"step": step, "world_size": rt.world_size, "layout": 2})
            t.ledger.done(temp=tmp, final=final)
            for removed in ckpt.prune(a.output_dir, a.checkpoints_total_limit, keep=final):
                logger.info("removed old checkpoint %s", removed)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _write(self, tmp: str) -> None:
        t = self.t
        rt = t.rt
        ema_state = t.ema.state_for_save() if t.ema is not None else None
        t.task.save_trained(tmp, ema_state=ema_state)
        torch.save(_rng_state(), os.path.join(tmp, f"rng_{rt.rank}.pt"))
        if t.deepspeed:
            t.model.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state")
        elif rt.sharded:
            self._save_sharded_optimizer(os.path.join(tmp, "optimizer"))
        elif rt.is_main:
            torch.save(t.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        if rt.is_main:
            torch.save(t.lr_scheduler.state_dict(), os.path.join(tmp, "lr_scheduler.pt"))
            torch.save(t.precision.state_dict(), os.path.join(tmp, "precision.pt"))
            t.state.ema_steps = t.ema.step_count if t.ema is not None else 0
            t.state.precision = {"skipped": t.precision.skipped, "consecutive": t.precision.consecutive}
            write_json_atomic(os.path.join(tmp, "train_state.json"), t.state.state_dict())

    def _save_sharded_optimizer(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.t.model, self.t.optimizer)
        dcp.save({"optimizer": osd}, checkpoint_id=folder)

    def _check_finite(self, final: str) -> None:
        """Refuse to commit non-finite trained weights or optimizer state (checked on the device)."""
        from .weights import local_tensor

        t = self.t
        tensors = [local_tensor(p.detach()) for p in t.params]
        for state in t.optimizer.state.values():
            tensors += [local_tensor(v) for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        flags = [torch.isfinite(x).all() for x in tensors if x.numel()]
        bad = (~torch.stack(flags).all()).float().reshape(1) if flags else torch.zeros(1, device=t.rt.device)
        if t.rt.world_size > 1:
            bad = t.accelerator.reduce(bad.to(t.rt.device), reduction="sum")
        if bad.item() > 0:
            raise TrainingError(
                f"step {t.state.global_step}: the trained weights or the optimizer state hold NaN/inf, so {final} "
                f"was not written; {t.ledger.safety_note()}. Lower --learning_rate or set --max_grad_norm")

    # ------------------------------------------------------------------------------------------- load
    def load(self, path: str) -> Optional[dict]:
        """Restore everything but the RNG state, which is returned (set it after the data loader starts)."""
        t = self.t
        state_file = os.path.join(path, "train_state.json")
        try:
            with open(state_file) as f:
                saved = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"--resume_from_checkpoint: {path} has no train_state.json; the checkpoint is "
                                  f"incomplete or was not written by diffusers-npu") from None
        self._check_fingerprint(path, saved.get("fingerprint") or {})
        ema = t.task.load_trained(path)
        if t.ema is not None:
            if ema is None:
                ema = self._old_ema(path)
            if ema is None:
                raise CheckpointError(f"--resume_from_checkpoint: {path} has no EMA weights but --use_ema is on")
            t.ema.load(ema, saved.get("ema_steps") or saved.get("ema_optimization_step") or 0)
        if t.deepspeed:
            t.model.load_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        elif t.rt.sharded:
            self._load_sharded_optimizer(os.path.join(path, "optimizer"))
        else:
            t.optimizer.load_state_dict(_load(os.path.join(path, "optimizer.pt"), "optimizer state"))
        t.lr_scheduler.load_state_dict(_load(os.path.join(path, "lr_scheduler.pt"), "scheduler state"))
        self._apply_learning_rate(saved.get("fingerprint") or {})
        prec = os.path.join(path, "precision.pt")
        old_scaler = os.path.join(path, "scaler.pt")
        if os.path.isfile(prec):
            t.precision.load_state_dict(_load(prec, "precision state"))
        elif os.path.isfile(old_scaler) and t.precision.scaler is not None:
            t.precision.scaler.load_state_dict(_load(old_scaler, "scaler state"))
        t.state.load_state_dict(saved)
        t.state.fingerprint = self.current_fingerprint()
        rng_file = os.path.join(path, f"rng_{t.rt.rank}.pt")
        logger.info("resumed from %s at step %d", path, t.state.global_step)
        return torch.load(rng_file, map_location="cpu", weights_only=False) if os.path.isfile(rng_file) else None

    def _load_sharded_optimizer(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not os.path.isdir(folder):
            raise CheckpointError(f"--resume_from_checkpoint: {os.path.dirname(folder)} has no sharded optimizer "
                                  f"state (optimizer/); was it written with another --distributed mode?")
        osd = get_optimizer_state_dict(self.t.model, self.t.optimizer)
        holder = {"optimizer": osd}
        dcp.load(holder, checkpoint_id=folder)
        set_optimizer_state_dict(self.t.model, self.t.optimizer, holder["optimizer"])

    def _old_ema(self, path: str) -> Optional[dict]:
        """EMA state of earlier versions (diffusers EMAModel.state_dict in ema.pt)."""
        f = os.path.join(path, "ema.pt")
        if not os.path.isfile(f):
            return None
        sd = _load(f, "EMA state")
        ema = self.t.ema
        shadow = dict(ema.shadow)
        for name, value in zip(ema.names, sd["shadow_params"]):
            shadow[name] = value
        self.t.state.ema_steps = int(sd.get("optimization_step", 0))
        return shadow

    def current_fingerprint(self) -> dict:
        t = self.t
        return fingerprint(t.args, t.rt.world_size, len(t.dataset))

    def _check_fingerprint(self, path: str, saved: dict) -> None:
        now = self.current_fingerprint()
        for key, old in saved.items():
            if key == "learning_rate" or key not in now:
                continue
            if now[key] != old:
                flag = {"world_size": "the number of processes", "num_samples": "the number of training samples",
                        "task": "the task"}.get(key, f"--{key}")
                raise CheckpointError(
                    f"--resume_from_checkpoint: {path} was written with {flag} = {old!r}, this run has {now[key]!r}; "
                    f"resuming would change which samples each step sees. Use the same value, or start a new "
                    f"--output_dir")

    def _apply_learning_rate(self, saved: dict) -> None:
        """Documented rule: a --learning_rate different from the checkpoint's replaces the schedule's base
        rate from the resumed step on; the schedule's position (warm-up, decay) is kept."""
        t = self.t
        old = saved.get("learning_rate")
        new = t.args.learning_rate
        if old is None or old == new:
            return
        if not old:
            raise CheckpointError("--learning_rate: the checkpoint was trained with learning rate 0; a new rate "
                                  "cannot be scaled from it. Start a new --output_dir")
        factor = new / old
        sched = t.lr_scheduler
        sched.base_lrs = [b * factor for b in sched.base_lrs]
        for group in t.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        sched._last_lr = [g["lr"] for g in t.optimizer.param_groups]
        t.lr_changed_on_resume = {"checkpoint": old, "now": new}
        logger.warning("--learning_rate %g differs from the checkpoint's %g: the schedule continues from the resumed "
                       "step with the new base rate", new, old)

