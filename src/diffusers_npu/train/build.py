"""Assembling a run (called once by :meth:`Trainer.setup`): runtime, task module, speed options, data,
optimizer and schedule, the engine (``accelerator.prepare``), EMA, trackers.

Kept apart from the loop so that ``loop.py`` reads top to bottom as the training itself.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from .. import checkpoint as ckpt
from ..errors import TrainingError, UsageError

logger = logging.getLogger(__name__)


def runtime_and_precision(t) -> None:
    """Device settings, threads, the engine, the Runtime the task sees, the precision policy, and the model seed."""
    from .. import device as dev
    from .engine import Engine
    from .precision import Precision
    from .ranks import process_state
    from .task import Runtime

    a = t.args
    state = process_state(a.device, a.nccl_timeout)
    dev.apply_device_settings(a.device, allow_tf32=a.allow_tf32)
    if a.device == "cpu":
        t.threads_note = dev.configure_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))[1]
        # Denormal floats (tiny weights late in training) make x86 float maths up to ~100x slower.
        torch.set_flush_denormal(True)
    t.engine = Engine.from_args(a, state.num_processes, state.process_index)
    t.engine.check_args(a)
    t.rt = Runtime(device=state.device, rank=state.process_index, world_size=state.num_processes,
                   is_main=state.is_main_process, is_local_main=state.is_local_main_process,
                   barrier=state.wait_for_everyone, sharded=t.engine.is_sharded, ledger=t.ledger,
                   preemption=t.preemption)
    t.precision = Precision(a.mixed_precision, state.device, sharded=t.engine.kind == "fsdp",
                            engine_owns_scaling=t.engine.owns_precision, max_consecutive=a.max_consecutive_overflows)
    t.rt.weight_dtype = t.precision.weight_dtype
    # The same seed on every rank while the models are built (LoRA's initial weights, new embedding rows):
    # they must not depend on the rank or the world size. seed_per_rank() follows once they exist.
    dev.seed_everything(a.seed)


def seed_per_rank(t) -> None:
    """After the models are built: each rank draws its own noise for its own samples (data order depends on
    --seed alone; with --per_sample_noise the noise of a sample too)."""
    from .. import device as dev

    dev.seed_everything(t.args.seed + t.rt.rank)


def module_and_speed(t) -> torch.nn.Module:
    """Load the task's models and apply attention, gradient checkpointing, channels_last and compile."""
    from ..attention import set_attention
    from ..npu_norm import use_fused_rms_norm
    from . import memory_plan

    a, task = t.args, t.task
    module = task.build_module()
    memory_plan.check(t, module)  # print the bytes per rank; refuse a plan that cannot fit the device
    for model in task.attention_models():
        set_attention(model, a.attention)
        if a.device == "npu":  # torch_npu's fused RMSNorm for the transformers' q/k norms (npu_norm.py)
            use_fused_rms_norm(model)
    if a.gradient_checkpointing:
        for model in task.checkpointing_models():
            enable_gradient_checkpointing(model, a.gradient_checkpointing_fraction)
    if a.channels_last:
        for model in task.attention_models():
            model.to(memory_format=torch.channels_last)
    if a.compile:
        for model in task.compile_models():
            # The compiled callable serves the forward only; state dicts come from the module itself.
            model.forward = torch.compile(model.forward)
    module.train()
    return module


