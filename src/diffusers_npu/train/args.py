"""Command-line flags shared by every training task.

Flag names follow the upstream diffusers example scripts and the original Ascend port, so commands users
already have keep working; each upstream flag has its upstream effect (or, where it cannot apply, says so
in one line). A task adds its own flags (``Task.add_arguments``) and may change defaults
(``Task.defaults``). ``--config FILE`` (YAML or JSON, keys are flag names) is read and validated by
:mod:`diffusers_npu.train.config`; the command line wins over the file.

Help texts state each effective default once; defaults that depend on the device or on the embedded model
are resolved by :func:`diffusers_npu.train.config.resolve_defaults` and say so.
"""
from __future__ import annotations

import argparse

from ..cliutil import (ArgumentParser, multiple_of_8, nonneg_float, nonneg_int, number, positive_float,
                       positive_int, unit_float)

from .ranks import DEFAULT_TIMEOUT_S

DISTRIBUTED_MODES = ("ddp", "fsdp", "deepspeed")
OPTIMIZERS = ("adamw", "fused_adamw", "megatron_adamw", "adamw_8bit", "prodigy")


# Value types: the project's one set (cliutil), so every entry point words a bad number the same way.
resolution_type = multiple_of_8


def _switch(group, name, help):
    """An on/off flag; ``--no-<name>`` turns off what a ``--config`` file turned on (the command line wins)."""
    group.add_argument(name, action=argparse.BooleanOptionalAction, default=False, help=help)


