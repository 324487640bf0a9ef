"""Command-line flags shared by every training task.

Flag names follow the upstream diffusers examples and the original Ascend port, so existing commands keep
working. ``--config FILE`` (YAML or JSON, keys are flag names without dashes) sets defaults; the command line
wins over the file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


class ConfigError(ValueError):
    pass


def _bool_flag(p, name, help):
    p.add_argument(name, action="store_true", help=help)


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML/JSON file whose keys are flag names (without '--'); the command line wins")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="diffusers pipeline folder or hub id; omit to use the embedded offline digits model")
    g.add_argument("--revision", default=None, help="hub revision of the pretrained model")
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                   help="training target; default: the scheduler's own setting")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="hub id, or a local folder / parquet file read with datasets.load_dataset "
                        "(the original's pokemon layout works); omit for the embedded digits data set")
    g.add_argument("--dataset_config_name", default=None, help="config name of the data set")
    g.add_argument("--local_data_dir", default=None,
                   help="a folder written by datasets' save_to_disk, read with load_from_disk")
    g.add_argument("--train_data_dir", default=None, help="image folder with metadata.jsonl (imagefolder)")
    g.add_argument("--image_column", default="image", help="column holding the images")
    g.add_argument("--caption_column", default="text", help="column holding captions (string or list)")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N samples")
    g.add_argument("--resolution", type=int, default=None,
                   help="training resolution (divisible by 8); default 512, or 16 for the embedded model")
    g.add_argument("--center_crop", action="store_true", help="center crop instead of a random crop")
    g.add_argument("--random_flip", action="store_true", help="randomly flip images horizontally")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="skip (and count) rows whose image cannot be decoded instead of stopping")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="data loading worker processes")
    _bool_flag(g, "--enable_pin_memory", "pin host memory in the DataLoader (faster host->device copies)")
    _bool_flag(g, "--enable_persistent_workers", "keep DataLoader workers alive between epochs")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode images (VAE) and captions (text encoder) once into an on-disk cache and "
                        "train from it; the encoders then leave the device")
    g.add_argument("--cache_dir", default=None,
                   help="where the latent cache and data set cache live (default $DIFFUSERS_NPU_HOME/cache)")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="sd-model-finetuned", help="where checkpoints, logs and the "
                                                                       "final pipeline go")
    g.add_argument("--seed", type=int, default=None, help="random seed (default 0 for reproducibility)")
    g.add_argument("--train_batch_size", type=int, default=16, help="batch size per device")
    g.add_argument("--num_train_epochs", type=int, default=100,
                   help="epochs to train when --max_train_steps is not given")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer steps to train (overrides --num_train_epochs)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass to save memory")
    g.add_argument("--gradient_checkpointing_fraction", type=float, default=1.0,
                   help="with --gradient_checkpointing: fraction of UNet blocks to checkpoint (outermost first, "
                        "as the original port's release_part_gradient_checkpointing); 1.0 = all")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="initial learning rate")
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rate by batch size x accumulation x processes")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"], help="learning-rate schedule")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="warm-up steps of the schedule")
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 is common)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="noise offset (0.1 is common)")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="fraction of captions replaced by '' (helps classifier-free guidance)")
    g.add_argument("--per_sample_noise", action="store_true",
                   help="draw each sample's noise/timestep from a generator seeded by (seed, epoch, index): results "
                        "then do not depend on batch split, accumulation or number of processes (slightly slower)")
    g.add_argument("--use_ema", action="store_true", help="keep an exponential moving average of the weights")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay")
    g.add_argument("--max_grad_norm", type=float, default=None,
                   help="clip gradients to this norm (on unscaled gradients under fp16); none by default")
    g.add_argument("--max_bad_steps", type=int, default=0,
                   help="skip up to N steps whose loss is NaN/inf (fp32/bf16) before stopping; 0 = stop at the "
                        "first one")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=None, choices=["adamw", "fused_adamw", "megatron_adamw", "adamw_8bit"],
                   help="optimizer; default fused_adamw on NPU/CUDA, adamw on CPU")
    _bool_flag(g, "--use_megatron_npu_adamW", "original port flag: same as --optimizer megatron_adamw")
    _bool_flag(g, "--use_npu_fuse_adamW", "original port flag: same as --optimizer fused_adamw")
    _bool_flag(g, "--use_8bit_adam", "upstream flag: same as --optimizer adamw_8bit")
    _bool_flag(g, "--use_clip_grad_norm_fused",
               "original port flag: clip with the NPU fused clip (needs the fused optimizer); implies "
               "--max_grad_norm 1.0 when none is given")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")

    g = p.add_argument_group("device and speed")
    g.add_argument("--device", default=None, choices=["npu", "cuda", "cpu"],
                   help="force a device (default: NPU, else CUDA, else CPU; or $DIFFUSERS_NPU_DEVICE)")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="autocast precision; default: bf16 where the device has it fast (CUDA/NPU), else no")
    g.add_argument("--attention", default=None, choices=["auto", "flash", "upcast", "default"],
                   help="attention implementation (see diffusers_npu.set_attention); default auto")
    _bool_flag(g, "--enable_npu_flash_attention", "original port flag: same as --attention flash")
    _bool_flag(g, "--allow_tf32", "allow TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--channels_last", default=None, action=argparse.BooleanOptionalAction,
                   help="channels_last memory format for the UNet (default on for CUDA/NPU)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (first steps pay a warm-up of tens of seconds to minutes)")
    g.add_argument("--log_every", type=int, default=None,
                   help="read the loss back from the device every N steps (no host sync in between); "
                        "default 1 on CPU, 10 elsewhere")

    g = p.add_argument_group("checkpoints, validation and logging")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-N folder, or 'latest' (continue from the newest complete checkpoint)")
    g.add_argument("--validation_prompts", nargs="*", default=None, help="prompts for validation images")
    g.add_argument("--validation_steps", type=int, default=None,
                   help="run validation every N steps (default: only at the end)")
    g.add_argument("--num_validation_images", type=int, default=4, help="images per validation prompt")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none", "all", "wandb"],
                   help="experiment tracker")
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--learning_check", default=None, action=argparse.BooleanOptionalAction,
                   help="after training, generate 10 images per digit and report how many a digits "
                        "classifier reads as the prompt's digit (default on for the embedded model)")
    g.add_argument("--disable_progress_bar", action="store_true", help="no tqdm bar (log lines only)")
    return p


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` become defaults so the command line wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = load_config_file(known.config)
        dests = {a.dest for a in parser._actions}
        unknown = sorted(k for k in values if k not in dests)
        if unknown:
            parser.error(f"--config {known.config}: unknown key(s) {', '.join(unknown)}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"--config: {path} is not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'}: "
                          f"{e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of flag names to values")
    return {k.lstrip("-").replace("-", "_"): v for k, v in data.items()}