def data(t) -> None:
    """Dataset (or latent cache), the batch sampler, and --max_train_steps / validation in steps."""
    from ..data.sampling import BucketBatchSampler, ResumableBatchSampler

    a, task, rt = t.args, t.task, t.rt
    dataset = task.build_dataset()
    if getattr(a, "streaming", False) and not hasattr(getattr(dataset, "ds", None), "group_sizes"):
        raise UsageError(f"--streaming is not available for {task.name} (its samples do not come from "
                         f"--dataset_name's rows)")
    if a.cache_latents:
        dataset = cached(t, dataset)
    buckets = getattr(dataset, "bucket_of_row", None)
    if buckets is None and getattr(dataset, "buckets", None) is not None:
        buckets = dataset.buckets.of_row
    rows = getattr(dataset, "ds", None)
    if getattr(a, "streaming", False) and hasattr(rows, "group_sizes"):
        from ..data.streaming import StreamingBatchSampler

        sampler = StreamingBatchSampler(rows.group_sizes(), a.shuffle_buffer_size, a.train_batch_size, a.seed,
                                        rt.world_size, rt.rank, bucket_of_row=buckets if a.aspect_ratio_buckets
                                        else None)
        rows.cached_groups = sampler.max_groups_per_window + 1  # a window's row groups, read once each
    elif a.aspect_ratio_buckets and buckets is not None:
        sampler = BucketBatchSampler(buckets, a.train_batch_size, a.seed, rt.world_size, rt.rank)
    else:
        sampler = ResumableBatchSampler(len(dataset), a.train_batch_size, a.seed, rt.world_size, rt.rank)
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / a.gradient_accumulation_steps)
    if a.max_train_steps is None:
        a.max_train_steps = a.num_train_epochs * steps_per_epoch
    if a.validation_epochs:
        a.validation_steps = a.validation_epochs * steps_per_epoch
    t.dataset, t.sampler, t.steps_per_epoch = dataset, sampler, steps_per_epoch


def cached(t, dataset):
    """The sharded latent cache for the run (checked; built or repaired by ALL ranks, each its share of the
    shards; global main writes the index), as the data set. The folder must be one every process sees."""
    from ..data.cache import CachedDataset, LatentCache
    from ..embedded import home

    a, task, rt = t.args, t.task, t.rt
    encode_images, encode_prompts, key = task.cache_encoders()
    root = a.cache_dir or os.path.join(home(), "cache", "latents")
    cache = LatentCache.load_or_build(root, key, dataset, encode_images, encode_prompts, a.random_flip,
                                      progress=rt.is_main and t.show_bar, rank=rt.rank,
                                      world_size=rt.world_size, barrier=rt.barrier)
    empty = None
    if a.proportion_empty_prompts:
        empty = {k: v[0] for k, v in encode_prompts([""]).items()}
    task.release_encoders()
    t.cache_info = {"folder": cache.folder, "hit": cache.hit}
    return CachedDataset(cache, a.seed, a.random_flip, a.proportion_empty_prompts, empty)


def optimizer_and_schedule(t, module) -> None:
    from diffusers.optimization import get_scheduler

    from ..optim import build_optimizer

    a, rt = t.args, t.rt
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"the {t.task.name} task has no trainable parameters")
    scale = a.train_batch_size * a.gradient_accumulation_steps * rt.world_size if a.scale_lr else 1
    lr = a.learning_rate * scale
    groups = t.task.optimizer_groups(params)
    if groups:  # e.g. the text encoders' own learning rate; --scale_lr scales every group alike
        params = [dict(g, lr=g["lr"] * scale) if "lr" in g else g for g in groups]
        if a.optimizer == "prodigy":  # Prodigy adapts one step size: one learning rate for all groups, as upstream
            others = sorted({g["lr"] for g in params if "lr" in g and g["lr"] != lr})
            if others:
                logger.warning("--optimizer prodigy uses --learning_rate %g for every parameter group (as upstream); "
                               "the groups' own rates %s are not used", lr, others)
            params = [dict(g, lr=lr) for g in params]
    # With an fp16 GradScaler the optimizer must take the scaler's found_inf on the device, or every
    # scaler.step would wait for the host (see optim.supports_sync_free_amp).
    try:
        t.optimizer = build_optimizer(a.optimizer, params, lr=lr, betas=(a.adam_beta1, a.adam_beta2),
                                      eps=a.adam_epsilon, weight_decay=a.adam_weight_decay,
                                      grad_scaling=t.precision.scaler is not None, engine=t.engine.kind,
                                      prodigy={k: getattr(a, f"prodigy_{k}", None) for k in
                                               ("beta3", "decouple", "use_bias_correction", "safeguard_warmup")})
    except ImportError as e:  # adamw_8bit without bitsandbytes, prodigy without prodigyopt
        flag = "--use_8bit_adam" if a.use_8bit_adam else f"--optimizer {a.optimizer}"
        raise UsageError(f"{flag}: {e}") from None
    try:
        t.lr_scheduler = get_scheduler(a.lr_scheduler, t.optimizer, num_warmup_steps=a.lr_warmup_steps,
                                       num_training_steps=a.max_train_steps, num_cycles=a.lr_num_cycles,
                                       power=a.lr_power)
    except (ValueError, KeyError) as e:
        raise UsageError(f"--lr_scheduler {a.lr_scheduler}: {e}") from None


