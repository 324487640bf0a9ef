"""The one training loop, shared by every task.

Read :meth:`Trainer.run` top to bottom: set up (build.py), resume, then :meth:`Trainer.train_step` until
``--max_train_steps``, flushing every ``--log_every`` steps, then :meth:`Trainer.finish` (final validation,
final save, learning check, summary).

A step gathers ``--gradient_accumulation_steps`` micro-batches; each runs the task module's forward under
autocast and the engine's backward (engine.py: accelerate's gradient state decides which micro-batch syncs,
for DDP, FSDP and DeepSpeed alike), then the engine unscales, clips and steps, then the schedule and EMA
advance once. Nothing in a step waits for the device: losses, the gradient norm and the fp16 scale stay device tensors until the flush, which reads
them in one transfer, agrees on pre-emption across ranks, and saves checkpoints and validation grids.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import List, Optional

import torch

from ..errors import LearningCheckFailed, TrainingError, UsageError
from ..metrics import LossBuffer, ThroughputMeter, step_line
from . import build, evaluation
from .checkpointing import Checkpointer, TrainState, set_rng_state
from .outputs import OutputLedger
from .preemption import Preemption, PreemptRequested

logger = logging.getLogger("diffusers_npu.train")


class Trainer:
    def __init__(self, args, task_cls, started: Optional[float] = None):
        self.args = args
        self.task_cls = task_cls
        self.preemption = Preemption()
        self.ledger = OutputLedger(args.output_dir)
        self.state = TrainState()
        self.losses = LossBuffer()
        self.started = started or time.time()
        self.show_bar = sys.stdout.isatty() and not args.disable_progress_bar
        # Built by setup() (build.py):
        self.rt = None              # Runtime: device, rank, world size, dtype the task sees
        self.task = None            # the Task instance
        self.precision = None       # autocast + GradScaler + overflow counting
        self.engine = None          # engine.Engine: none / ddp / fsdp / zero2 / zero3, chosen once
        self.accelerator = None
        self.model = None           # the task module, wrapped by the engine (DDP/FSDP/DeepSpeed) when > 1 process
        self.optimizer = None
        self.lr_scheduler = None
        self.params: List[torch.Tensor] = []
        self.ema = None
        self.dataset = None
        self.sampler = None
        self.steps_per_epoch = 0
        self.cache_info = None
        self.threads_note = None
        self.checkpointer = Checkpointer(self)
        self.meter: Optional[ThroughputMeter] = None
        self.bar = None
        self.first_step = 0
        self.earlier_parts: list = []
        self.lr_changed_on_resume = None
        self._interval_start = 0.0
        self._data_seconds = 0.0

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        with self.preemption:
            try:
                rng = self.setup()
                exit_reason = self.train(rng)
                return self.finish(exit_reason)
            except BaseException as exc:
                from ..fsutil import is_disk_full

                full = is_disk_full(exc, self.args.output_dir)  # before the clean-up frees space
                if self.rt is None or self.rt.is_main:
                    self.ledger.cleanup()
                note = self.ledger.safety_note()
                if full and not isinstance(exc, TrainingError):
                    # safetensors and torch.save report ENOSPC in their own words; say it plainly
                    where = getattr(exc, "filename", None) or "the output"
                    raise TrainingError(f"disk full while writing {where}; {note}") from None
                exc.note = note  # for the one-line message of main()
                raise
            finally:
                self.close()

    def setup(self) -> Optional[dict]:
        """Everything before the first step; returns the RNG state to restore on resume."""
        a = self.args
        build.runtime_and_precision(self)
        self.task = self.task_cls(a, self.rt)
        self.task.validate_args()
        build.output_folder(self)
        module = build.module_and_speed(self)
        build.data(self)
        build.optimizer_and_schedule(self, module)
        build.engine(self, module)
        build.ema(self)
        build.seed_per_rank(self)
        from ..checkpoint import resolve_resume

        rng = None
        # collective: the main process verifies against the manifest and decides; every rank gets its answer
        resume = resolve_resume(a.resume_from_checkpoint, a.output_dir, a.checkpoint_verification == "hashes")
        if a.resume_from_checkpoint == "latest" and resume is None and self.rt.is_main:
            # A typo in --output_dir would otherwise silently cost a whole run.
            print(f"warning: --resume_from_checkpoint latest: no checkpoint in {os.path.abspath(a.output_dir)}; "
                  f"starting from step 1", flush=True)
        self.state.fingerprint = self.checkpointer.current_fingerprint()
        if resume:
            rng = self.checkpointer.load(resume)
            self.earlier_parts = evaluation.previous_parts(a.output_dir)
        self.first_step = self.state.global_step
        build.trackers(self)
        self.precision.first_scale()
        images_per_step = a.train_batch_size * a.gradient_accumulation_steps * self.rt.world_size
        self.meter = ThroughputMeter(images_per_step, self.state.global_step + min(3, a.max_train_steps // 10),
                                     history=self.state.history)
        if self.rt.is_main and self.threads_note:
            print(self.threads_note, flush=True)
        if self.rt.is_main:
            print(build.plan_line(self, resume), flush=True)
        return rng

    # -------------------------------------------------------------------------------------------- train
    def train(self, rng: Optional[dict]) -> str:
        a, st = self.args, self.state
        from ..device import reset_peak_memory

        loader = iter(self.loader(st.position))
        if rng is not None:
            set_rng_state(rng)  # after the loader exists: creating its iterator must not change the run
        reset_peak_memory(a.device)
        self.preemption.enter("training")
        if self.show_bar and self.rt.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=a.max_train_steps, initial=st.global_step, desc=f"train {self.task.name}",
                            dynamic_ncols=True)
        self._interval_start, self._data_seconds = time.perf_counter(), 0.0
        while st.global_step < a.max_train_steps:
            self.train_step(loader)
            if self.flush_due() and self.flush():
                return "preempted"
        return "completed"

    def train_step(self, loader) -> None:
        """One optimizer step over --gradient_accumulation_steps micro-batches. No host synchronisation (but
        one per step with --max_bad_steps)."""
        a, st, engine = self.args, self.state, self.engine
        accum = a.gradient_accumulation_steps
        step_loss = None
        metrics = {}
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(loader)
            self._data_seconds += time.perf_counter() - t0
            st.position += 1
            st.bad_images += batch.get("bad", 0)
            with engine.accumulate():
                with self.precision.autocast():
                    loss, extra = self.model(batch)
                engine.backward(loss, self.precision)
            step_loss = loss.detach() / accum if step_loss is None else step_loss + loss.detach() / accum
            for k, v in extra.items():
                metrics[k] = v.detach() / accum if k not in metrics else metrics[k] + v.detach() / accum
        if a.max_bad_steps and self.precision.scaler is None and \
                engine.any_rank(~torch.isfinite(step_loss), self.rt.device):
            self.skip_bad_step()  # opt-in: costs one host sync per step; every rank takes the same branch
            return
        norm = engine.clip_and_step(self.precision, a.max_grad_norm, set_to_none=a.set_grads_to_none)
        if norm is not None:
            metrics["grad_norm"] = norm
        self.lr_scheduler.step()
        st.global_step += 1
        self.task.after_optimizer_step(st.global_step)
        if self.ema is not None:
            self.ema.step()
        self.losses.add(st.global_step, self.lr_scheduler.get_last_lr()[0], {"loss": step_loss, **metrics})
        if self.bar is not None:
            self.bar.update(1)

    def skip_bad_step(self) -> None:
        a, st = self.args, self.state
        st.bad_steps += 1
        self.engine.skip_step()
        logger.warning("step %d: non-finite loss on at least one rank, update skipped on all (%d/%d)", st.global_step + 1, st.bad_steps,
                       a.max_bad_steps)
        if st.bad_steps > a.max_bad_steps:
            raise TrainingError(f"more than --max_bad_steps={a.max_bad_steps} steps had a non-finite loss (last at "
                                f"step {st.global_step + 1}); nothing was saved from them; {self.ledger.safety_note()}")

    # -------------------------------------------------------------------------------------------- flush
    def flush_due(self) -> bool:
        a, step = self.args, self.state.global_step
        return (len(self.losses) >= a.log_every or step >= a.max_train_steps or step % a.checkpointing_steps == 0
                or bool(a.validation_prompts and a.validation_steps and step % a.validation_steps == 0))

    def read_buffer(self) -> List[dict]:
        """The host synchronisation of a flush: the buffered per-step values (averaged over ranks) read in one
        transfer, the device synchronised, the fp16 scales counted. The benchmark times steps with this."""
        reduce = (lambda x: self.accelerator.reduce(x, reduction="mean")) if self.rt.world_size > 1 else None
        rows = self.losses.flush(reduce)
        from ..device import synchronize

        synchronize(self.args.device)
        self.precision.flush()
        return rows

    def flush(self) -> bool:
        """Read the buffered values (the host sync), log, checkpoint, validate. True when pre-empted."""
        a, st = self.args, self.state
        first = self.losses.steps[0] if self.losses.steps else st.global_step
        rows = self.read_buffer()
        wall = time.perf_counter() - self._interval_start
        if self.precision.scaler is None and not self.engine.owns_precision:
            for r in rows:
                if r["loss"] != r["loss"] or abs(r["loss"]) == float("inf"):
                    raise TrainingError(
                        f"step {r['step']}: the loss is {r['loss']} ({a.mixed_precision} precision). Training "
                        f"stopped; nothing from this step was saved and {self.ledger.safety_note()}. Lower "
                        f"--learning_rate, set --max_grad_norm, or allow skips with --max_bad_steps N")
        fps = self.meter.record(first, rows, wall, self._data_seconds)
        st.history = self.meter.history
        self.log(rows, fps)
        step = st.global_step
        preempt = self.any_rank(self.preemption.requested)
        if step % a.checkpointing_steps == 0 or preempt:
            self.checkpointer.save()
        if (a.validation_prompts and a.validation_steps and step % a.validation_steps == 0
                and step < a.max_train_steps and not preempt and self.validate(f"step-{step}")):
            self.checkpointer.save()
            return True
        self._interval_start, self._data_seconds = time.perf_counter(), 0.0
        return preempt

    def log(self, rows: List[dict], fps: float) -> None:
        a = self.args
        if not self.rt.is_main:
            return
        for r in rows:
            extra = {k: v for k, v in r.items() if k not in ("step", "lr", "loss")}
            if not self.show_bar:
                print(step_line(r["step"], a.max_train_steps, r["loss"], fps, r["lr"], extra), flush=True)
            if a.report_to not in ("none", ""):
                self.accelerator.log({"train_loss": r["loss"], "images_per_sec": fps, "lr": r["lr"], **extra},
                                     step=r["step"])
        if self.bar is not None and rows:
            self.bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", img_s=f"{fps:.1f}")

    # ------------------------------------------------------------------------------------------- finish
    def finish(self, exit_reason: str) -> dict:
        """After the last step (or a pre-emption): final validation, final save, learning check, summary. A
        signal now lets the current save finish and skips the rest (saving a checkpoint if needed)."""
        a, rt = self.args, self.rt
        self.preemption.enter("the final save")
        extra, hub_error = {}, None
        if exit_reason == "completed":
            if self.ema is not None:
                self.ema.swap_in()  # the averaged weights are what we validate and save
            if self.validate("final"):
                if self.ema is not None:
                    self.ema.swap_out()  # a checkpoint holds the training weights
                self.checkpointer.save()
                exit_reason = "preempted"
            else:
                extra["output"] = self.save_final()  # a signal now only sets the flag: the save finishes
                if self.any_rank(self.preemption.requested):
                    exit_reason = "preempted"
                elif a.learning_check and rt.is_main:
                    try:
                        extra["learning_check"] = evaluation.run_learning_check(self)
                    except PreemptRequested:
                        exit_reason = "preempted"
                if a.push_to_hub and rt.is_main and exit_reason == "completed":
                    from .hub import push_output

                    try:
                        extra["hub"] = push_output(self, extra["output"])
                    except UsageError as e:  # offline: the output is kept; say what was not pushed
                        hub_error = e
            rt.barrier()
        summary = evaluation.write_summary(self, exit_reason, extra)
        if hub_error is not None:
            raise hub_error
        check = extra.get("learning_check")
        if check is not None and not check["passed"]:
            raise LearningCheckFailed(f"learning check {check['agreement'] * 100:.1f}% is below the required "
                                      f"{check['threshold'] * 100:.1f}% (--learning_check_min); the trained model "
                                      f"is saved in {a.output_dir}, see learning_check.png")
        return summary

    def validate(self, tag: str) -> bool:
        """A validation grid; True (agreed by every rank) when a signal interrupted it."""
        interrupted = False
        try:
            evaluation.validate(self, tag)
        except PreemptRequested:
            interrupted = True
        return self.any_rank(interrupted)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a collective: every rank calls it at the same point)."""
        return self.engine.any_rank(flag, self.rt.device)

    def save_final(self) -> dict:
        """The task's final output, written into a temp folder and installed into --output_dir."""
        import os
        import shutil

        from .. import checkpoint as ckpt

        a, rt = self.args, self.rt
        tmp = ckpt.tmp_path_for(os.path.join(a.output_dir, "output"))
        if rt.is_main:
            self.ledger.begin(tmp)
            ckpt.begin(os.path.join(a.output_dir, "output"))
        rt.barrier()
        files = self.task.save_final(tmp)
        rt.barrier()
        if rt.is_main:
            names = ckpt.install_folder_contents(tmp, a.output_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            self.ledger.done(temp=tmp, final=a.output_dir)
            what = {"pipeline": "the trained pipeline", "lora": "the LoRA weights",
                    "textual_inversion": "the learned embedding", "controlnet": "the trained ControlNet"}
            logger.info("saved %s to %s (%s)", what.get(self.task.output_kind, "the output"), a.output_dir,
                        ", ".join(sorted(files or names)))
        return {"kind": self.task.output_kind, "folder": os.path.abspath(a.output_dir),
                "files": sorted(files or [])}

    # ------------------------------------------------------------------------------------------ helpers
    def close(self) -> None:
        """Close the progress bar and the trackers. Not accelerator.end_training(): that also destroys the
        process group, which a caller running several trainings in one group (the self-check, tests, the
        benchmark) still needs; it is destroyed at interpreter exit instead (see train.prepare_args)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        if self.engine is not None:
            self.engine.close()

    def loader(self, start_position: int):
        from ..data.dataset import collate

        a = self.args
        self.sampler.start_position = start_position
        workers = a.dataloader_num_workers
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
            pin_memory=bool(a.enable_pin_memory), persistent_workers=bool(a.enable_persistent_workers) and workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # A private generator: creating the iterator must not consume the global RNG (exact resume).
            generator=torch.Generator())

    def model_parts(self) -> List[torch.nn.Module]:
        """The trained sub-modules (for train/eval mode switches)."""
        return list(self.accelerator.unwrap_model(self.model).children()) if self.accelerator else []
