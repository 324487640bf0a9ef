"""The one training loop, shared by every task (text-to-image, DreamBooth, textual inversion, ControlNet).

Read :meth:`Trainer.run` top to bottom: set up, resume, then for each optimizer step gather
``gradient_accumulation_steps`` micro-batches, backward each under autocast, unscale + clip, step, and every
``log_every`` steps read the losses back from the device (the only host synchronisation in the loop), log,
checkpoint, validate. A :class:`~diffusers_npu.train.task.Task` supplies the parts that differ.

Mixed precision is done here rather than by accelerate: accelerate's CPU path silently ignores fp16, and we
want the same GradScaler behaviour (skip-on-overflow, unscale-before-clip) on every device, tests included.
accelerate still provides the process group, DDP wrapping, reductions and trackers.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..metrics import ThroughputMeter, plot_history, step_line, write_json_atomic

logger = logging.getLogger("diffusers_npu.train")


class TrainingError(RuntimeError):
    """A training-time failure with a message meant for the user (non-finite loss, bad state, ...)."""


class TrainState:
    """Counters that must survive a restart (saved in every checkpoint as train_state.json)."""

    def __init__(self):
        self.global_step = 0
        self.position = 0          # global batches consumed from the sampler (micro-batches across ranks)
        self.bad_steps = 0         # non-finite fp32/bf16 losses skipped (--max_bad_steps)
        self.overflow_steps = 0    # fp16 steps skipped by the GradScaler
        self.bad_images = 0        # rows replaced by --skip_bad_images
        self.history: list[dict] = []

    def state_dict(self):
        return dict(self.__dict__)

    def load_state_dict(self, d):
        self.__dict__.update(d)


class Trainer:
    def __init__(self, args, task):
        self.args = args
        self.task = task
        self.state = TrainState()
        self._preempt = False
        self._signals_seen: list[int] = []

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from ..device import apply_device_settings, detect_device

        a = self.args
        self.device_type = detect_device(a.device)
        apply_device_settings(self.device_type)
        if self.device_type == "cpu":
            # Denormal floats (tiny weights/activations late in training) make x86 float maths up to ~100x
            # slower; flushing them to zero costs nothing in accuracy here.
            torch.set_flush_denormal(True)
        if a.allow_tf32 and self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.accelerator = Accelerator(
            cpu=self.device_type == "cpu", mixed_precision="no",
            log_with=None if a.report_to == "none" else a.report_to,
            project_config=ProjectConfiguration(project_dir=a.output_dir,
                                                logging_dir=os.path.join(a.output_dir, a.logging_dir)))
        acc = self.accelerator
        self.device = acc.device
        self.is_main = acc.is_main_process
        self.world = acc.num_processes
        self.rank = acc.process_index
        if self.is_main:
            ckpt.check_writable(a.output_dir)
        # Seed per rank for the step's noise; data order is seeded by --seed alone (see data.dataset).
        seed = a.seed + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a.mixed_precision)
        self.weight_dtype = self.amp_dtype or torch.float32

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def build(self):
        from diffusers.optimization import get_scheduler

        from ..attention import set_attention
        from ..optim import build_optimizer

        a, task, acc = self.args, self.task, self.accelerator
        task.load_models(self.device, self.weight_dtype)
        for name, module in self._attention_targets().items():
            set_attention(module, a.attention)
        if a.gradient_checkpointing:
            enable_gradient_checkpointing(task.unet, a.gradient_checkpointing_fraction)
            for m in task.trainable_modules().values():
                if m is not task.unet and hasattr(m, "enable_gradient_checkpointing"):
                    m.enable_gradient_checkpointing()
        if a.channels_last:
            task.unet.to(memory_format=torch.channels_last)
        for m in task.trainable_modules().values():
            m.train()

        # Data: a cache of latents, or images decoded on the fly.
        self.dataset = task.build_dataset()
        if a.cache_latents and getattr(task, "supports_cache", False):
            self.dataset = self._cached_dataset()
        from ..data.dataset import ResumableSampler, collate

        self.sampler = ResumableSampler(len(self.dataset), a.train_batch_size, a.seed, self.world, self.rank)
        if a.max_train_steps is None:
            a.max_train_steps = a.num_train_epochs * math.ceil(
                self.sampler.batches_per_epoch / a.gradient_accumulation_steps)
        self.collate = collate

        # Optimizer and schedule.
        lr = a.learning_rate
        if a.scale_lr:
            lr = lr * a.train_batch_size * a.gradient_accumulation_steps * self.world
        self.params = task.parameters()
        if not self.params:
            raise TrainingError("the task has no trainable parameters")
        self.optimizer = build_optimizer(a.optimizer, self.params, lr=lr, betas=(a.adam_beta1, a.adam_beta2),
                                         eps=a.adam_epsilon, weight_decay=a.adam_weight_decay)
        self.lr_scheduler = get_scheduler(a.lr_scheduler, self.optimizer, num_warmup_steps=a.lr_warmup_steps,
                                          num_training_steps=a.max_train_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if a.mixed_precision == "fp16" else None

        self.ema = None
        if a.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel([p for p in task.unet.parameters() if p.requires_grad], decay=a.ema_decay)
            self.ema.to(self.device)

        # No DDP wrapper: tasks call their own (unwrapped) modules, sometimes only a slice of one (textual
        # inversion's embedding rows), so gradients are averaged explicitly after the micro-batches instead
        # (see _allreduce_grads). Same maths as DDP, one coalesced all-reduce per optimizer step.
        if self.world > 1:
            self._broadcast_params()
        if a.compile:
            self._compile()
        if self.is_main and a.report_to != "none":
            cfg = {k: v for k, v in vars(a).items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers(f"diffusers_npu_{task.name}", config=cfg)

    def _broadcast_params(self):
        """Start every rank from rank 0's weights (a task may initialise something randomly)."""
        import torch.distributed as dist

        for p in self.params:
            dist.broadcast(p.data, src=0)

    def _allreduce_grads(self):
        """Average the gradients of the trainable parameters over all ranks, in one coalesced buffer."""
        import torch.distributed as dist

        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for dtype in {g.dtype for g in grads}:
            group = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat.div_(self.world)
            offset = 0
            for g in group:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def _attention_targets(self):
        mods = {"unet": self.task.unet}
        mods.update({k: v for k, v in self.task.trainable_modules().items() if k != "unet"})
        return mods

    def _compile(self):
        # The compiled callable is only used in the forward; state dicts come from the original modules.
        self.task.unet.forward = torch.compile(self.task.unet.forward)

    def _cached_dataset(self):
        from ..data.cache import CachedDataset, LatentCache
        from ..embedded import home

        a, task = self.args, self.task
        spec = task.cache_spec()
        root = a.cache_dir or os.path.join(home(), "cache", "latents")

        def encoders():
            task.vae.to(self.device)
            task.text_encoder.to(self.device)
            return task.vae, task.text_encoder, self.device, self.weight_dtype

        cache = LatentCache.load_or_build(root, a.pretrained_model_name_or_path, spec["hf_dataset"],
                                          spec["image_column"], spec["caption_column"], a.resolution,
                                          a.random_flip, encoders, task.tokenizer,
                                          progress=self.is_main and not a.disable_progress_bar,
                                          is_main=self.is_main, wait_fn=self.accelerator.wait_for_everyone)
        empty = None
        if a.proportion_empty_prompts:
            with torch.no_grad():
                ids = task.tokenizer([""], max_length=task.tokenizer.model_max_length, padding="max_length",
                                     return_tensors="pt").input_ids.to(self.device)
                empty = task.text_encoder(ids)[0][0].float().cpu()
        # The encoders are not needed on the device any more (validation moves them back briefly).
        task.vae.to("cpu")
        task.text_encoder.to("cpu")
        self.cache_info = {"folder": cache.folder, "hit": cache.hit}
        return CachedDataset(cache, a.seed, a.random_flip, a.proportion_empty_prompts, empty)

    def _loader(self, start_position: int):
        a = self.args
        self.sampler.start_position = start_position
        workers = a.dataloader_num_workers
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=a.train_batch_size, sampler=self.sampler, collate_fn=self.collate,
            num_workers=workers, pin_memory=bool(a.enable_pin_memory),
            persistent_workers=bool(a.enable_persistent_workers) and workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # A private generator: creating the iterator must not consume the global RNG (exact resume).
            generator=torch.Generator())

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self):
        a, acc = self.args, self.accelerator
        final = os.path.join(a.output_dir, f"checkpoint-{self.state.global_step}")
        tmp = ckpt.tmp_path_for(final)
        if self.is_main:
            ckpt.begin(final)
        acc.wait_for_everyone()
        try:
            torch.save(_rng_state(), os.path.join(tmp, f"rng_{self.rank}.pt"))
            if self.is_main:
                from safetensors.torch import save_file

                for name, m in self.task.trainable_modules().items():
                    sd = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
                    save_file(_dedupe_shared(sd), os.path.join(tmp, f"{name}.safetensors"))
                torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
                torch.save(self.lr_scheduler.state_dict(), os.path.join(tmp, "lr_scheduler.pt"))
                if self.scaler is not None:
                    torch.save(self.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
                if self.ema is not None:
                    torch.save(self.ema.state_dict(), os.path.join(tmp, "ema.pt"))
                write_json_atomic(os.path.join(tmp, "train_state.json"), self.state.state_dict())
        except BaseException:
            if self.is_main:
                ckpt.abort(tmp)
            raise
        acc.wait_for_everyone()
        if self.is_main:
            ckpt.commit(tmp, final, {"step": self.state.global_step, "world_size": self.world})
            removed = ckpt.prune(a.output_dir, a.checkpoints_total_limit, keep=final)
            for r in removed:
                logger.info("removed old checkpoint %s", r)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str):
        import json

        from safetensors.torch import load_file

        for name, m in self.task.trainable_modules().items():
            f = os.path.join(path, f"{name}.safetensors")
            if not os.path.isfile(f):
                raise ckpt.CheckpointError(f"--resume_from_checkpoint: {path} has no {name}.safetensors "
                                           f"(was it written by another task?)")
            sd = load_file(f, device="cpu")
            missing, unexpected = m.load_state_dict(sd, strict=False)
            missing = [k for k in missing if k not in _tied_keys(m)]
            if missing or unexpected:
                raise ckpt.CheckpointError(f"--resume_from_checkpoint: {f} does not match the model "
                                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=self.device,
                                                  weights_only=False))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(path, "lr_scheduler.pt"), weights_only=False))
        if self.scaler is not None and os.path.isfile(os.path.join(path, "scaler.pt")):
            self.scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=False))
        if self.ema is not None:
            if not os.path.isfile(os.path.join(path, "ema.pt")):
                raise ckpt.CheckpointError(f"--resume_from_checkpoint: {path} has no EMA state but --use_ema is on")
            self.ema.load_state_dict(torch.load(os.path.join(path, "ema.pt"), weights_only=False))
            self.ema.to(self.device)
        with open(os.path.join(path, "train_state.json")) as f:
            self.state.load_state_dict(json.load(f))
        rng_file = os.path.join(path, f"rng_{self.rank}.pt")
        self._rng_to_restore = torch.load(rng_file, weights_only=False) if os.path.isfile(rng_file) else None
        logger.info("resumed from %s at step %d", path, self.state.global_step)

    # ------------------------------------------------------------------------------------------- pre-emption
    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._signals_seen.append(signum)
            if self._preempt:  # second signal: the user means it
                raise KeyboardInterrupt
            self._preempt = True
            logger.warning("received %s: saving a checkpoint at the next step boundary, then exiting",
                           signal.Signals(signum).name)

        self._old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _restore_signal_handlers(self):
        for s, h in getattr(self, "_old_handlers", {}).items():
            signal.signal(s, h)

    def _preempt_agreed(self) -> bool:
        if self.world == 1:
            return self._preempt
        flag = torch.tensor([1.0 if self._preempt else 0.0], device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    # ------------------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        t_start = time.time()
        self.setup()
        self.build()
        a, acc, task, st = self.args, self.accelerator, self.task, self.state
        from ..device import peak_memory_bytes, reset_peak_memory, synchronize

        resume = ckpt.resolve_resume(a.resume_from_checkpoint, a.output_dir)
        self._rng_to_restore = None
        if resume:
            self.load_checkpoint(resume)
        images_per_step = a.train_batch_size * a.gradient_accumulation_steps * self.world
        meter = ThroughputMeter(images_per_step, warmup_steps=st.global_step + min(3, a.max_train_steps // 10))
        meter.history = list(st.history)
        loader_iter = iter(self._loader(st.position))
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
        reset_peak_memory(self.device_type)
        self._install_signal_handlers()

        from tqdm.auto import tqdm

        bar = tqdm(total=a.max_train_steps, initial=st.global_step, desc=f"train {task.name}",
                   disable=not self.is_main or a.disable_progress_bar, dynamic_ncols=True)
        pending_losses, pending_steps, pending_lrs, pending_scales, pending_bad = [], [], [], [], []
        interval_start, interval_data = time.perf_counter(), 0.0
        interval_first = st.global_step + 1
        exit_reason = "completed"
        try:
            while st.global_step < a.max_train_steps:
                # ---- one optimizer step = gradient_accumulation_steps micro-batches
                step_losses = []
                for micro in range(a.gradient_accumulation_steps):
                    t0 = time.perf_counter()
                    batch = next(loader_iter)
                    interval_data += time.perf_counter() - t0
                    st.position += 1
                    pending_bad.append(batch["bad"].sum())
                    with self._autocast():
                        loss, _extras = task.compute_loss(batch)
                    scaled = loss / a.gradient_accumulation_steps
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                    step_losses.append(loss.detach().float())
                step_loss = torch.stack(step_losses).mean()
                if self.world > 1:
                    self._allreduce_grads()

                if a.max_bad_steps and self.scaler is None and not torch.isfinite(step_loss).item():
                    # Opt-in per-step check (a host sync): skip this update instead of stopping.
                    st.bad_steps += 1
                    self._zero_grad()
                    logger.warning("step %d: non-finite loss, update skipped (%d/%d)", st.global_step + 1,
                                   st.bad_steps, a.max_bad_steps)
                    if st.bad_steps > a.max_bad_steps:
                        raise TrainingError(f"more than --max_bad_steps={a.max_bad_steps} steps had a non-finite "
                                            f"loss (last at step {st.global_step + 1}); nothing was saved from "
                                            f"them")
                    continue
                if a.max_grad_norm:
                    from ..optim import clip_grad_norm

                    clip_grad_norm(self.optimizer, self.params, a.max_grad_norm, scaler=self.scaler)
                if self.scaler is not None:
                    if not hasattr(self, "_last_scale"):
                        self._last_scale = float(self.scaler.get_scale())
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    pending_scales.append(self.scaler._scale.detach().clone())
                else:
                    self.optimizer.step()
                self.lr_scheduler.step()
                self._zero_grad()
                task.after_optimizer_step()
                if self.ema is not None:
                    self.ema.step([p for p in task.unet.parameters() if p.requires_grad])
                st.global_step += 1
                pending_losses.append(step_loss)
                pending_steps.append(st.global_step)
                pending_lrs.append(self.lr_scheduler.get_last_lr()[0])
                bar.update(1)

                # ---- host sync point: read losses, check them, log
                at_end = st.global_step >= a.max_train_steps
                ckpt_due = a.checkpointing_steps and st.global_step % a.checkpointing_steps == 0
                val_due = a.validation_prompts and a.validation_steps and st.global_step % a.validation_steps == 0
                preempt = self._preempt_agreed()
                if at_end or ckpt_due or val_due or preempt or len(pending_losses) >= a.log_every:
                    losses = torch.stack(pending_losses)
                    if self.world > 1:
                        losses = acc.reduce(losses, reduction="mean")
                    losses = losses.tolist()
                    synchronize(self.device_type)
                    wall = time.perf_counter() - interval_start
                    self._check_finite(losses, pending_steps, pending_scales)
                    st.bad_images += int(torch.stack(pending_bad).sum().item()) if pending_bad else 0
                    fps = meter.record_interval(interval_first, pending_steps, losses, wall, interval_data,
                                                pending_lrs)
                    st.history = meter.history
                    if self.is_main:
                        for s, l, lr in zip(pending_steps, losses, pending_lrs):
                            print(step_line(s, a.max_train_steps, l, fps, lr), flush=True)
                        bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{fps:.1f}")
                        if a.report_to != "none":
                            acc.log({"train_loss": losses[-1], "images_per_sec": fps, "lr": pending_lrs[-1]},
                                    step=st.global_step)
                    pending_losses, pending_steps, pending_lrs, pending_scales, pending_bad = [], [], [], [], []
                    if ckpt_due or preempt:
                        self.save_checkpoint()
                    if val_due and not at_end:
                        self.validate(f"step-{st.global_step}")
                    if preempt:
                        exit_reason = "preempted"
                        break
                    interval_start, interval_data = time.perf_counter(), 0.0
                    interval_first = st.global_step + 1
        finally:
            bar.close()
            self._restore_signal_handlers()

        result = {"exit_reason": exit_reason}
        if exit_reason == "completed":
            if self.ema is not None:
                self.ema.copy_to([p for p in task.unet.parameters() if p.requires_grad])
            if a.validation_prompts:
                self.validate("final")
            result["pipeline"] = self.save_final()
        if self.world > 1:
            # Every rank reports a checksum of its trained weights: equal numbers mean DDP kept them in step.
            total = sum(float(p.detach().double().sum()) for p in self.params)
            print(f"rank {self.rank} final weights checksum {total:.10e}", flush=True)
        acc.wait_for_everyone()
        result.update(self._summary(meter, time.time() - t_start, peak_memory_bytes(self.device_type)))
        if exit_reason == "completed" and self.is_main and a.learning_check:
            result["learning_check"] = self.learning_check()
            write_json_atomic(os.path.join(a.output_dir, "train_summary.json"), result)
        acc.end_training()
        return result

    def _zero_grad(self):
        from ..optim import zero_grad

        zero_grad(self.optimizer)

    def _check_finite(self, losses, steps, scales):
        st = self.state
        if self.scaler is not None:
            # fp16: a non-finite scaled gradient made the GradScaler skip the step and halve the scale.
            # Compare with the scale before this interval too (kept across intervals).
            prev = getattr(self, "_last_scale", None)
            for s in scales:
                v = float(s)
                if prev is not None and v < prev:
                    st.overflow_steps += 1
                    logger.warning("fp16 overflow: the GradScaler skipped a step (scale now %g)", v)
                prev = v
            self._last_scale = prev
            return
        for s, l in zip(steps, losses):
            if not math.isfinite(l):
                raise TrainingError(
                    f"step {s}: the loss is {l} ({self.args.mixed_precision} precision). Training stopped before "
                    f"saving anything from this step; the last checkpoint is intact. Lower --learning_rate, set "
                    f"--max_grad_norm, or allow skips with --max_bad_steps N.")

    # ------------------------------------------------------------------------------------------ validation
    def _pipeline_for_eval(self):
        task = self.task
        task.vae.to(self.device)
        task.text_encoder.to(self.device)
        pipe = task.build_pipeline(task.unet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(self, tag: str):
        a = self.args
        if not self.is_main:
            return
        from diffusers.utils import make_image_grid

        pipe = self._pipeline_for_eval()
        was_training = self.task.unet.training
        self.task.unet.eval()
        images = []
        g = torch.Generator("cpu").manual_seed(a.seed)
        res = a.resolution
        with torch.no_grad(), self._autocast():
            for i, prompt in enumerate(a.validation_prompts):
                out = pipe(prompt, num_images_per_prompt=a.num_validation_images, generator=g, height=res,
                           width=res, num_inference_steps=getattr(a, "validation_inference_steps", 30),
                           **self.task.validation_kwargs(i, prompt))
                images.extend(out.images)
        if was_training:
            self.task.unet.train()
        grid = make_image_grid(images, rows=len(a.validation_prompts), cols=a.num_validation_images)
        folder = os.path.join(a.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{tag}.png")
        grid.save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        if a.report_to in ("tensorboard", "all"):
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    arr = np.stack([np.asarray(im) for im in images])
                    tracker.writer.add_images("validation", arr, self.state.global_step, dataformats="NHWC")
        if a.cache_latents:
            self.task.vae.to("cpu")
            self.task.text_encoder.to("cpu")
        logger.info("validation images: %s", path)

    # ------------------------------------------------------------------------------------------ final save
    def save_final(self) -> str | None:
        a = self.args
        if not self.is_main:
            return None
        pipe = self.task.build_pipeline(self.task.unet)
        tmp = ckpt.begin(os.path.join(a.output_dir, "pipeline"))
        try:
            self.task.save_final(tmp, pipe)
            install_folder_contents(tmp, a.output_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("saved the trained pipeline to %s", a.output_dir)
        return a.output_dir

    def learning_check(self) -> dict:
        from diffusers import DiffusionPipeline

        from ..embedded import learning_check

        pipe = DiffusionPipeline.from_pretrained(self.args.output_dir).to(self.device)
        res = learning_check(pipe, progress=not self.args.disable_progress_bar)
        print(f"Learning check: {res['agreement'] * 100:.1f}% of {res['images']} generated digits read as the "
              f"prompt's digit (guidance {res['guidance_scale']}, steps {res['num_inference_steps']})", flush=True)
        return res

    def _summary(self, meter: ThroughputMeter, e2e: float, peak: int) -> dict:
        from ..device import device_name

        a = self.args
        summary = {
            "task": self.task.name,
            "images_per_sec": meter.steady_fps,
            "final_loss": meter.final_loss,
            "e2e_seconds": e2e,
            "steps": self.state.global_step,
            "world_size": self.world,
            "per_device_batch": a.train_batch_size,
            "global_batch": a.train_batch_size * a.gradient_accumulation_steps * self.world,
            "device": self.device_type,
            "device_name": device_name(self.device_type),
            "peak_memory_bytes": peak,
            "overflow_steps_skipped": self.state.overflow_steps,
            "bad_steps_skipped": self.state.bad_steps,
            "bad_images_skipped": self.state.bad_images,
            "cache": getattr(self, "cache_info", None),
            "config": {k: v for k, v in vars(a).items()},
        }
        summary.update(self.task.summary_extra())
        if self.is_main:
            write_json_atomic(os.path.join(a.output_dir, "train_summary.json"), summary)
            plot_history(meter.history, os.path.join(a.output_dir, "train_curves.png"))
        return summary


# ------------------------------------------------------------------------------------------------ helpers

def enable_gradient_checkpointing(unet, fraction: float = 1.0):
    """Checkpoint all UNet blocks, or only the outermost ``fraction`` of them (largest activations first)."""
    unet.enable_gradient_checkpointing()
    if fraction >= 1.0:
        return
    down, up = list(unet.down_blocks), list(unet.up_blocks)[::-1]
    order = [b for pair in zip(down, up) for b in pair] + [unet.mid_block]  # outermost (high-res) first
    keep = max(0, round(len(order) * fraction))
    for block in order[keep:]:
        for m in block.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False


def install_folder_contents(src: str, dst: str) -> None:
    """Move a freshly saved pipeline into ``dst`` so that ``dst`` is loadable only when complete: the old
    model_index.json goes first, the new one last (loaders start from it)."""
    os.makedirs(dst, exist_ok=True)
    index = os.path.join(dst, "model_index.json")
    if os.path.exists(index):
        os.remove(index)
    names = sorted(os.listdir(src), key=lambda n: n == "model_index.json")
    for name in names:
        if name == ckpt.MARKER:
            continue
        target = os.path.join(dst, name)
        if os.path.isdir(target) and not os.path.islink(target):
            old = target + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(os.path.join(src, name), target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(os.path.join(src, name), target)


def _rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    npu = getattr(torch, "npu", None)
    if npu is not None and hasattr(npu, "get_rng_state_all"):
        try:
            state["npu"] = npu.get_rng_state_all()
        except Exception:
            pass
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "npu" in state and hasattr(getattr(torch, "npu", None), "set_rng_state_all"):
        torch.npu.set_rng_state_all(state["npu"])


def _dedupe_shared(sd: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied weights): keep the first of each storage."""
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen and v.numel() > 0:
            continue
        seen.add(key)
        out[k] = v.clone() if v.is_contiguous() is False else v
    return out


def _tied_keys(module) -> set:
    sd = module.state_dict()
    seen, tied = {}, set()
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen and v.numel() > 0:
            tied.add(k)
        seen.setdefault(key, k)
    return tied