# ------------------------------------------------------------------------------------- the flags
def common_parser(prog: str, description: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON file whose keys are flag names (without '--'); values are checked like "
                        "command-line values, and the command line wins over the file")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None, metavar="FOLDER_OR_ID",
                   help="diffusers pipeline folder (or Hub id, online only); default: the embedded offline "
                        "digits model, made on first use")
    g.add_argument("--revision", default=None, help="Hub revision of the pretrained model")
    g.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    g.add_argument("--tokenizer_name", default=None, metavar="FOLDER_OR_ID",
                   help="load the tokenizer from here instead of the model's 'tokenizer' folder")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                   help="training target; default: the scheduler's own setting")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="Hub id, or a local folder / parquet|json|csv file read with datasets.load_dataset (the "
                        "original port's pokemon layout works); default: the embedded digits data set")
    g.add_argument("--dataset_config_name", default=None, help="config name of the data set")
    g.add_argument("--local_data_dir", default=None, metavar="FOLDER",
                   help="a folder written by datasets' save_to_disk, read with load_from_disk")
    g.add_argument("--train_data_dir", default=None, metavar="FOLDER",
                   help="image folder with metadata.jsonl (file_name + caption), read as an imagefolder")
    g.add_argument("--image_column", default="image", help="column holding the images")
    g.add_argument("--caption_column", default="text",
                   help="column holding captions (a string, or a list of strings: one is picked per sample)")
    g.add_argument("--max_train_samples", type=positive_int, default=None, metavar="N",
                   help="train on the first N samples only")
    g.add_argument("--resolution", type=resolution_type, default=None, metavar="PX",
                   help="training resolution, a multiple of 8; default 512 (1024 for SDXL), or 16 for the embedded "
                        "model")
    _switch(g, "--center_crop", "center crop instead of a random crop")
    _switch(g, "--random_flip", "flip images horizontally at random (per sample and epoch)")
    g.add_argument("--image_interpolation_mode", default="lanczos",
                   choices=["lanczos", "bilinear", "bicubic", "nearest", "nearest_exact", "box", "hamming"],
                   help="resampling filter used to resize images")
    _switch(g, "--aspect_ratio_buckets",
            "group images by aspect ratio into buckets of about resolution^2 pixels; each batch comes from one "
            "bucket and is resized/cropped to it (no square crop of every image)")
    g.add_argument("--bucket_max_ratio", type=number(float, 1.0, what="a number >= 1"), default=2.0, metavar="R",
                   help="with --aspect_ratio_buckets: the most elongated bucket's long side / short side")
    _switch(g, "--skip_bad_images", "skip (and count) rows whose image cannot be decoded instead of stopping")
    g.add_argument("--dataloader_num_workers", type=nonneg_int, default=0, metavar="N",
                   help="data loading worker processes (0 = load in the training process)")
    _switch(g, "--enable_pin_memory", "pin host memory in the DataLoader (faster host-to-device copies)")
    _switch(g, "--enable_persistent_workers", "keep DataLoader workers alive between epochs")
    _switch(g, "--cache_latents",
            "encode images (VAE) and captions (text encoders) once into a sharded on-disk cache (every process "
            "encodes a share; an interrupted build resumes) and train from it, reading only each batch's rows; "
            "the encoders then leave the device")
    _switch(g, "--streaming",
            "read --dataset_name's parquet shards (a folder, a file or a glob) in place, row groups as batches need "
            "them, instead of copying the data set into a local Arrow cache first (datasets' streaming=True); "
            "with --aspect_ratio_buckets the sizes come from integer 'width'/'height' columns")
    g.add_argument("--shuffle_buffer_size", type=positive_int, default=1000, metavar="ROWS",
                   help="with --streaming: rows are shuffled within windows of consecutive parquet row groups holding "
                        "at least this many rows (datasets' shuffle buffer); windows are visited in a seeded order")
    g.add_argument("--cache_dir", default=None, metavar="FOLDER",
                   help="where the latent cache lives, a folder every process (every node) sees; default "
                        "$DIFFUSERS_NPU_HOME/cache/latents")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="sd-model-finetuned", metavar="FOLDER",
                   help="where checkpoints, logs and the trained output go")
    g.add_argument("--seed", type=nonneg_int, default=0,
                   help="random seed of data order, augmentation, noise and new weights (upstream: random; fixed "
                        "here so that a rerun and a resume reproduce the run)")
    g.add_argument("--train_batch_size", type=positive_int, default=16, metavar="N", help="batch size per device")
    g.add_argument("--num_train_epochs", type=positive_int, default=100, metavar="N",
                   help="epochs to train when --max_train_steps is not given")
    g.add_argument("--max_train_steps", type=positive_int, default=None, metavar="N",
                   help="optimizer steps to train; default: --num_train_epochs epochs")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, metavar="N",
                   help="micro-batches per optimizer step")
    _switch(g, "--gradient_checkpointing", "recompute activations in the backward pass to save memory")
    g.add_argument("--gradient_checkpointing_fraction", type=unit_float, default=1.0, metavar="F",
                   help="with --gradient_checkpointing: fraction of UNet blocks to checkpoint, outermost "
                        "(largest activations) first, like the original port's partial checkpointing")
    g.add_argument("--learning_rate", type=nonneg_float, default=1e-4, metavar="LR", help="initial learning rate")
    _switch(g, "--scale_lr", "multiply the learning rate by batch size x accumulation steps x processes")
    g.add_argument("--lr_scheduler", default="constant",
                   help="learning-rate schedule: any name diffusers.optimization.get_scheduler accepts (linear, "
                        "cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, ...)")
    g.add_argument("--lr_warmup_steps", type=nonneg_int, default=500, metavar="N", help="warm-up steps")
    g.add_argument("--lr_num_cycles", type=positive_int, default=1, metavar="N",
                   help="hard restarts of cosine_with_restarts")
    g.add_argument("--lr_power", type=positive_float, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--snr_gamma", type=positive_float, default=None,
                   help="Min-SNR loss weighting gamma (https://arxiv.org/abs/2303.09556); 5.0 is common; default: "
                        "off (plain MSE)")
    g.add_argument("--noise_offset", type=nonneg_float, default=0.0, help="noise offset scale (0.1 is common)")
    g.add_argument("--input_perturbation", type=nonneg_float, default=0.0,
                   help="input perturbation scale (https://arxiv.org/abs/2301.11706); 0.1 is common")
    g.add_argument("--proportion_empty_prompts", type=unit_float, default=0.0, metavar="P",
                   help="fraction of captions replaced by '' (teaches classifier-free guidance)")
    _switch(g, "--per_sample_noise",
            "draw each sample's noise and timestep from a generator seeded by (seed, epoch, index): results then "
            "do not depend on how a global batch is split over processes or accumulation steps")
    _switch(g, "--use_ema", "keep an exponential moving average of the trained weights (saved and used at the end)")
    g.add_argument("--ema_decay", type=unit_float, default=0.9999, help="EMA decay (reached after a warm-up)")
    _switch(g, "--offload_ema", "keep the EMA weights in CPU memory (moved to the device for each update)")
    _switch(g, "--foreach_ema", "update the EMA with multi-tensor (foreach) kernels: faster, more memory")
    g.add_argument("--non_ema_revision", default=None,
                   help="Hub revision of the non-EMA weights to train from (upstream text-to-image flag)")
    g.add_argument("--max_grad_norm", type=nonneg_float, default=1.0, metavar="N",
                   help="clip gradients to this norm (of unscaled gradients under fp16); 0 disables clipping")
    g.add_argument("--max_bad_steps", type=nonneg_int, default=0, metavar="N",
                   help="skip up to N steps whose loss is NaN/inf (fp32/bf16; costs a host sync per step) "
                        "before stopping; 0 = stop at the first one")
    g.add_argument("--max_consecutive_overflows", type=positive_int, default=25, metavar="N",
                   help="fp16: stop with an error when the GradScaler skips N steps in a row (the run is "
                        "diverging; every later step would be skipped too)")
    _switch(g, "--set_grads_to_none", "free gradients after each step (set to None) instead of zeroing them")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=None, choices=OPTIMIZERS, type=str.lower,
                   help="optimizer (any case: upstream's 'AdamW' works); default fused_adamw on NPU/CUDA, adamw on CPU. "
                        "prodigy (upstream's DreamBooth READMEs; needs prodigyopt, set --learning_rate 1.0) runs "
                        "with one process or --distributed ddp")
    _switch(g, "--use_megatron_npu_adamW", "original port flag: same as --optimizer megatron_adamw")
    _switch(g, "--use_npu_fuse_adamW", "original port flag: same as --optimizer fused_adamw")
    _switch(g, "--use_8bit_adam", "upstream flag: same as --optimizer adamw_8bit (needs bitsandbytes)")
    _switch(g, "--use_clip_grad_norm_fused",
            "original port flag: clip with the NPU fused clip (needs the fused optimizer)")
    g.add_argument("--adam_beta1", type=unit_float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=unit_float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_weight_decay", type=nonneg_float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="AdamW epsilon")

    g = p.add_argument_group("device, distribution and speed")
    g.add_argument("--device", default=None, choices=["npu", "cuda", "cpu"],
                   help="force a device; default: NPU, else CUDA, else CPU (or $DIFFUSERS_NPU_DEVICE)")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="autocast precision; default bf16 where the device has it (CUDA/NPU), else no")
    g.add_argument("--distributed", default="ddp", choices=DISTRIBUTED_MODES,
                   help="engine for several processes: ddp (replicated, overlapped all-reduce), fsdp (sharded "
                        "parameters, gradients and optimizer state), deepspeed (ZeRO, --zero_stage)")
    g.add_argument("--zero_stage", type=int, default=2, choices=[2, 3], help="DeepSpeed ZeRO stage")
    g.add_argument("--nccl_timeout", type=positive_int, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="how long a collective may wait for the other ranks before the job fails, for every "
                        "backend (NCCL, HCCL, gloo; upstream's name). Long single-process phases (class images, "
                        "validation, the learning check, the final save) keep the other ranks waiting; torch's "
                        f"defaults (600 s NCCL, 1800 s gloo) can kill such a run. Default {DEFAULT_TIMEOUT_S}")
    g.add_argument("--save_consolidated", action="store_true",
                   help="under FSDP / ZeRO-3, gather the final trained model onto the main process and write single "
                        "files (that process then holds the whole model on its CPU). Default: each rank writes the "
                        "tensors it owns in diffusers' sharded layout (an index plus one file per rank), which "
                        "from_pretrained reads; no rank holds the whole model. Checkpoints are always sharded")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="set by old launchers (torch.distributed.launch); the LOCAL_RANK variable wins")
    g.add_argument("--attention", default=None, choices=["auto", "flash", "upcast", "default"],
                   help="attention implementation (diffusers_npu.set_attention); default auto")
    _switch(g, "--enable_npu_flash_attention", "original port flag: same as --attention flash")
    _switch(g, "--enable_xformers_memory_efficient_attention",
            "upstream flag: uses this project's fused attention (--attention flash: NPU fusion attention or "
            "PyTorch's flash/memory-efficient SDPA), which needs no xformers")
    _switch(g, "--allow_tf32", "allow TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--channels_last", default=None, action=argparse.BooleanOptionalAction,
                   help="channels_last memory format for the UNet; default on for CUDA, off on NPU (torch_npu "
                        "refuses it) and CPU")
    _switch(g, "--compile", "torch.compile the UNet (the first steps pay tens of seconds to minutes of warm-up)")
    g.add_argument("--log_every", type=positive_int, default=None, metavar="N",
                   help="read losses back from the device every N steps (no host sync in between); default 1 "
                        "on CPU, 10 elsewhere")

    g = p.add_argument_group("checkpoints, validation and logging")
    g.add_argument("--checkpointing_steps", type=positive_int, default=500, metavar="N",
                   help="save a checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=None, metavar="N",
                   help="keep at most N checkpoints (the newest complete one is never removed); default: keep all")
    g.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|latest",
                   help="a checkpoint-N folder, or 'latest' (the newest complete checkpoint that verifies; starts fresh when "
                        "there is none, so the same command serves the first run and every rerun)")
    g.add_argument("--checkpoint_verification", choices=("hashes", "sizes"), default="hashes",
                   help="what resuming checks against the checkpoint's manifest.json before using it: 'hashes' "
                        "(default) the size and CRC-32 of every file (reads the whole checkpoint once, ~0.6 GB/s "
                        "measured on a CPU); 'sizes' only the sizes, for very large checkpoints. A damaged "
                        "'latest' checkpoint is renamed <name>.damaged and the next older one is used")
    g.add_argument("--validation_prompts", nargs="*", default=None, metavar="PROMPT",
                   help="prompts for validation image grids; default: none (no validation images)")
    g.add_argument("--validation_prompt", nargs="+", default=None, metavar="PROMPT",
                   help="upstream spelling: validation prompt(s), added to --validation_prompts")
    g.add_argument("--validation_steps", type=positive_int, default=None, metavar="N",
                   help="validate every N steps; default: only at the end")
    g.add_argument("--validation_epochs", type=positive_int, default=None, metavar="N",
                   help="validate every N epochs (converted to steps)")
    g.add_argument("--num_validation_images", type=nonneg_int, default=4, metavar="N",
                   help="images per validation prompt; 0: no validation images (as upstream)")
    g.add_argument("--validation_inference_steps", type=positive_int, default=30, metavar="N",
                   help="denoising steps of validation images")
    g.add_argument("--report_to", default="tensorboard",
                   help="experiment tracker(s) accelerate supports: tensorboard, wandb, comet_ml, all, none, ...")
    g.add_argument("--tracker_project_name", default=None, help="project name for the tracker; default: the task")
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--learning_check", default=None, action=argparse.BooleanOptionalAction,
                   help="after training the embedded digits model, generate 10 images per digit, save them as "
                        "learning_check.png and report how many a digits classifier reads as the prompt's digit "
                        "(the launcher asks for it on the main job); default off")
    g.add_argument("--learning_check_min", type=unit_float, default=0.9, metavar="F",
                   help="the learning check fails (exit code 4) below this fraction")
    _switch(g, "--disable_progress_bar", "print one log line per logged step instead of a progress bar")
    _switch(g, "--push_to_hub", "upload the trained output to the Hugging Face Hub at the end (needs network; "
                                "offline, the local output is kept and a one-line error says what was not pushed)")
    g.add_argument("--hub_model_id", default=None, help="Hub repository for --push_to_hub; default: output folder name")
    g.add_argument("--hub_token", default=None, help="Hub token for --push_to_hub (default: the logged-in one)")
    return p