def engine(t, module) -> None:
    """The engine wraps the module (``accelerator.prepare``; one process: moved to the device)."""
    e = t.engine
    t.accelerator = e.make_accelerator(t.args, module)
    t.model = e.prepare(module, t.optimizer)
    t.optimizer = e.optimizer
    t.params = e.trainable_parameters()


def ema(t) -> None:
    from .ema import EMA

    a = t.args
    if a.use_ema:
        model = t.task.ema_model()
        if model is None:
            raise UsageError(f"--use_ema is not available for {t.task.name}")
        t.ema = EMA(model, a.ema_decay, offload=a.offload_ema, foreach=a.foreach_ema)


def trackers(t) -> None:
    a, rt = t.args, t.rt
    if rt.is_main and a.report_to not in ("none", ""):
        cfg = {k: v for k, v in vars(a).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        t.accelerator.init_trackers(a.tracker_project_name or f"diffusers_npu_{t.task.name}", config=cfg)


def output_folder(t) -> None:
    """Check --output_dir is writable, that every rank sees the same folder (several nodes need a shared
    filesystem), and collect what killed runs left there (main process)."""
    from .ranks import check_same_folder

    a, rt = t.args, t.rt
    if rt.is_main:
        ckpt.check_writable(a.output_dir)
    rt.barrier()
    check_same_folder(a.output_dir)
    if rt.is_main:
        for path in ckpt.collect_stale(a.output_dir):
            logger.info("removed what an interrupted run left behind: %s", path)
    rt.barrier()


def enable_gradient_checkpointing(model, fraction: float = 1.0) -> None:
    """Checkpoint all blocks of a UNet-like model, or only the outermost ``fraction`` of them (largest
    activations first, as the original port's partial checkpointing)."""
    if hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()  # diffusers models
    else:
        model.gradient_checkpointing_enable()  # transformers models (a trained text encoder)
    if fraction >= 1.0 or not hasattr(model, "down_blocks"):
        return
    down = list(model.down_blocks)
    up = list(getattr(model, "up_blocks", []))[::-1]
    order = [b for pair in zip(down, up) for b in pair] + down[len(up):] + \
        ([model.mid_block] if getattr(model, "mid_block", None) is not None else [])
    keep = max(0, round(len(order) * fraction))
    for block in order[keep:]:
        for m in block.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False


def plan_line(t, resume) -> str:
    """The one start-of-run line: task, model, data, steps, batch x devices x accumulation, precision, engine,
    output folder and the expected time when it was measured (the embedded default)."""
    from .config import expected_time

    a, rt = t.args, t.rt
    model = a.pretrained_model_name_or_path + (" (the embedded digits model)" if a.embedded else "")
    data = a.dataset_name or a.local_data_dir or a.train_data_dir or getattr(a, "instance_data_dir", None) or "-"
    start = t.state.global_step + 1
    steps = f"{a.max_train_steps:,} steps" + (f" (from step {start:,}, resumed from {resume})" if resume else "")
    devices = f"{rt.world_size} {a.device} device{'s' if rt.world_size > 1 else ''}"
    batch = (f"batch {a.train_batch_size} x {devices} x {a.gradient_accumulation_steps} accumulation = "
             f"{a.train_batch_size * rt.world_size * a.gradient_accumulation_steps}")
    precision = {"no": "fp32"}.get(a.mixed_precision, a.mixed_precision)
    engine = "one process" if rt.world_size == 1 else f"{a.distributed}, {rt.world_size} processes"
    expected = expected_time(a, t.task_cls) or "unknown (the progress line shows an ETA)"
    return (f"Plan: {t.task.name} | model {model} | data {data} | {steps} | {batch} | {precision} | {engine} | "
            f"output {os.path.abspath(a.output_dir)} | expected time {expected}")
