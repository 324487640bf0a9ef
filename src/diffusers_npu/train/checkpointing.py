"""Checkpoints of a training run: what goes in, how it is written safely, and how a run resumes exactly.

``checkpoint-N/`` holds the trained models in the form users load (``unet/`` in diffusers format,
``unet_ema/`` with EMA, ``controlnet/``, ``text_encoder/``, ``pytorch_lora_weights.safetensors``,
``learned_embeds.safetensors``; written by the task) next to what an exact resume needs:

    train_state.json      step, data position, counters, loss history, the run's fingerprint
    optimizer/            optimizer state through torch.distributed.checkpoint (one process, DDP, FSDP): keyed
                          by parameter name, each rank writes what it owns; resharded on load
    deepspeed/            the DeepSpeed engine's own checkpoint (ZeRO shards)
    optimizer.pt          (earlier versions: one process / DDP)
    lr_scheduler.pt, precision.pt (GradScaler), rng_<rank>.pt

It is written through the crash-safe protocol of :mod:`diffusers_npu.checkpoint` (temp folder, manifest of
every rank's files, fsync, COMPLETE marker, rename). A file that cannot be read at resume is one
:class:`CheckpointDamaged` line (:func:`unreadable`). Before the marker is written every rank checks on its device that the trained
weights and the optimizer state are finite (one host sync per save): a checkpoint of poisoned weights is
never committed. Resume reads this layout and the one of earlier versions (``unet.safetensors``,
``ema.pt``), and refuses a run whose global batch, resolution, seed or data changed. A different number of
processes (or DDP <-> FSDP) is resumed when the global batch (``--train_batch_size`` x processes, and the
accumulation) is unchanged: weights are read back shard-aware and the optimizer state is resharded by
torch.distributed.checkpoint; only the per-rank RNG streams start afresh. DeepSpeed checkpoints resume
only under DeepSpeed with the same number of processes.
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
from ..errors import CheckpointDamaged, CheckpointError, DiffusersNpuError, TrainingError
from ..fsutil import is_disk_full, write_json_atomic

logger = logging.getLogger(__name__)

#: flags whose change makes an exact resume impossible (the data a step sees would differ)
FINGERPRINT_FLAGS = ("gradient_accumulation_steps", "resolution", "seed", "max_train_samples",
                     "aspect_ratio_buckets", "center_crop", "random_flip", "cache_latents",
                     "streaming", "shuffle_buffer_size")


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


def fingerprint(args, world_size: int, num_samples: int, engine: str = "none") -> dict:
    fp = {k: getattr(args, k, None) for k in FINGERPRINT_FLAGS}
    fp.update(train_batch_size=args.train_batch_size, world_size=world_size,
              global_micro_batch=args.train_batch_size * world_size, engine=engine, num_samples=num_samples,
              learning_rate=args.learning_rate, task=getattr(args, "task_name", None))
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
        raise CheckpointDamaged(f"--resume_from_checkpoint: {os.path.dirname(path)} has no {what} "
                                f"({os.path.basename(path)}); the checkpoint is incomplete") from None


def _dcp_missing(folder: str) -> list:
    """The data files a torch.distributed.checkpoint folder's metadata names that are not there."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        names = {v.relative_path for v in FileSystemReader(folder).read_metadata().storage_data.values()}
    except Exception:  # no or unreadable .metadata: nothing more to say than the load's own error
        return []
    return sorted(n for n in names if not os.path.exists(os.path.join(folder, n)))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def unreadable(path: str, part: str, exc: BaseException) -> CheckpointDamaged:
    """The one line for a checkpoint file that cannot be read: the file (found by a format check, or the part
    being read), what was expected, and the checkpoint to use instead."""
    missing = getattr(exc, "filename", None) if isinstance(exc, FileNotFoundError) else None
    problem = (f"{os.path.relpath(missing, os.path.dirname(os.path.abspath(path)))} is missing" if missing
               else ckpt.manifest.diagnose(path))
    if problem is None:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        problem = f"{part} in {os.path.basename(path)} cannot be read ({type(exc).__name__}: {reason})"
    older = [p for s, p in ckpt.list_checkpoints(os.path.dirname(os.path.abspath(path)))
             if os.path.abspath(p) != os.path.abspath(path)]
    todo = (f"resume from {older[-1]} (--resume_from_checkpoint {os.path.basename(older[-1])})" if older
            else "start without --resume_from_checkpoint")
    return CheckpointDamaged(f"--resume_from_checkpoint: {problem}: the checkpoint {path} is damaged; {todo}")


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
        ranks = ckpt.Ranks()
        try:
            try:
                self._write(tmp)
                failure = None
            except BaseException as e:
                # torch.distributed.checkpoint's CheckpointException (a write error on some rank, e.g. a full
                # disk) is a BaseException; signals and exits are not failures to agree on
                if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
                    raise
                failure = e
            self._agree_on_failure(ranks, failure, final)
            self._check_finite(final)
            # collective: every rank lists and hashes its share; the manifest is checked before the marker
            ckpt.commit(tmp, final, {"step": step, "world_size": rt.world_size, "layout": 2}, ranks)
        except BaseException as e:
            full = not isinstance(e, TrainingError) and is_disk_full(e, a.output_dir)  # before the clean-up frees space
            if rt.is_main:
                ckpt.abort(tmp)
                t.ledger.done(temp=tmp)
            if full:
                raise TrainingError(f"disk full while writing {final}: {_first_line(e)}; {t.ledger.safety_note()}") \
                    from None
            raise
        if rt.is_main:
            t.ledger.done(temp=tmp, final=final)
            for removed in ckpt.prune(a.output_dir, a.checkpoints_total_limit, keep=final):
                logger.info("removed old checkpoint %s", removed)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _agree_on_failure(self, ranks, failure: Optional[BaseException], final: str) -> None:
        """Every rank learns whether any rank failed to write its files, and why, before anything is cleaned
        up: the temp folder is never removed under a rank still writing into it, a full disk is recognised by
        the rank that hit it (while the disk is still full), and every rank stops with the same line."""
        mine = None
        if failure is not None:
            full = is_disk_full(failure, self.t.args.output_dir)
            mine = ("full" if full else "error", _first_line(failure))
        reports = ranks.gather(mine)
        bad = [(r, rep) for r, rep in enumerate(reports) if rep]
        if not bad:
            return
        full = [(r, text) for r, (kind, text) in bad if kind == "full"]
        if full:
            r, text = full[0]
            who = "" if ranks.world == 1 else f" (rank {r})"
            raise TrainingError(f"disk full while writing {final}{who}: {text}; {self.t.ledger.safety_note()}")
        if failure is not None:
            raise failure
        r, (_kind, text) = bad[0]
        raise TrainingError(f"rank {r} could not write its part of {final}: {text}; {self.t.ledger.safety_note()}")

    def _write(self, tmp: str) -> None:
        t = self.t
        rt = t.rt
        ema_state = t.ema.state_for_save() if t.ema is not None else None
        t.task.save_trained(tmp, ema_state=ema_state)
        torch.save(_rng_state(), os.path.join(tmp, f"rng_{rt.rank}.pt"))
        t.engine.save_optimizer(tmp, rt.is_main)
        if rt.is_main:
            torch.save(t.lr_scheduler.state_dict(), os.path.join(tmp, "lr_scheduler.pt"))
            torch.save(t.precision.state_dict(), os.path.join(tmp, "precision.pt"))
            t.state.ema_steps = t.ema.step_count if t.ema is not None else 0
            t.state.precision = {"skipped": t.precision.skipped, "consecutive": t.precision.consecutive}
            write_json_atomic(os.path.join(tmp, "train_state.json"), t.state.state_dict())

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
        """Restore everything but the RNG state, which is returned (set it after the data loader starts).
        Any file that cannot be read is one CheckpointDamaged line naming it (never a torch/safetensors/JSON
        traceback)."""
        self._reading = "train_state.json"
        try:
            return self._load(path)
        except CheckpointError as e:
            if str(e).startswith("--"):
                raise
            raise type(e)(f"--resume_from_checkpoint: {e}") from None  # the model folders' errors name no flag
        except DiffusersNpuError:
            raise
        except BaseException as e:  # whatever torch, safetensors, DCP or json raise for a damaged file
            # torch.distributed.checkpoint's CheckpointException is a BaseException; signals and exits are not ours
            if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
                raise
            logger.debug("reading %s failed: %s", self._reading, e)  # the whole story, for --log_level debug
            raise unreadable(path, self._reading, e) from None

    def _load(self, path: str) -> Optional[dict]:
        t = self.t
        state_file = os.path.join(path, "train_state.json")
        try:
            with open(state_file) as f:
                saved = json.load(f)
        except FileNotFoundError:
            raise CheckpointDamaged(f"--resume_from_checkpoint: {path} has no train_state.json; the checkpoint is "
                                    f"incomplete or was not written by diffusers-npu") from None
        self._check_fingerprint(path, saved.get("fingerprint") or {})
        self._reading = "the trained weights (unet/, unet_ema/, ...)"
        ema = t.task.load_trained(path)
        if t.ema is not None:
            if ema is None:
                ema = self._old_ema(path)
            if ema is None:
                raise CheckpointError(f"--resume_from_checkpoint: {path} has no EMA weights but --use_ema is on")
            t.ema.load(ema, saved.get("ema_steps") or saved.get("ema_optimization_step") or 0)
        dcp_files = sorted(n for n in os.listdir(os.path.join(path, "optimizer"))) \
            if os.path.isdir(os.path.join(path, "optimizer")) else []
        # DCP's errors name no file: name the files the optimizer state is read from (a missing one first)
        lost = _dcp_missing(os.path.join(path, "optimizer")) if dcp_files else []
        self._reading = (f"the optimizer state (optimizer/{lost[0]} is missing)" if lost else
                         "the optimizer state (" + ", ".join(f"optimizer/{n}" for n in dcp_files) + ")") \
            if dcp_files else "the optimizer state"
        t.engine.load_optimizer(path)
        self._reading = "lr_scheduler.pt"
        t.lr_scheduler.load_state_dict(_load(os.path.join(path, "lr_scheduler.pt"), "scheduler state"))
        self._apply_learning_rate(saved.get("fingerprint") or {})
        prec = os.path.join(path, "precision.pt")
        old_scaler = os.path.join(path, "scaler.pt")
        self._reading = "precision.pt"
        layout = ckpt.read_marker(path).get("layout", 0)  # 2: this version's, where every file below exists
        if os.path.isfile(prec) or layout >= 2:
            t.precision.load_state_dict(_load(prec, "precision state"))
        elif os.path.isfile(old_scaler) and t.precision.scaler is not None:
            t.precision.scaler.load_state_dict(_load(old_scaler, "scaler state"))
        t.state.load_state_dict(saved)
        t.state.fingerprint = self.current_fingerprint()
        logger.info("resumed from %s at step %d", path, t.state.global_step)
        rng_file = os.path.join(path, f"rng_{t.rt.rank}.pt")
        if (saved.get("fingerprint") or {}).get("world_size", t.rt.world_size) != t.rt.world_size:
            # Another world size: rank r's stream is not the one rank r had; start each rank's afresh from
            # (seed, rank, step). Exact only for what does not depend on it (--per_sample_noise noise, the data).
            from ..device import seed_everything

            seed_everything(t.args.seed + t.rt.rank + 1_000_003 * t.state.global_step)
            return None
        self._reading = os.path.basename(rng_file)
        if not os.path.isfile(rng_file) and layout >= 2:
            raise FileNotFoundError(2, "No such file", rng_file)  # this layout always has one per rank
        return torch.load(rng_file, map_location="cpu", weights_only=False) if os.path.isfile(rng_file) else None

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
        return fingerprint(t.args, t.rt.world_size, len(t.dataset), t.engine.kind)

    def _check_fingerprint(self, path: str, saved: dict) -> None:
        now = self.current_fingerprint()
        if "global_micro_batch" not in saved and "train_batch_size" in saved and "world_size" in saved:
            saved = dict(saved, global_micro_batch=saved["train_batch_size"] * saved["world_size"])  # older
        # The samples of global micro-batch k depend on (seed, k) alone (data/sampling.py), so only the global
        # micro-batch must match; the per-rank batch and the number of processes may change with it.
        world_changed = saved.get("world_size", now["world_size"]) != now["world_size"]
        old_engine = saved.get("engine")
        if old_engine in ("zero2", "zero3") or now["engine"] in ("zero2", "zero3"):
            if old_engine != now["engine"] or world_changed:
                raise CheckpointError(
                    f"--resume_from_checkpoint: {path} was written by engine {old_engine or 'none/ddp/fsdp'} on "
                    f"{saved.get('world_size')} process(es); this run is {now['engine']} on {now['world_size']}. "
                    f"DeepSpeed checkpoints resume only under the same --zero_stage and number of processes (and "
                    f"other engines' checkpoints not under DeepSpeed): use those, or start a new --output_dir")
        for key, old in saved.items():
            if key in ("learning_rate", "train_batch_size", "world_size", "engine") or key not in now:
                continue
            if now[key] != old:
                if key == "global_micro_batch":
                    per_rank, rem = divmod(old, now["world_size"])
                    fix = (f"use --train_batch_size {per_rank} with {now['world_size']} processes" if not rem else
                           f"use a number of processes that divides {old}")
                    raise CheckpointError(
                        f"--resume_from_checkpoint: {path} was written with a global batch of {old} per micro-step "
                        f"(--train_batch_size {saved.get('train_batch_size')} x {saved.get('world_size')} "
                        f"processes); this run has {now[key]} (--train_batch_size {now['train_batch_size']} x "
                        f"{now['world_size']}). Keep the global batch: {fix}, or start a new --output_dir")
                flag = {"num_samples": "the number of training samples", "task": "the task"}.get(key, f"--{key}")
                raise CheckpointError(
                    f"--resume_from_checkpoint: {path} was written with {flag} = {old!r}, this run has {now[key]!r}; "
                    f"resuming would change which samples each step sees. Use the same value, or start a new "
                    f"--output_dir")
        if world_changed:
            logger.warning("resuming %s (written by %s process(es)) on %s: the weights and optimizer state are "
                           "resharded; each rank's random stream starts afresh", path, saved.get("world_size"),
                           now["world_size"])

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

