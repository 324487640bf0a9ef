"""The embedded default: a small Stable Diffusion and a captioned digits data set, made offline.

Nothing here downloads anything. The data comes from scikit-learn's bundled handwritten digits
(1,797 8x8 images); the model is the ``digits`` preset of :mod:`diffusers_npu.presets` with its VAE
fitted on those digits. Both are written once into a cache folder (``$DIFFUSERS_NPU_HOME``, default
``~/.cache/diffusers_npu``).

The fitted VAE ships with the package (``assets/digits_vae.safetensors``, 2.6 MB) because fitting it takes
about 5 minutes on 2 CPU cores; everything else (UNet, text encoder, tokenizer) is built from seed 0 at
first use in seconds. Reproduce the shipped VAE (and refresh the asset) with::

    python -m diffusers_npu.embedded --refit-vae --write-asset     # ~5 min on 2 cores; then commit the asset
    diffusers-npu prepare-embedded --force                         # rebuild the cache from the asset

The same module holds the *learning check*: a digits classifier fitted on the scikit-learn data reads images
generated for ``a handwritten digit <word>`` and reports how often it agrees with the prompt's digit.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

from .presets import DIGIT_WORDS

logger = logging.getLogger(__name__)

EMBEDDED_VERSION = 1  # bump when the data set recipe changes so stale caches are rebuilt
# The SD model's own version (2: v-prediction with a zero terminal SNR, see presets "digits").
SD_EMBEDDED_VERSION = 2
RESOLUTION = 16
ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
VAE_ASSET = os.path.join(ASSET_DIR, "digits_vae.safetensors")


def home() -> str:
    return os.path.expanduser(os.environ.get("DIFFUSERS_NPU_HOME", "~/.cache/diffusers_npu"))


def caption_for(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def digit_images(resolution: int = RESOLUTION):
    """Return (images uint8 [N, H, W, 3], labels int [N]) from scikit-learn's digits, upscaled (nearest)."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)  # ink is bright, as in the source
    rep = resolution // 8
    x = x.repeat(rep, axis=1).repeat(rep, axis=2)
    return np.repeat(x[..., None], 3, axis=-1), d.target.astype(np.int64)


def _atomic_folder(final: str):
    """Context manager-ish helper: returns a temp folder next to ``final``; call ``_commit`` to move it."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)


def _commit(tmp: str, final: str) -> None:
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_digits_dataset(folder: str, resolution: int = RESOLUTION) -> str:
    """Write the captioned digits in the original port's pokemon layout:
    ``data/train-0001.parquet`` + ``data/dataset_infos.json`` + ``dataset_infos.json`` (+ README.MD)."""
    import io

    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    images, labels = digit_images(resolution)
    rows = {"image": [], "text": [], "label": []}
    for img, lab in zip(images, labels):
        buf = io.BytesIO()
        PILImage.fromarray(img).save(buf, format="PNG")
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["text"].append(caption_for(lab))
        rows["label"].append(int(lab))
    features = Features({"image": Image(), "text": Value("string"), "label": Value("int64")})
    ds = Dataset.from_dict(rows, features=features)
    tmp = _atomic_folder(folder)
    try:
        os.makedirs(os.path.join(tmp, "data"))
        ds.to_parquet(os.path.join(tmp, "data", "train-0001.parquet"))
        infos = {"default": {"description": "scikit-learn handwritten digits, captioned 'a handwritten digit <word>'",
                             "features": features.to_dict(), "splits": {"train": {"name": "train",
                                                                                   "num_examples": len(ds)}}}}
        for p in ("dataset_infos.json", os.path.join("data", "dataset_infos.json")):
            with open(os.path.join(tmp, p), "w") as f:
                json.dump(infos, f, indent=1)
        with open(os.path.join(tmp, "README.MD"), "w") as f:
            f.write("Handwritten digits from scikit-learn (8x8, upscaled to %d px), captioned "
                    "'a handwritten digit <word>'. Made by diffusers_npu.embedded.\n" % resolution)
        _commit(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def fit_vae(vae, resolution: int = RESOLUTION, steps: int = 600, batch_size: int = 64, seed: int = 0,
            kl_weight: float = 1e-6, progress: bool = True):
    """Fit the (f=2) VAE on the digits: MSE reconstruction + a small KL term. Returns the fitted VAE with
    ``scaling_factor`` set to 1/std of its latents, as SD does."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    images, _ = digit_images(resolution)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    bar = tqdm(range(steps), desc="fitting embedded VAE", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    logger.info("embedded VAE fitted: final mse %.4f, scaling_factor %.4f", mse.item(), scale)
    return vae, float(mse.item()), float(np.float32(scale))


