"""Text-to-image fine-tuning: the UNet learns to denoise latents of (image, caption) pairs."""
from __future__ import annotations

import os

import torch

from ...data import dataset as D
from ...data.sources import load_source, resolve_columns
from ..registry import LaunchProfile, register_task
from ..task import DiffusionTask
from .lora import LoraMixin


def undecoded_images(ds, column):
    """Have ``datasets`` hand over raw image bytes/paths so that *we* decode them: a corrupt file then fails
    in our code, with its row and file name, or is skipped by --skip_bad_images."""
    from datasets import Image

    if isinstance(ds.features.get(column), Image) and ds.features[column].decode:
        ds = ds.cast_column(column, Image(decode=False))
    return ds


@register_task
class TextToImageTask(LoraMixin, DiffusionTask):  # LoraMixin: --use_lora --lora_rank
    name = "text_to_image"
    description = "Fine-tune a Stable Diffusion UNet (or LoRA adapters with --use_lora) on image-caption pairs."
    example = "examples/text_to_image/train_text_to_image.py"
    launch = LaunchProfile(
        network="StableDiffusion_text_to_image", learning_check=True,
        embedded={"config": "examples/text_to_image/configs/embedded_digits.yaml"},
        pretrained={"resolution": 512, "max_train_steps": 15000, "train_batch_size": 1, "center_crop": True,
                    "random_flip": True, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                    "learning_rate": 1e-05, "checkpointing_steps": 5000, "dataloader_num_workers": 4})

    def __init__(self, args):
        super().__init__(args)
        self.hf_dataset = None

    def trainable_modules(self):
        return {"unet": self.unet}

    def load_data_source(self):
        a = self.args
        ds = load_source(a.dataset_name, a.local_data_dir, a.train_data_dir, a.dataset_config_name,
                         cache_dir=None)
        self.image_column, self.caption_column = resolve_columns(ds, a.image_column, a.caption_column)
        if a.max_train_samples is not None:
            ds = ds.select(range(min(a.max_train_samples, len(ds))))
        ds = undecoded_images(ds, self.image_column)
        self.hf_dataset = ds
        return ds

    def build_dataset(self):
        a = self.args
        ds = self.hf_dataset if self.hf_dataset is not None else self.load_data_source()
        return D.ImageCaptionDataset(ds, self.image_column, self.caption_column, self.tokenizer, a.resolution,
                                     center_crop=a.center_crop, random_flip=a.random_flip, seed=a.seed,
                                     skip_bad_images=a.skip_bad_images, name="the training data",
                                     proportion_empty_prompts=a.proportion_empty_prompts)

    def cache_spec(self):
        """What the trainer needs to build/load a latent cache for this task's data."""
        return dict(hf_dataset=self.hf_dataset, image_column=self.image_column,
                    caption_column=self.caption_column)

    def compute_loss(self, batch, generator=None):
        gens = self._per_sample_generators(batch)
        latents = self.latents_from_batch(batch, gens)
        states = self.text_embeddings(batch)
        noisy, t, target = self.noisy_latents(latents, gens)
        pred = self.unet(noisy, t, states, return_dict=False)[0]
        return self.diffusion_loss(pred, target, t), {}

    def build_pipeline(self, unet):
        return self.make_sd_pipeline(unet)

    def save_final(self, folder, pipeline):
        if not self.save_lora(folder):  # --use_lora writes only pytorch_lora_weights.safetensors
            pipeline.save_pretrained(folder, safe_serialization=True)
