"""DreamBooth: teach the model a subject from a few images bound to a rare identifier ("a photo of sks digit").

Optional prior preservation keeps the class ("a photo of digit") from drifting: class images are generated
once with the model being fine-tuned, stored in ``--class_data_dir`` and reused on later runs (only the missing
ones are generated, with a progress bar); every batch then holds instance and class samples, and the loss is
``instance_loss + prior_loss_weight * prior_loss`` (both are logged).

With no ``--instance_data_dir``, five images of one digit (``--data_label``, default 7) are taken from the data
source (the embedded digits by default) and written to ``<output_dir>/instance_images``.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import torch

from ...data.images import list_images, load_pil, resize_crop, to_tensor, write_images
from ...errors import ModelError, UsageError
from .. import weights
from ..registry import LaunchProfile, register_task
from ..sd import DiffusionTask, Frozen, SDModule, add_data_label_argument, load_unet_like, save_unet_like, \
    source_images
from . import lora

logger = logging.getLogger(__name__)

NUM_DEFAULT_INSTANCES = 5


def add_prior_preservation_arguments(g, class_inference_steps: int, steps_note: str = "") -> None:
    """Upstream's prior-preservation flags (every DreamBooth script has them, with its pipeline's step default)."""
    g.add_argument("--with_prior_preservation", action="store_true",
                   help="add the prior-preservation loss on generated class images")
    g.add_argument("--class_data_dir", default=None, metavar="FOLDER",
                   help="folder of class images (missing ones are generated); default <output_dir>/class_images")
    g.add_argument("--class_prompt", default=None,
                   help="prompt of the class; default: --instance_prompt without the identifier 'sks'")
    g.add_argument("--num_class_images", type=int, default=100,
                   help="class images wanted; only the shortfall in --class_data_dir is generated")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the prior loss")
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for class image generation")
    g.add_argument("--class_inference_steps", type=int, default=class_inference_steps,
                   help="denoising steps for generating class images" + steps_note)
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="precision of class image generation; default: the training precision")


def resolve_prior_preservation(a) -> None:
    """Check the prior-preservation flags and fill their defaults: the class prompt (the instance prompt without
    'sks') and the class image folder; without --with_prior_preservation, say that the class flags are unused."""
    if not a.with_prior_preservation:
        if a.class_data_dir or a.class_prompt:
            logger.warning("--class_data_dir/--class_prompt are ignored without --with_prior_preservation")
        return
    if a.class_prompt is None:
        words = a.instance_prompt.split()
        if "sks" not in words:
            raise UsageError("--with_prior_preservation needs --class_prompt (the instance prompt has no 'sks' "
                             "identifier to drop)")
        a.class_prompt = " ".join(w for w in words if w != "sks")
    a.class_data_dir = a.class_data_dir or os.path.join(a.output_dir, "class_images")
    if a.num_class_images < 1:
        raise UsageError(f"--num_class_images must be >= 1 (got {a.num_class_images})")


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images with one prompt; with prior preservation each sample also carries a class image. Every
    image comes with the SDXL micro-conditioning of its real crop (``original_size``, ``crop_top_left``,
    ``target_size``; ``class_``-prefixed for the class image), as the text-to-image data set records them."""

    def __init__(self, instance_images, instance_text: dict, resolution, center_crop, random_flip, seed,
                 interpolation, class_images=None, class_text: Optional[dict] = None):
        self.instance_images, self.instance_text = instance_images, instance_text
        self.class_images, self.class_text = class_images or [], class_text
        self.opts = dict(resolution=resolution, center_crop=center_crop, random_flip=random_flip, seed=seed,
                         interpolation=interpolation)

    def __len__(self):
        return max(len(self.instance_images), len(self.class_images))

    def _pixels(self, path, epoch, index, salt, prefix=""):
        from ...data.dataset import sample_rng

        o = self.opts
        size = (o["resolution"], o["resolution"])
        flip = o["random_flip"] and sample_rng(o["seed"], epoch, index, salt + "flip").random() < 0.5
        img, crop, orig = resize_crop(load_pil(path, path), size, o["center_crop"],
                                      sample_rng(o["seed"], epoch, index, salt + "crop"), o["interpolation"], flip=flip)
        return {f"{prefix}pixel_values": to_tensor(img), f"{prefix}original_size": torch.tensor(orig),
                f"{prefix}crop_top_left": torch.tensor(crop), f"{prefix}target_size": torch.tensor(size)}

    def __getitem__(self, key):
        epoch, index = key[0], key[1]
        out = {**self._pixels(self.instance_images[index % len(self.instance_images)], epoch, index, ""),
               **self.instance_text, "index": index, "epoch": epoch, "bad": 0}
        if self.class_images:
            out.update(self._pixels(self.class_images[index % len(self.class_images)], epoch, index, "class",
                                    prefix="class_"))
            out.update({f"class_{k}": v for k, v in self.class_text.items()})
        return out