def load_vae_asset(vae) -> bool:
    """Load the shipped fitted VAE into ``vae`` (returns False when there is no asset)."""
    if not os.path.isfile(VAE_ASSET):
        return False
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(VAE_ASSET, "pt") as f:
        meta = f.metadata() or {}
    vae.load_state_dict(load_file(VAE_ASSET))
    vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    return True


def write_vae_asset(vae, mse: float) -> str:
    from safetensors.torch import save_file

    os.makedirs(ASSET_DIR, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    save_file(sd, VAE_ASSET + ".tmp", metadata={"scaling_factor": repr(float(vae.config.scaling_factor)),
                                                 "recipe": "diffusers_npu.embedded.fit_vae(steps=600, seed=0)",
                                                 "final_mse": repr(mse)})
    os.replace(VAE_ASSET + ".tmp", VAE_ASSET)
    return VAE_ASSET


def vae_weights(vae, progress: bool = True, refit: bool = False) -> tuple:
    """Put the fitted digits VAE into ``vae``: the shipped asset, or (without it, or with ``refit``) fitted here.
    Returns (where the weights came from, the fit's final MSE or None)."""
    if not refit and load_vae_asset(vae):
        return "asset", None
    logger.info("fitting the embedded VAE on the digits (about 5 minutes on 2 CPU cores)")
    _, mse, _ = fit_vae(vae, progress=progress)
    return f"fitted here (mse {mse:.4f})", mse


def write_model_folder(folder: str, fill) -> str:
    """Write an embedded model folder so that it appears only complete: ``fill(tmp)`` writes the pipeline into
    the temp folder (a tokenizer scratch folder ``tmp/_tok`` is removed) and returns its ``EMBEDDED.json``
    record, to which the seed and torch's thread count are added."""
    import torch

    from .fsutil import write_json_atomic

    tmp = _atomic_folder(folder)
    try:
        record = fill(tmp)
        shutil.rmtree(os.path.join(tmp, "_tok"), ignore_errors=True)
        write_json_atomic(os.path.join(tmp, "EMBEDDED.json"),
                          dict(record, seed=0, torch_threads=torch.get_num_threads()))
        _commit(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def prepare_with(model_dir: str, write_model, force: bool = False) -> dict:
    """The digits data set next to ``model_dir`` and the model, each made once (``write_model(folder)``)."""
    data_dir = os.path.join(os.path.dirname(model_dir), "digits-dataset")
    if force or not os.path.exists(os.path.join(data_dir, "data", "train-0001.parquet")):
        write_digits_dataset(data_dir)
    if force or not os.path.exists(os.path.join(model_dir, "model_index.json")):
        write_model(model_dir)
    return {"model": model_dir, "dataset": data_dir}


def prepare(force: bool = False, progress: bool = True, refit_vae: bool = False, write_asset: bool = False) -> dict:
    """Make (once) and return the paths of the embedded model and data set."""

    def fill(tmp):
        from .presets import build_components, save_pipeline_folder

        comps = build_components("digits", seed=0, tokenizer_dir=os.path.join(tmp, "_tok"))
        vae_from, mse = vae_weights(comps["vae"], progress, refit=refit_vae)
        save_pipeline_folder(comps, tmp)
        if refit_vae and write_asset:
            write_vae_asset(comps["vae"], mse)
        return {"recipe": "diffusers_npu.embedded.prepare", "version": SD_EMBEDDED_VERSION, "preset": "digits",
                "vae": vae_from}

    root = os.path.join(home(), f"embedded-v{EMBEDDED_VERSION}")
    return prepare_with(os.path.join(root, f"digits-sd-v{SD_EMBEDDED_VERSION}"),
                        lambda folder: write_model_folder(folder, fill), force)


# ------------------------------------------------------------------------------------------------ learning check

def fit_digit_classifier():
    """A classifier over 8x8 digit images (values 0..16), fitted on all of scikit-learn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    d = load_digits()
    clf = SVC(gamma=0.001, C=10.0)
    clf.fit(d.data, d.target)
    return clf


def images_to_digit_features(images):
    """Map generated images (float [N,H,W,C] in 0..1, or PIL list) to the classifier's 8x8 0..16 features."""
    import numpy as np

    arr = np.asarray([np.asarray(im, dtype=np.float32) / (255.0 if not isinstance(im, np.ndarray) else 1.0)
                      for im in images]) if isinstance(images, list) else np.asarray(images, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr.mean(axis=-1)
    n, h, w = arr.shape
    # Area-average down to 8x8: the exact inverse of the nearest-neighbour upscaling used for training data.
    arr = arr.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return (arr.clip(0, 1) * 16.0).reshape(n, 64)


def learning_check(pipeline, per_digit: int = 10, guidance_scale: float | None = None,
                   num_inference_steps: int | None = None, seed: int = 1234, batch_size: int = 50,
                   progress: bool = True, callback=None, return_images: bool = False) -> dict:
    """Generate ``per_digit`` images for each ``a handwritten digit <word>`` prompt and report how often a
    digits classifier agrees with the prompt. ``None`` keeps the pipeline's own defaults.

    ``callback``: passed as the pipeline's ``callback_on_step_end`` (pre-emption checks between steps).
    ``return_images``: also return the images (float HxWx3 in [0, 1]), the predictions and the targets, for
    the labelled grid picture."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    clf = fit_digit_classifier()
    prompts, targets = [], []
    for digit in range(10):
        prompts += [caption_for(digit)] * per_digit
        targets += [digit] * per_digit
    kwargs = {}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer  # SD / SDXL, or SD3
    res = denoiser.config.sample_size * pipeline.vae_scale_factor
    preds, images = [], []
    was_disabled = getattr(pipeline, "_progress_bar_config", {}).get("disable", False)
    pipeline.set_progress_bar_config(disable=True)
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="learning check", disable=not progress):
            g = torch.Generator("cpu").manual_seed(seed + i)
            out = pipeline(prompts[i:i + batch_size], height=res, width=res, generator=g, output_type="np",
                           **kwargs)
            preds.extend(clf.predict(images_to_digit_features(out.images)))
            if return_images:
                images.extend(out.images)
    finally:
        pipeline.set_progress_bar_config(disable=was_disabled)
    preds = np.asarray(preds)
    targets = np.asarray(targets)
    per = {DIGIT_WORDS[d]: float((preds[targets == d] == d).mean()) for d in range(10)}
    import inspect

    default_guidance = inspect.signature(pipeline.__call__).parameters.get("guidance_scale")
    default_guidance = default_guidance.default if default_guidance is not None else "pipeline default"
    result = {"agreement": float((preds == targets).mean()), "per_digit": per, "images": int(len(preds)),
              "guidance_scale": kwargs.get("guidance_scale", default_guidance),
              "num_inference_steps": kwargs.get("num_inference_steps", "pipeline default")}
    if return_images:
        result.update(samples=images, predictions=preds.tolist(), targets=targets.tolist(),
                      per_digit_images=per_digit)
    return result


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Build the embedded digits model and data set into $DIFFUSERS_NPU_HOME")
    p.add_argument("--refit-vae", action="store_true", help="fit the VAE here instead of loading the shipped one")
    p.add_argument("--write-asset", action="store_true", help="with --refit-vae: overwrite the shipped VAE asset")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(prepare(force=True, refit_vae=a.refit_vae, write_asset=a.write_asset), indent=1))
