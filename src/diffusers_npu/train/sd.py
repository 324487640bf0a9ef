"""What every Stable Diffusion (1.x / 2.x) task shares: loading components, the module that computes the
loss, image-caption data (online or cached), pipelines that keep the base model's scheduler, and the
``training_info.json`` every output carries.

A concrete task is mostly its module's ``forward`` and what it saves.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import torch

from ..errors import ModelError, UsageError
from ..fsutil import write_json_atomic
from ..model_folder import TRAINING_INFO_NAME, check_pipeline_folder, hub_error, looks_local
from .objective import Objective
from .task import Task

logger = logging.getLogger(__name__)

FLAG = "--pretrained_model_name_or_path"
SD_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
              "tokenizer": "CLIPTokenizer", "scheduler": "DDPMScheduler"}


def load_component(kind: str, path: str, revision=None, variant=None, subfolder=None, cls_name=None,
                   torch_dtype=None):
    """Load one component of a pipeline folder (or Hub id), naming the flag and folder on failure.
    ``torch_dtype`` loads frozen models directly in half precision, the way diffusers expects (a later
    ``.to(dtype)`` makes it warn about modules to keep in fp32)."""
    import diffusers
    import transformers

    sub = subfolder if subfolder is not None else kind
    cls_name = cls_name or SD_CLASSES[kind]
    try:
        if kind == "scheduler":
            return diffusers.DDPMScheduler.from_pretrained(path, subfolder=sub, revision=revision)
        cls = getattr(diffusers, cls_name, None) or getattr(transformers, cls_name)
        kwargs = {} if kind.startswith("tokenizer") else {"variant": variant}
        if torch_dtype is not None and torch_dtype != torch.float32:
            kwargs["torch_dtype"] = torch_dtype
        return cls.from_pretrained(path, subfolder=sub, revision=revision, **kwargs)
    except Exception as e:
        if not looks_local(path):
            raise hub_error(path, FLAG, e) from None
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"{FLAG}: cannot load {kind} ({cls_name}) from {os.path.join(path, sub)}: "
                         f"{type(e).__name__}: {first}") from None


def base_scheduler(path: str, noise_scheduler):
    """The scheduler a saved pipeline should carry: the base model's own (class and config), as upstream
    keeps it; a DDIM built from the training config when the folder has none."""
    import diffusers

    try:
        cfg = diffusers.DDPMScheduler.load_config(path, subfolder="scheduler")
        cls = getattr(diffusers, cfg.get("_class_name", ""), None)
        if cls is not None:
            return cls.from_config(cfg)
    except Exception:  # no scheduler folder (or offline): fall back below
        pass
    return diffusers.DDIMScheduler.from_config(noise_scheduler.config)


class Frozen:
    """Models a module uses but does not train. A plain object on purpose: ``nn.Module`` would register them,
    so DDP would broadcast them, FSDP would shard them and their weights would land in checkpoints."""

    def __init__(self, **models):
        self.__dict__.update(models)


class SDModule(torch.nn.Module):
    """Base of the SD tasks' modules: latents and text states from a batch (online or cached)."""

    def __init__(self, frozen: Frozen, objective: Objective, weight_dtype: torch.dtype, **trainable):
        super().__init__()
        for name, module in trainable.items():
            self.add_module(name, module)
        self.frozen = frozen
        self.objective = objective
        self.weight_dtype = weight_dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def latents(self, batch, gens=None) -> torch.Tensor:
        vae = self.frozen.vae
        scale = vae.config.scaling_factor
        if "latent_moments" in batch:  # cached: sample from the stored posterior (mean, std)
            mean, std = batch["latent_moments"].to(self.device, non_blocking=True).chunk(2, dim=1)
            return (mean + std * self.objective.randn(std, gens)) * scale
        with torch.no_grad():
            px = batch["pixel_values"].to(self.device, self.weight_dtype, non_blocking=True)
            dist = vae.encode(px).latent_dist
            if gens is None:
                return dist.sample() * scale
            return (dist.mean + dist.std * self.objective.randn(dist.std, gens)) * scale

    def text_states(self, batch, text_encoder=None) -> torch.Tensor:
        """Prompt states; with ``text_encoder`` (a trained one) gradients flow into it."""
        if "encoder_hidden_states" in batch and text_encoder is None:
            return batch["encoder_hidden_states"].to(self.device, non_blocking=True)
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        if text_encoder is not None:
            return text_encoder(ids)[0]
        with torch.no_grad():
            return self.frozen.text_encoder(ids)[0]


