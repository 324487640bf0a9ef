"""The embedded SDXL default: a small Stable Diffusion XL built offline, trained on the embedded digits.

The model is the ``sdxl-digits`` preset of :mod:`diffusers_npu.presets`: the SDXL architecture (two CLIP text
encoders with the whole-word tokenizer, pooled-text + micro-conditioning ``text_time`` embedding, linear
attention projections) at about the size of the SD digits model, with the same fitted f=2 VAE the SD digits
model ships (``assets/digits_vae.safetensors``), so nothing is fitted here. UNet and text encoders come from
seed 0; the text encoders' word embeddings are scaled (see ``TOKEN_EMBEDDING_SCALE``).
The data set is the embedded digits data set of :mod:`diffusers_npu.embedded` (one copy serves both models).

The saved pipeline has ``force_zeros_for_empty_prompt=False``: training replaces dropped captions by the
encoded empty prompt (as upstream's SDXL script does), so classifier-free guidance must use that same
encoding as its unconditional input, not the zero vectors SDXL 1.0 was trained with.

Both are made once into ``$DIFFUSERS_NPU_HOME`` (atomic: a temp folder renamed into place).
"""
from __future__ import annotations

import json
import logging
import os

from . import embedded

logger = logging.getLogger(__name__)

SDXL_EMBEDDED_VERSION = 1  # bump when the recipe changes so stale caches are rebuilt
PRESET = "sdxl-digits"
RESOLUTION = embedded.RESOLUTION
# SDXL conditions on the text encoders' PENULTIMATE hidden states, which no final layer norm rescales. In a
# random encoder that residual stream is dominated by position embeddings and attention/MLP outputs, while
# the word embeddings start at std 0.02: the prompt's digit barely shows (a third of the between-prompt
# variance the SD digits model's normalised states have). Scaling the word embeddings by 16 gives the words
# the weight they have in a trained CLIP; measured: learning check 100% after 1000 steps, 90% without it.
TOKEN_EMBEDDING_SCALE = 16.0


def paths() -> dict:
    root = os.path.join(embedded.home(), f"embedded-v{embedded.EMBEDDED_VERSION}")
    return {"model": os.path.join(root, f"digits-sdxl-v{SDXL_EMBEDDED_VERSION}"),
            "dataset": os.path.join(root, "digits-dataset")}


def prepare(force: bool = False, progress: bool = True) -> dict:
    """Make (once) and return ``{'model': folder, 'dataset': folder}`` of the embedded SDXL default."""
    return embedded.prepare_with(paths()["model"], lambda folder: write_model(folder, progress), force)


def write_model(folder: str, progress: bool = True) -> str:
    def fill(tmp):
        import torch

        from .fsutil import write_json_atomic
        from .presets import build_components, save_pipeline_folder

        comps = build_components(PRESET, seed=0, tokenizer_dir=os.path.join(tmp, "_tok"))
        vae_from, _ = embedded.vae_weights(comps["vae"], progress)
        with torch.no_grad():
            for name in ("text_encoder", "text_encoder_2"):
                comps[name].get_input_embeddings().weight.mul_(TOKEN_EMBEDDING_SCALE)
        save_pipeline_folder(comps, tmp)
        index_path = os.path.join(tmp, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["force_zeros_for_empty_prompt"] = False
        write_json_atomic(index_path, index)
        return {"recipe": "diffusers_npu.embedded_sdxl.prepare", "version": SDXL_EMBEDDED_VERSION, "preset": PRESET,
                "vae": vae_from}

    return embedded.write_model_folder(folder, fill)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Build the embedded SDXL digits model (and the digits data set) into "
                                            "$DIFFUSERS_NPU_HOME")
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(prepare(force=p.parse_args().force), indent=1))