class DreamBoothModule(SDModule):
    """forward(batch) -> (instance + w * prior loss, {instance_loss, prior_loss})."""

    def __init__(self, *args, prior_loss_weight: float = 1.0, class_labels: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.prior_loss_weight = prior_loss_weight
        self.class_labels = class_labels

    def states(self, batch, prefix: str = ""):
        if f"{prefix}encoder_hidden_states" in batch:  # --pre_compute_text_embeddings
            return batch[f"{prefix}encoder_hidden_states"].to(self.device)
        te = getattr(self, "text_encoder", None)  # registered only when it trains
        ids = batch[f"{prefix}input_ids"].to(self.device)
        mask = batch.get(f"{prefix}attention_mask")
        mask = mask.to(self.device) if mask is not None else None
        if te is not None:
            return te(ids, attention_mask=mask)[0]
        with torch.no_grad():
            return self.frozen.text_encoder(ids, attention_mask=mask)[0]

    def forward(self, batch):
        prior = "class_pixel_values" in batch
        pixels = batch["pixel_values"]
        n = pixels.shape[0]
        states = self.states(batch)
        if prior:  # one forward over instance + class samples
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            states = torch.cat([states, self.states(batch, "class_")])
        gens = self.objective.prior_generators(batch, prior)
        latents = self.latents({"pixel_values": pixels}, gens)
        noisy, t, target = self.objective.noisy(latents, gens)
        pred = self.unet(noisy, t, states, class_labels=t if self.class_labels else None, return_dict=False)[0]
        per = self.objective.loss(pred, target, t, reduce=False)
        return self.objective.prior_preservation(per, n, self.prior_loss_weight)


@register_task
class DreamBoothTask(DiffusionTask):
    name = "dreambooth"
    description = "DreamBooth: teach the model a subject from a few images bound to a rare identifier."
    example = "examples/dreambooth/train_dreambooth.py"
    launch = LaunchProfile(
        network="StableDiffusion_dreambooth",
        embedded={"train_batch_size": 4, "max_train_steps": 400, "learning_rate": 5e-5, "lr_scheduler": "constant",
                  "lr_warmup_steps": 0, "with_prior_preservation": True, "prior_loss_weight": 1.0,
                  "checkpointing_steps": 200, "num_class_images": 50, "class_inference_steps": 20},
        pretrained={"resolution": 512, "train_batch_size": 1, "max_train_steps": 800, "learning_rate": 5e-6,
                    "lr_scheduler": "constant", "lr_warmup_steps": 0, "with_prior_preservation": True,
                    "prior_loss_weight": 1.0, "checkpointing_steps": 200, "num_class_images": 200,
                    "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"})
    # learning rate and output folder differ with --use_lora, as upstream's two DreamBooth scripts do
    defaults = {"learning_rate": None, "train_batch_size": 4, "num_train_epochs": 1, "output_dir": None,
                "validation_steps": 100}

    @classmethod
    def add_arguments(cls, parser) -> None:
        lora.add_lora_arguments(parser)
        for action in parser._actions:  # the per-mode defaults, said once in --help
            if action.dest == "learning_rate":
                action.help = "initial learning rate (default 5e-6, or 5e-4 with --use_lora, as upstream)"
            elif action.dest == "output_dir":
                action.help = ("where checkpoints, logs and the trained output go (default dreambooth-model, or "
                               "lora-dreambooth-model with --use_lora)")
        g = parser.add_argument_group("DreamBooth")
        g.add_argument("--instance_data_dir", default=None, metavar="FOLDER",
                       help="folder of the subject's images; default: 5 images of --data_label from the data source "
                            "(the embedded digits), written to <output_dir>/instance_images")
        g.add_argument("--instance_prompt", default="a photo of sks digit",
                       help="prompt with the identifier that names the subject")
        add_data_label_argument(g)
        add_prior_preservation_arguments(g, class_inference_steps=50)
        g.add_argument("--train_text_encoder", action="store_true",
                       help="train the text encoder too (with --use_lora: LoRA on its attention)")
        g.add_argument("--offset_noise", action="store_true",
                       help="upstream flag: noise offset 0.1 (same as --noise_offset 0.1)")
        g.add_argument("--pre_compute_text_embeddings", action="store_true",
                       help="encode the instance and class prompts once, then move the text encoder off the device")
        g.add_argument("--tokenizer_max_length", type=int, default=None,
                       help="maximum prompt length in tokens; default: the tokenizer's")
        g.add_argument("--text_encoder_use_attention_mask", action="store_true",
                       help="pass the padding attention mask to the text encoder")
        g.add_argument("--class_labels_conditioning", default=None, choices=["timesteps"],
                       help="pass the timesteps as class labels to a UNet with a class embedding (DeepFloyd IF "
                            "stage II style UNets)")
        g.add_argument("--validation_scheduler", default="DPMSolverMultistepScheduler",
                       choices=["DPMSolverMultistepScheduler", "DDPMScheduler"],
                       help="scheduler of the validation pipeline")
        g.add_argument("--validation_images", nargs="+", default=None,
                       help="upstream flag for pixel-space upscaler models (DeepFloyd IF stage II); refused here")
        g.add_argument("--skip_save_text_encoder", action="store_true",
                       help="save the final pipeline without the text encoder (with --train_text_encoder)")

    @property
    def use_lora(self) -> bool:
        return bool(self.args.use_lora)

    @property
    def output_kind(self) -> str:  # noqa: D102
        return "lora" if self.use_lora else "pipeline"

    @classmethod
    def resolve_args(cls, a) -> None:
        # upstream's train_dreambooth.py and train_dreambooth_lora.py defaults
        if a.learning_rate is None:
            a.learning_rate = 5e-4 if a.use_lora else 5e-6
        if a.output_dir is None:
            a.output_dir = "lora-dreambooth-model" if a.use_lora else "dreambooth-model"
        if a.use_lora and a.validation_steps == 100 and a.validation_epochs is None:
            a.validation_steps, a.validation_epochs = None, 50

    def validate_args(self):
        a = self.args
        lora.validate_lora_args(a)
        if a.validation_images:
            raise UsageError("--validation_images: it feeds images to pixel-space upscaler models (DeepFloyd IF stage "
                             "II), which this project does not train; use --validation_prompt")
        resolve_prior_preservation(a)
        if a.use_ema and a.train_text_encoder:
            raise UsageError("--use_ema averages the UNet only; it cannot be combined with --train_text_encoder")
        if a.pre_compute_text_embeddings and a.train_text_encoder:
            raise UsageError("--pre_compute_text_embeddings freezes the prompt states; drop --train_text_encoder")
        if a.offset_noise and not a.noise_offset:
            a.noise_offset = 0.1  # what upstream's --offset_noise adds

    # ------------------------------------------------------------------------------------------ models
    def build_module(self):
        a = self.args
        if not os.path.isdir(os.path.join(a.pretrained_model_name_or_path, "vae")) and \
                os.path.isdir(a.pretrained_model_name_or_path):
            raise ModelError(f"--pretrained_model_name_or_path: {a.pretrained_model_name_or_path} has no 'vae' "
                             f"folder: pixel-space models (DeepFloyd IF style, a UNet on pixels) are not supported "
                             f"by DreamBooth here; use a latent Stable Diffusion model")
        self.load_components()
        if a.tokenizer_max_length:
            positions = self.text_encoder.config.max_position_embeddings
            if a.tokenizer_max_length > positions:
                raise UsageError(f"--tokenizer_max_length {a.tokenizer_max_length} is longer than this text "
                                 f"encoder's {positions} positions")
            self.tokenizer.model_max_length = a.tokenizer_max_length
        if a.class_labels_conditioning and getattr(self.unet.config, "class_embed_type", None) is None:
            raise UsageError("--class_labels_conditioning timesteps: this UNet has no class embedding "
                             "(class_embed_type is None); drop the flag")
        trainable = {"unet": self.unet}
        if self.use_lora:
            lora.add_lora(self.unet, a.lora_rank, a.lora_alpha, lora.UNET_TARGETS, a.lora_dropout)
        if a.train_text_encoder:
            self.text_encoder.to(dtype=torch.float32)  # trained weights are fp32 master weights
            if self.use_lora:
                lora.add_lora(self.text_encoder, a.lora_rank, a.lora_alpha, lora.TEXT_ENCODER_TARGETS,
                              a.lora_dropout)
            else:
                self.text_encoder.requires_grad_(True)
            self.text_encoder.train()
            trainable["text_encoder"] = self.text_encoder
        frozen = Frozen(vae=self.vae, text_encoder=self.text_encoder)
        return DreamBoothModule(frozen, self.objective(), self.rt.weight_dtype, **trainable,
                                prior_loss_weight=a.prior_loss_weight,
                                class_labels=a.class_labels_conditioning == "timesteps")

    def checkpointing_models(self):
        return [self.unet] + ([self.text_encoder] if self.args.train_text_encoder else [])

    # -------------------------------------------------------------------------------------------- data
    def encode_prompt(self, prompt: str) -> dict:
        tok = self.tokenizer
        enc = tok(prompt, max_length=tok.model_max_length, padding="max_length", truncation=True,
                  return_tensors="pt")
        out = {"input_ids": enc.input_ids[0]}
        if self.args.text_encoder_use_attention_mask:
            out["attention_mask"] = enc.attention_mask[0]
        if self.args.pre_compute_text_embeddings:
            with torch.no_grad():
                mask = out.get("attention_mask")
                states = self.text_encoder(out["input_ids"][None].to(self.rt.device),
                                           attention_mask=None if mask is None else mask[None].to(self.rt.device))[0]
            out = {"encoder_hidden_states": states[0].float().cpu()}
        return out

    def instance_images(self) -> List[str]:
        a, rt = self.args, self.rt
        if a.instance_data_dir:
            return list_images(a.instance_data_dir, "--instance_data_dir")
        folder = os.path.join(a.output_dir, "instance_images")
        with rt.writers_first():
            if rt.is_local_main:
                write_images(source_images(a, "--instance_data_dir", NUM_DEFAULT_INSTANCES), folder)
                rt.finished(folder)
        logger.info("DreamBooth instance images: %s (label %d of the data source)", folder, a.data_label)
        return list_images(folder, "instance images")

    def class_images(self) -> List[str]:
        """The class images, generating (one writer first: see Runtime.writers_first) only those missing."""
        a, rt = self.args, self.rt
        self.class_generated = 0
        with rt.writers_first():
            have = list_images(a.class_data_dir, "--class_data_dir", allow_empty=True)
            missing = a.num_class_images - len(have)
            if missing > 0 and rt.is_local_main:
                self.class_generated = self.generate_class_images(len(have), missing)
        return list_images(a.class_data_dir, "--class_data_dir")[:a.num_class_images]

    @torch.no_grad()
    def generate_class_images(self, first: int, count: int) -> int:
        from tqdm.auto import tqdm

        a, rt = self.args, self.rt
        os.makedirs(a.class_data_dir, exist_ok=True)
        precision = a.prior_generation_precision or a.mixed_precision
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        pipe = self.pipeline()
        bar = tqdm(total=count, desc=f"generating class images for {a.class_prompt!r}", unit="img")
        try:
            with torch.autocast(rt.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                for start in range(first, first + count, a.sample_batch_size):
                    n = min(a.sample_batch_size, first + count - start)
                    g = torch.Generator("cpu").manual_seed(a.seed * 100003 + start)
                    images = pipe([a.class_prompt] * n, height=a.resolution, width=a.resolution, generator=g,
                                  num_inference_steps=a.class_inference_steps,
                                  callback_on_step_end=rt.preemption.check if rt.preemption else None).images
                    for i, img in enumerate(images):
                        path = os.path.join(a.class_data_dir, f"class-{start + i:05d}.png")
                        tmp = os.path.join(a.class_data_dir, f".tmp-class-{start + i:05d}.png")
                        img.save(tmp)
                        os.replace(tmp, path)
                        rt.finished(path)
                    bar.update(n)
        finally:
            bar.close()
        logger.info("generated %d class images into %s", count, a.class_data_dir)
        return count

    def build_dataset(self):
        a = self.args
        self.class_generated, self.num_class = 0, 0
        cls_images = cls_text = None
        if a.with_prior_preservation:
            cls_images, cls_text = self.class_images(), self.encode_prompt(a.class_prompt)
            self.num_class = len(cls_images)
        inst = self.instance_images()
        self.num_instance = len(inst)
        dataset = DreamBoothDataset(inst, self.encode_prompt(a.instance_prompt), a.resolution, a.center_crop,
                                    a.random_flip, a.seed, a.image_interpolation_mode, cls_images, cls_text)
        if a.pre_compute_text_embeddings:
            self.text_encoder.to("cpu")  # what the flag is for: the encoder's memory back
        return dataset

    # ------------------------------------------------------------------------------------------ outputs
    def pipeline(self):
        import diffusers

        pipe = self.sd_pipeline()
        if self.args.validation_scheduler:
            pipe.scheduler = getattr(diffusers, self.args.validation_scheduler).from_config(pipe.scheduler.config)
        return pipe

    def trained_text_encoder(self):
        return self.text_encoder if self.args.train_text_encoder else None

    def save_trained(self, folder: str, ema_state=None) -> List[str]:
        if self.use_lora:
            return lora.save_lora(folder, self.rt, self.unet, self.trained_text_encoder())
        files = save_unet_like(self.unet, folder, self.rt, ema_state)
        if self.args.train_text_encoder:
            weights.save_pretrained(self.text_encoder, os.path.join(folder, "text_encoder"), self.rt.is_main)
            files.append("text_encoder")
        return files

    def load_trained(self, folder: str) -> Optional[dict]:
        if self.use_lora:
            lora.load_lora(folder, self.unet, self.trained_text_encoder())
            return None
        ema = load_unet_like(self.unet, folder)
        if self.args.train_text_encoder:
            new = os.path.join(folder, "text_encoder")
            if os.path.isdir(new):
                weights.load_pretrained(self.text_encoder, new)
            else:
                weights.load_pretrained(self.text_encoder, folder, weights_name="text_encoder.safetensors")
        return ema

    def save_final(self, folder: str) -> List[str]:
        a, rt = self.args, self.rt
        if self.use_lora:
            files = lora.save_lora(folder, rt, self.unet, self.trained_text_encoder())
            if rt.is_main:
                os.remove(os.path.join(folder, lora.ADAPTERS_NAME))
                files = [lora.LORA_WEIGHTS_NAME]
                self.training_info(folder, "lora", files, rank=a.lora_rank,
                                   load_with="pipeline.load_lora_weights(this_folder)")
            return files
        def build(**trained):
            pipe = self.sd_pipeline(**trained)
            if a.skip_save_text_encoder:
                pipe.text_encoder = None
                pipe.register_to_config(text_encoder=(None, None))
            return pipe

        trained = {"unet": self.unet, "text_encoder": self.text_encoder if a.train_text_encoder else None}
        if not a.train_text_encoder or a.skip_save_text_encoder:
            trained.pop("text_encoder")
        weights.save_pipeline(folder, rt.is_main, build, trained, a.save_consolidated)
        if not rt.is_main:
            return []
        files = sorted(os.listdir(folder))
        self.training_info(folder, "pipeline", files)
        return files

    def summary_extra(self):
        return {"instance_images": getattr(self, "num_instance", None), "class_images": getattr(self, "num_class", 0),
                "class_images_generated": getattr(self, "class_generated", 0)}