class DiffusionTask(Task):
    """Shared Stable Diffusion plumbing for the SD 1.x / 2.x tasks."""

    pipeline_class_name = "StableDiffusionPipeline"
    family = "sd"

    # ------------------------------------------------------------------------------------- models
    def load_components(self, unet_dtype: Optional[torch.dtype] = None) -> None:
        """tokenizer, noise_scheduler, text_encoder, vae, unet; frozen encoders in the autocast dtype, the UNet
        in ``unet_dtype`` (a frozen UNet: the autocast dtype) or fp32 (it trains)."""
        a, rt = self.args, self.rt
        path = a.pretrained_model_name_or_path
        if looks_local(path):
            check_pipeline_folder(path, FLAG, need=("unet", "vae", "text_encoder", "scheduler") +
                                  (() if a.tokenizer_name else ("tokenizer",)), class_names=SD_CLASSES,
                                  optional=("safety_checker", "feature_extractor"))
        self.tokenizer = load_component("tokenizer", a.tokenizer_name or path, a.revision,
                                        subfolder=None if a.tokenizer_name else "tokenizer")
        self.noise_scheduler = load_component("scheduler", path, a.revision)
        if a.prediction_type:
            self.noise_scheduler.register_to_config(prediction_type=a.prediction_type)
        # Frozen encoders run in the autocast dtype (half the memory and time); trained weights stay fp32
        # master weights and are autocast in the step.
        self.text_encoder = load_component("text_encoder", path, a.revision, a.variant, torch_dtype=rt.weight_dtype)
        self.vae = load_component("vae", path, a.revision, a.variant, torch_dtype=rt.weight_dtype)
        self.unet = load_component("unet", path, a.non_ema_revision or a.revision, a.variant, torch_dtype=unet_dtype)
        for m in (self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()
            m.to(rt.device)
        self.unet.to(rt.device)

    def objective(self) -> Objective:
        a = self.args
        return Objective(self.noise_scheduler, seed=a.seed, snr_gamma=a.snr_gamma, noise_offset=a.noise_offset,
                         input_perturbation=a.input_perturbation, per_sample_noise=a.per_sample_noise)

    def tokenize(self, caption: str) -> Dict[str, torch.Tensor]:
        from ..data.dataset import ClipTokenize

        return ClipTokenize(self.tokenizer)(caption)

    def tokenizer_fn(self):
        """``tokenize(caption) -> dict`` for the data set (picklable for loader worker processes)."""
        from ..data.dataset import ClipTokenize

        return ClipTokenize(self.tokenizer)

    # --------------------------------------------------------------------------------------- data
    def load_rows(self, image_columns=()):
        """The training rows (images left undecoded, so that a corrupt file fails in our code with its row
        and name) and their image/caption columns."""
        from ..data.sources import load_streaming_rows, load_training_data

        a = self.args
        if getattr(a, "streaming", False):
            from ..data.streaming import check_streaming_args

            check_streaming_args(a)
            return load_streaming_rows(a.dataset_name, image_column=a.image_column, caption_column=a.caption_column,
                                       max_train_samples=a.max_train_samples, image_columns=image_columns)
        return load_training_data(a.dataset_name, a.local_data_dir, a.train_data_dir, a.dataset_config_name,
                                  image_column=a.image_column, caption_column=a.caption_column,
                                  max_train_samples=a.max_train_samples, image_columns=image_columns)

    def image_caption_dataset(self, paired_columns=None, derived=None):
        from ..data.dataset import ImageCaptionDataset

        a = self.args
        rows = self.load_rows(image_columns=tuple((paired_columns or {}).values()))
        buckets = self.buckets(rows.ds, rows.image_column) if a.aspect_ratio_buckets else None
        return ImageCaptionDataset(rows.ds, rows.image_column, rows.caption_column, a.resolution,
                                   tokenize=self.tokenizer_fn(), center_crop=a.center_crop,
                                   random_flip=a.random_flip, seed=a.seed, skip_bad_images=a.skip_bad_images,
                                   name="the training data", proportion_empty_prompts=a.proportion_empty_prompts,
                                   interpolation=a.image_interpolation_mode, buckets=buckets,
                                   paired_columns=paired_columns, derived=derived)

    def buckets(self, rows, image_column):
        """Aspect-ratio buckets of about resolution^2 pixels; sizes are multiples of the latent grid (VAE
        factor x UNet downsampling), so every bucket is a valid input size."""
        from ..data.buckets import buckets_from_sizes, bucketize

        a = self.args
        factor = self.vae_scale_factor() * self.unet_downsampling()
        stored = rows.stored_sizes() if hasattr(rows, "stored_sizes") else None
        if stored is not None:  # streaming: the sizes stored with the data, no image is opened
            buckets = buckets_from_sizes(stored, a.resolution, factor, a.bucket_max_ratio)
        elif getattr(a, "streaming", False):
            from ..data.streaming import SIZE_COLUMNS

            raise UsageError(f"--aspect_ratio_buckets with --streaming needs the image sizes stored with the data: "
                             f"integer {' and '.join(repr(c) for c in SIZE_COLUMNS)} columns in the parquet shards "
                             f"(as img2dataset writes them); {a.dataset_name} has none")
        else:
            buckets = bucketize(rows, image_column, a.resolution, multiple=factor, max_ratio=a.bucket_max_ratio,
                                skip_bad=a.skip_bad_images, progress=self.rt.is_main)
        logger.info("aspect-ratio buckets: %s", buckets.describe())
        return buckets

    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def unet_downsampling(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def cache_encoders(self):
        from ..data.cache import clip_prompts_fn, model_key_parts, vae_moments_fn

        a, rt = self.args, self.rt
        key = {**model_key_parts(a.pretrained_model_name_or_path), "tokenizer_name": a.tokenizer_name,
               "weight_dtype": str(rt.weight_dtype)}
        return (vae_moments_fn(self.vae, rt.device, rt.weight_dtype),
                clip_prompts_fn(self.tokenizer, self.text_encoder, rt.device), key)

    def release_encoders(self) -> None:
        """After caching: the encoders leave the device (validation brings them back briefly)."""
        self.vae.to("cpu")
        self.text_encoder.to("cpu")

    # ----------------------------------------------------------------------------------- pipelines
    def sd_pipeline(self, unet=None, text_encoder=None, tokenizer=None, class_name=None, **extra):
        import diffusers

        cls = getattr(diffusers, class_name or self.pipeline_class_name)
        self.vae.to(self.rt.device)
        te = text_encoder or self.text_encoder
        te.to(self.rt.device)
        pipe = cls(vae=self.vae, text_encoder=te, tokenizer=tokenizer or self.tokenizer, unet=unet or self.unet,
                   scheduler=base_scheduler(self.args.pretrained_model_name_or_path, self.noise_scheduler),
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self):
        return self.sd_pipeline()

    def training_info(self, folder: str, kind: str, files: List[str], **extra) -> str:
        """``training_info.json``: the base model (so ``generate`` finds it), the task, what was saved."""
        from .. import __version__

        info = {"base_model": os.path.abspath(self.args.pretrained_model_name_or_path)
                if looks_local(self.args.pretrained_model_name_or_path) else self.args.pretrained_model_name_or_path,
                "task": self.name, "kind": kind, "files": sorted(files), "diffusers_npu_version": __version__,
                **extra}
        return write_json_atomic(os.path.join(folder, TRAINING_INFO_NAME), info)

    # The models' roles, for the common case (the UNet trains); tasks that train something else override them.
    def attention_models(self):
        return [self.unet, self.vae]

    def checkpointing_models(self):
        return [self.unet]

    def compile_models(self):
        return [self.unet]

    def ema_model(self):
        return self.unet

    def summary_extra(self) -> dict:
        return {}


def cast_frozen(model, dtype: torch.dtype):
    """Cast a frozen diffusers model loaded in fp32 (e.g. the UNet a ControlNet was copied from) to the autocast
    dtype. diffusers' ``ModelMixin.to`` warns on every dtype cast, for modules it must keep in fp32; a model
    that declares none is cast by torch directly, without the warning (one that does is cast as diffusers does,
    warning included)."""
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(dtype=dtype)
    return torch.nn.Module.to(model, dtype=dtype)


def save_unet_like(model, folder: str, rt, ema_state: Optional[dict] = None, name: str = "unet") -> List[str]:
    """``<folder>/<name>/`` (and ``<name>_ema/`` with EMA) in diffusers format, shard-aware."""
    from . import weights

    weights.save_pretrained(model, os.path.join(folder, name), rt.is_main)
    out = [name]
    if ema_state is not None:
        weights.save_pretrained(model, os.path.join(folder, f"{name}_ema"), rt.is_main, state=ema_state)
        out.append(f"{name}_ema")
    return out


def load_unet_like(model, folder: str, name: str = "unet") -> Optional[dict]:
    """Read ``<name>/`` (new layout) or ``<name>.safetensors`` (older checkpoints) into ``model``; returns the
    EMA weights from ``<name>_ema/`` when present."""
    from . import weights

    new = os.path.join(folder, name)
    old = os.path.join(folder, f"{name}.safetensors")
    if os.path.isdir(new):
        weights.load_pretrained(model, new)
    elif os.path.isfile(old):
        weights.load_pretrained(model, folder, weights_name=f"{name}.safetensors")
    else:
        from ..errors import CheckpointError

        raise CheckpointError(f"--resume_from_checkpoint: {folder} has neither {name}/ nor {name}.safetensors "
                              f"(was it written by another task?)")
    ema_dir = os.path.join(folder, f"{name}_ema")
    if not os.path.isdir(ema_dir):
        return None
    ema = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    weights.load_pretrained(model, ema_dir, target=ema)
    return ema


def source_images(args, images_flag: str, limit: Optional[int] = None) -> list:
    """Image cells of --dataset_name / --local_data_dir (the embedded digits by default), restricted to
    ``label == --data_label`` when the data set has a label column. DreamBooth's default instance images and
    textual inversion's default training images come from here."""
    from ..data.sources import load_source, resolve_columns
    from ..errors import DataError

    if not (args.dataset_name or args.local_data_dir):
        raise DataError(f"no training images: give {images_flag} (a folder of images), or --dataset_name / "
                        f"--local_data_dir")
    ds = load_source(args.dataset_name, args.local_data_dir, None, args.dataset_config_name)
    image_column, _ = resolve_columns(ds, args.image_column, None, need_caption=False)
    if "label" in ds.column_names:
        rows = [i for i, lab in enumerate(ds["label"]) if int(lab) == args.data_label]
        if not rows:
            raise DataError(f"--data_label: no row of the data set has label {args.data_label}")
    else:
        rows = list(range(len(ds)))
    rows = rows[:limit] if limit is not None else rows
    if args.max_train_samples is not None:
        rows = rows[:args.max_train_samples]
    return [ds[i][image_column] for i in rows]


def add_data_label_argument(parser, default: int = 7) -> None:
    parser.add_argument("--data_label", type=int, default=default,
                        help="when images come from --dataset_name/--local_data_dir (the embedded digits by default) "
                             "and it has a 'label' column, use only rows with this label")
