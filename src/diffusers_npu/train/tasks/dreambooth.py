"""DreamBooth: teach the model a subject from a few images bound to a rare identifier ("a photo of sks digit").

Optional prior preservation keeps the class ("a photo of digit") from drifting: class images are generated
once with the model being fine-tuned, stored in ``--class_data_dir`` and reused on later runs (only the missing
ones are generated); every batch then holds instance and class samples, and the loss is
``instance_loss + prior_loss_weight * prior_loss`` (both terms are returned in the loss extras).

With no ``--instance_data_dir``, five images of one digit (``--data_label``, default 7) are taken from the
data source (the embedded digits by default) and written to ``<output_dir>/instance_images``.

This module also holds the small image-list helpers textual inversion shares (``list_images``,
``images_from_source``, ``load_image_tensor``).
"""
from __future__ import annotations

import logging
import os

import torch

from ...data import dataset as D
from ...data.sources import DataError, load_source, resolve_columns
from ..registry import LaunchProfile, register_task
from ..task import DiffusionTask
from .lora import LoraMixin

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_LABEL = 7
NUM_DEFAULT_INSTANCES = 5


# ------------------------------------------------------------------------------------------ shared helpers
def list_images(folder: str, flag: str, allow_empty: bool = False) -> list[str]:
    """Image files directly inside ``folder`` (sorted; hidden and partial files skipped)."""
    if not os.path.isdir(folder):
        if allow_empty:
            return []
        raise DataError(f"{flag}: {folder} is not a folder of images")
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                   if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    if not files and not allow_empty:
        raise DataError(f"{flag}: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def add_source_label_argument(parser) -> None:
    parser.add_argument("--data_label", type=int, default=DEFAULT_LABEL,
                        help="when images come from --dataset_name/--local_data_dir (the embedded digits by "
                             "default) and it has a 'label' column, use only rows with this label")


def images_from_source(args, images_flag: str, limit: int | None = None) -> list:
    """Image cells from --dataset_name/--local_data_dir, restricted to ``label == --data_label`` when the data
    set has a label column. ``images_flag`` is the task's own image-folder flag, named when nothing is given."""
    if not (args.dataset_name or args.local_data_dir):
        raise DataError(f"no training images: give {images_flag} (a folder of images), or --dataset_name / "
                        f"--local_data_dir")
    ds = load_source(args.dataset_name, args.local_data_dir, None, args.dataset_config_name)
    image_column, _ = resolve_columns(ds, args.image_column, None, need_caption=False)
    if "label" in ds.column_names:
        labels = ds["label"]
        rows = [i for i, lab in enumerate(labels) if int(lab) == args.data_label]
        if not rows:
            raise DataError(f"--data_label: no row of the data set has label {args.data_label}")
    else:
        rows = list(range(len(ds)))
    if limit is not None:
        rows = rows[:limit]
    if args.max_train_samples is not None:
        rows = rows[:args.max_train_samples]
    return [ds[i][image_column] for i in rows]


def load_image_tensor(cell, where: str, resolution: int, center_crop: bool, random_flip: bool, seed: int,
                      epoch: int, index: int, salt: str = "") -> torch.Tensor:
    """Decode, resize/crop/flip deterministically for (seed, epoch, index); CHW float in [-1, 1]."""
    img = D.load_pil(cell, where)
    flip = random_flip and D.sample_rng(seed, epoch, index, salt + "flip").random() < 0.5
    return D.image_transform(img, resolution, center_crop, flip, D.sample_rng(seed, epoch, index, salt + "crop"))


def local_main_first():
    """Context: the local main process runs the block first, the others after it (files it wrote are there)."""
    from accelerate import PartialState

    return PartialState().local_main_process_first()


def is_local_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_local_main_process


def write_images(cells, folder: str) -> str:
    """Write image cells as PNGs into ``folder`` (replaced as a whole, atomically)."""
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-instances-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it is an ordinary output folder
        for i, cell in enumerate(cells):
            D.load_pil(cell, f"image {i}").save(os.path.join(tmp, f"instance-{i:03d}.png"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ----------------------------------------------------------------------------------------------- data set
class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images with one prompt; with prior preservation each sample also carries a class image."""

    def __init__(self, instance_images, instance_ids, resolution, center_crop, random_flip, seed,
                 class_images=None, class_ids=None):
        self.instance_images, self.instance_ids = instance_images, instance_ids
        self.class_images, self.class_ids = class_images or [], class_ids
        self.opts = dict(resolution=resolution, center_crop=center_crop, random_flip=random_flip, seed=seed)

    def __len__(self):
        return max(len(self.instance_images), len(self.class_images))

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path = self.instance_images[index % len(self.instance_images)]
        out = {"pixel_values": load_image_tensor(path, path, epoch=epoch, index=index, **self.opts),
               "input_ids": self.instance_ids, "index": index, "epoch": epoch, "bad": 0}
        if self.class_images:
            cpath = self.class_images[index % len(self.class_images)]
            out["class_pixel_values"] = load_image_tensor(cpath, cpath, epoch=epoch, index=index, salt="class",
                                                          **self.opts)
            out["class_input_ids"] = self.class_ids
        return out


# ------------------------------------------------------------------------------------------------- task
@register_task
class DreamBoothTask(LoraMixin, DiffusionTask):
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
    supports_cache = False  # a handful of images; the cache is keyed on a data set

    @staticmethod
    def add_arguments(parser) -> None:
        LoraMixin.add_arguments(parser)
        g = parser.add_argument_group("DreamBooth")
        g.add_argument("--instance_data_dir", default=None,
                       help="folder of the subject's images; default: 5 images of --data_label from the data "
                            "source (embedded digits), written to <output_dir>/instance_images")
        g.add_argument("--instance_prompt", default="a photo of sks digit",
                       help="prompt with the identifier that names the subject")
        add_source_label_argument(g)
        g.add_argument("--with_prior_preservation", action="store_true",
                       help="add the prior-preservation loss on generated class images")
        g.add_argument("--class_data_dir", default=None,
                       help="folder of class images (missing ones are generated); default "
                            "<output_dir>/class_images")
        g.add_argument("--class_prompt", default=None,
                       help="prompt of the class; default: --instance_prompt without the identifier 'sks'")
        g.add_argument("--num_class_images", type=int, default=100,
                       help="class images wanted; only the shortfall in --class_data_dir is generated")
        g.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the prior loss")
        g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for class image generation")
        g.add_argument("--class_inference_steps", type=int, default=50,
                       help="denoising steps for generating class images")
        g.add_argument("--train_text_encoder", action="store_true",
                       help="train the text encoder too (with --use_lora: LoRA on its attention)")

    def validate_args(self):
        super().validate_args()
        from ..args import ConfigError

        a = self.args
        if a.with_prior_preservation:
            if a.class_prompt is None:
                words = a.instance_prompt.split()
                if "sks" not in words:
                    raise ConfigError("--with_prior_preservation needs --class_prompt (the instance prompt has no "
                                      "'sks' identifier to drop)")
                a.class_prompt = " ".join(w for w in words if w != "sks")
            a.class_data_dir = a.class_data_dir or os.path.join(a.output_dir, "class_images")
            if a.num_class_images < 1:
                raise ConfigError(f"--num_class_images must be >= 1 (got {a.num_class_images})")
        elif a.class_data_dir or a.class_prompt:
            logger.warning("--class_data_dir/--class_prompt are ignored without --with_prior_preservation")
        if a.use_ema and a.train_text_encoder:
            raise ConfigError("--use_ema averages the UNet only; it cannot be combined with --train_text_encoder")

    def load_models(self, device, weight_dtype):
        super().load_models(device, weight_dtype)  # LoraMixin adds the UNet adapters for --use_lora
        if self.args.train_text_encoder:
            self.text_encoder.to(dtype=torch.float32)  # trainable weights are fp32 master weights
            if self.use_lora:
                self.add_text_encoder_lora()
            else:
                self.text_encoder.requires_grad_(True)

    def trainable_modules(self):
        mods = {"unet": self.unet}
        if self.args.train_text_encoder:
            mods["text_encoder"] = self.text_encoder
        return mods

    # ---------------------------------------------------------------------------------------------- data
    def tokenize(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids[0]

    def instance_images(self) -> list[str]:
        a = self.args
        if a.instance_data_dir:
            return list_images(a.instance_data_dir, "--instance_data_dir")
        folder = os.path.join(a.output_dir, "instance_images")
        with local_main_first():
            if is_local_main():
                write_images(images_from_source(a, "--instance_data_dir", NUM_DEFAULT_INSTANCES), folder)
        logger.info("DreamBooth instance images: %s (label %d of the data source)", folder, a.data_label)
        return list_images(folder, "instance images")

    def class_images(self) -> list[str]:
        """The class images, generating (on the local main process) only those missing from the folder."""
        a = self.args
        self.class_generated = 0
        with local_main_first():
            have = list_images(a.class_data_dir, "--class_data_dir", allow_empty=True)
            missing = a.num_class_images - len(have)
            if missing > 0 and is_local_main():
                logger.info("generating %d class images for %r into %s", missing, a.class_prompt, a.class_data_dir)
                self.class_generated = self.generate_class_images(len(have), missing)
        have = list_images(a.class_data_dir, "--class_data_dir")
        return have[:a.num_class_images]

    @torch.no_grad()
    def generate_class_images(self, first: int, count: int) -> int:
        a = self.args
        os.makedirs(a.class_data_dir, exist_ok=True)
        pipe = self.build_pipeline(self.unet)
        pipe.set_progress_bar_config(disable=True)
        was_training = self.unet.training
        self.unet.eval()
        half = self.weight_dtype != torch.float32
        try:
            with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=half):
                for start in range(first, first + count, a.sample_batch_size):
                    n = min(a.sample_batch_size, first + count - start)
                    g = torch.Generator("cpu").manual_seed(a.seed * 100003 + start)
                    images = pipe([a.class_prompt] * n, height=a.resolution, width=a.resolution, generator=g,
                                  num_inference_steps=a.class_inference_steps).images
                    for i, img in enumerate(images):
                        path = os.path.join(a.class_data_dir, f"class-{start + i:05d}.png")
                        tmp = os.path.join(a.class_data_dir, f".tmp-class-{start + i:05d}.png")
                        img.save(tmp)
                        os.replace(tmp, path)
        finally:
            self.unet.train(was_training)
        return count

    def build_dataset(self):
        a = self.args
        self.class_generated, self.num_class = 0, 0
        cls_images = cls_ids = None
        if a.with_prior_preservation:
            cls_images, cls_ids = self.class_images(), self.tokenize(a.class_prompt)
            self.num_class = len(cls_images)
        inst = self.instance_images()
        self.num_instance = len(inst)
        return DreamBoothDataset(inst, self.tokenize(a.instance_prompt), a.resolution, a.center_crop,
                                 a.random_flip, a.seed, cls_images, cls_ids)

    # ---------------------------------------------------------------------------------------------- loss
    def compute_loss(self, batch, generator=None):
        a = self.args
        pixels, ids = batch["pixel_values"], batch["input_ids"]
        n_instance = pixels.shape[0]
        if a.with_prior_preservation:  # one forward over instance + class samples
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            ids = torch.cat([ids, batch["class_input_ids"]])
        gens = self._per_sample_generators(batch)  # --per_sample_noise
        if gens is not None and a.with_prior_preservation:  # class samples draw from their own streams
            gens = gens + [torch.Generator().manual_seed(g.initial_seed() ^ 0x5DEECE66D) for g in gens]
        latents = self.latents_from_batch({"pixel_values": pixels}, gens)
        if a.train_text_encoder:
            states = self.text_encoder(ids.to(self.device))[0]
        else:
            states = self.text_embeddings({"input_ids": ids})
        noisy, t, target = self.noisy_latents(latents, gens)
        pred = self.unet(noisy, t, states, return_dict=False)[0]
        per_sample = self.diffusion_loss(pred, target, t, reduce=False)
        instance_loss = per_sample[:n_instance].mean()
        if not a.with_prior_preservation:
            return instance_loss, {"instance_loss": instance_loss.detach()}
        prior_loss = per_sample[n_instance:].mean()
        loss = instance_loss + a.prior_loss_weight * prior_loss
        return loss, {"instance_loss": instance_loss.detach(), "prior_loss": prior_loss.detach()}

    # ------------------------------------------------------------------------------------------- outputs
    def build_pipeline(self, unet):
        return self.make_sd_pipeline(unet)

    def save_final(self, folder, pipeline):
        if not self.save_lora(folder, text_encoder_trained=self.args.train_text_encoder):
            pipeline.save_pretrained(folder, safe_serialization=True)

    def summary_extra(self):
        return {"instance_images": self.num_instance, "class_images": self.num_class,
                "class_images_generated": self.class_generated}
