"""Text-to-image fine-tuning: the UNet (or LoRA adapters in it) learns to denoise latents of captioned images."""
from __future__ import annotations

import os
from typing import List, Optional

from .. import weights
from ..registry import LaunchProfile, register_task
from ..sd import DiffusionTask, Frozen, SDModule, load_unet_like, save_unet_like
from . import lora


class TextToImageModule(SDModule):
    """forward(batch) -> (loss, {}): encode (or read cached) latents and prompt states, noise, predict."""

    dream: Optional[float] = None  # --dream_training: its detail preservation p

    def forward(self, batch):
        gens = self.objective.generators(batch)
        latents = self.latents(batch, gens)
        states = self.text_states(batch)
        noisy, t, target = self.objective.noisy(latents, gens)
        if self.dream is not None:
            # DREAM (https://arxiv.org/abs/2312.00210) through diffusers' own helper; for epsilon prediction
            # the target is the noise it needs.
            from diffusers.training_utils import compute_dream_and_update_latents

            noisy, target = compute_dream_and_update_latents(self.unet, self.objective.scheduler, t, target, noisy,
                                                             target, states, self.dream)
        pred = self.unet(noisy, t, states, return_dict=False)[0]
        return self.objective.loss(pred, target, t), {}


@register_task
class TextToImageTask(DiffusionTask):
    name = "text_to_image"
    description = "Fine-tune a Stable Diffusion UNet (or LoRA adapters with --use_lora) on image-caption pairs."
    example = "examples/text_to_image/train_text_to_image.py"
    launch = LaunchProfile(
        network="StableDiffusion_text_to_image", learning_check=True,
        expected="about 7 minutes on an idle 2-core CPU (measured, README)",
        embedded={"config": "examples/text_to_image/configs/embedded_digits.yaml"},
        pretrained={"resolution": 512, "max_train_steps": 15000, "train_batch_size": 1, "center_crop": True,
                    "random_flip": True, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                    "learning_rate": 1e-05, "checkpointing_steps": 5000, "dataloader_num_workers": 4})
    defaults = {"validation_epochs": None, "tracker_project_name": "text2image-fine-tune", "output_dir": None}
    supports_cache = True
    supports_buckets = True

    @classmethod
    def add_arguments(cls, parser) -> None:
        lora.add_lora_arguments(parser)
        for action in parser._actions:  # the per-mode defaults, said once in --help
            if action.dest == "output_dir":
                action.help = ("where checkpoints, logs and the trained output go (default sd-model-finetuned, or "
                               "sd-model-finetuned-lora with --use_lora)")
            elif action.dest == "validation_epochs":
                action.help = "validate every N epochs when validation prompts are given (default 5, 1 with --use_lora)"
        g = parser.add_argument_group("text-to-image")
        g.add_argument("--dream_training", action="store_true",
                       help="DREAM training (https://arxiv.org/abs/2312.00210): one extra forward pass without "
                            "gradients per step aligns training with sampling (epsilon prediction only)")
        g.add_argument("--dream_detail_preservation", type=float, default=1.0,
                       help="DREAM's detail preservation factor p (> 0), as in the paper")

    @property
    def use_lora(self) -> bool:
        return bool(self.args.use_lora)

    @property
    def output_kind(self) -> str:  # noqa: D102 - the class attribute, per run
        return "lora" if self.use_lora else "pipeline"

    @classmethod
    def resolve_args(cls, a) -> None:
        # upstream's train_text_to_image.py and train_text_to_image_lora.py defaults
        if a.output_dir is None:
            a.output_dir = "sd-model-finetuned-lora" if a.use_lora else "sd-model-finetuned"
        if a.validation_epochs is None and not a.validation_steps:
            a.validation_epochs = 1 if a.use_lora else 5

    def validate_args(self) -> None:
        lora.validate_lora_args(self.args)
        if self.args.dream_training and self.args.dream_detail_preservation <= 0:
            from ...errors import UsageError

            raise UsageError(f"--dream_detail_preservation must be > 0 (got {self.args.dream_detail_preservation})")
        if self.use_lora and self.args.learning_check:
            from ...errors import UsageError

            raise UsageError("--learning_check loads --output_dir as a full pipeline; a --use_lora run writes only "
                             "the adapters (drop one)")

    # ------------------------------------------------------------------------------------------ models
    def build_module(self):
        self.load_components()
        if self.use_lora:
            lora.add_lora(self.unet, self.args.lora_rank, self.args.lora_alpha, lora.UNET_TARGETS,
                          self.args.lora_dropout)
        frozen = Frozen(vae=self.vae, text_encoder=self.text_encoder)
        module = TextToImageModule(frozen, self.objective(), self.rt.weight_dtype, unet=self.unet)
        if self.args.dream_training:
            if self.noise_scheduler.config.prediction_type != "epsilon":
                from ...errors import UsageError

                raise UsageError("--dream_training is implemented for epsilon prediction only (this model predicts "
                                 f"{self.noise_scheduler.config.prediction_type})")
            module.dream = self.args.dream_detail_preservation
        return module

    def build_dataset(self):
        return self.image_caption_dataset()

    # ------------------------------------------------------------------------------------------ outputs
    def save_trained(self, folder: str, ema_state=None) -> List[str]:
        if self.use_lora:
            return lora.save_lora(folder, self.rt, self.unet)
        return save_unet_like(self.unet, folder, self.rt, ema_state)

    def load_trained(self, folder: str) -> Optional[dict]:
        if self.use_lora:
            lora.load_lora(folder, self.unet)
            return None
        return load_unet_like(self.unet, folder)

    def save_final(self, folder: str) -> List[str]:
        rt = self.rt
        if self.use_lora:
            files = lora.save_lora(folder, rt, self.unet)
            if rt.is_main:
                os.remove(os.path.join(folder, lora.ADAPTERS_NAME))  # resume-only; the output is the LoRA file
                files = [lora.LORA_WEIGHTS_NAME]
                self.training_info(folder, "lora", files, rank=self.args.lora_rank,
                                   load_with="pipeline.load_lora_weights(this_folder)")
            return files
        weights.save_pipeline(folder, rt.is_main, self.sd_pipeline, {"unet": self.unet}, self.args.save_consolidated)
        if not rt.is_main:
            return []
        files = sorted(os.listdir(folder))
        self.training_info(folder, "pipeline", files)
        return files
