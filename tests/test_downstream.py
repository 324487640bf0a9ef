"""DreamBooth, textual inversion, ControlNet and LoRA on the shared Trainer (issue #5).

Every task trains 2 steps of the embedded digits model in-process (``run(TaskClass, argv)``), resumes from its
checkpoint to step 3, and its output is loaded into the matching diffusers pipeline, which generates an image.
The embedded model is made once per session (conftest.py's ``embedded_paths``, $DIFFUSERS_NPU_HOME).
Torch runs one thread: on a shared 2-core machine that is the fastest for 16 px models.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_npu.data.dataset import collate
from diffusers_npu.train import run
from diffusers_npu.train.tasks.controlnet import ControlNetTask, derive_conditioning, embedding_channels_for
from diffusers_npu.train.tasks.dreambooth import DreamBoothTask
from diffusers_npu.train.tasks.text_to_image import TextToImageTask
from diffusers_npu.train.tasks.textual_inversion import TextualInversionTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--report_to", "none", "--disable_progress_bar", "--no-learning_check", "--lr_warmup_steps", "0"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recording(task_cls):
    """A subclass that remembers its instances and every (loss, extras) its compute_loss returned."""

    class Recording(task_cls):
        instances: list = []

        def __init__(self, args):
            super().__init__(args)
            self.records = []
            Recording.instances.append(self)

        def compute_loss(self, batch, generator=None):
            loss, extras = super().compute_loss(batch, generator)
            self.records.append((loss.detach().float().item(), {k: float(v) for k, v in extras.items()}))
            return loss, extras

    Recording.__name__ = task_cls.__name__
    return Recording


def train(task_cls, out, *extra, steps=2, batch=1, resume=False):
    argv = ["--output_dir", str(out), "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            "--checkpointing_steps", "2", *QUIET, *map(str, extra)]
    if resume:
        argv += ["--resume_from_checkpoint", "latest"]
    return run(task_cls, argv)


def train_and_resume(task_cls, out, *extra, batch=1):
    """2 steps (checkpoint at 2), then resume to 3; return both summaries."""
    first = train(task_cls, out, *extra, batch=batch)
    assert first["steps"] == 2 and os.path.isdir(os.path.join(out, "checkpoint-2"))
    second = train(task_cls, out, *extra, steps=3, batch=batch, resume=True)
    assert second["steps"] == 3 and second["exit_reason"] == "completed"
    return first, second


def sd_pipeline(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt, **kw):
    g = torch.Generator("cpu").manual_seed(0)
    out = pipe(prompt, num_inference_steps=2, height=16, width=16, generator=g, output_type="np", **kw).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    return out


def assert_lora_changes_output(model, lora_folder, prompt):
    """The trained (non-zero) LoRA loads onto the base pipeline with load_lora_weights and changes its image."""
    pipe = sd_pipeline(model)
    before = generate(pipe, prompt)
    pipe.load_lora_weights(str(lora_folder))
    assert np.abs(generate(pipe, prompt) - before).max() > 1e-4


# ------------------------------------------------------------------------------------------------ DreamBooth

def test_dreambooth_prior_preservation_resume_and_pipeline(tmp_path, embedded_paths):
    out = tmp_path / "db"
    task_cls = recording(DreamBoothTask)
    flags = ["--with_prior_preservation", "--num_class_images", "2", "--class_inference_steps", "2",
             "--sample_batch_size", "2", "--prior_loss_weight", "0.5"]
    first = train(task_cls, out, *flags)
    # The default instance images: five digits of one class from the embedded data set.
    assert len(os.listdir(out / "instance_images")) == 5 and first["instance_images"] == 5
    # Class images were generated once with the model ("a photo of digit")...
    class_dir = out / "class_images"
    files = sorted(os.listdir(class_dir))
    assert len(files) == 2 and first["class_images_generated"] == 2
    stamps = {f: os.stat(class_dir / f).st_mtime_ns for f in files}
    # ...and the loss is instance + prior_loss_weight * prior on every step.
    records = task_cls.instances[-1].records
    assert len(records) == 2
    for loss, extras in records:
        assert set(extras) == {"instance_loss", "prior_loss"}
        assert extras["prior_loss"] > 0
        assert loss == pytest.approx(extras["instance_loss"] + 0.5 * extras["prior_loss"], rel=1e-5)

    second = train(task_cls, out, *flags, steps=3, resume=True)
    assert second["steps"] == 3 and second["class_images_generated"] == 0  # reused, not regenerated
    assert {f: os.stat(class_dir / f).st_mtime_ns for f in sorted(os.listdir(class_dir))} == stamps
    assert len(task_cls.instances[-1].records) == 1  # resumed: only step 3 ran

    generate(sd_pipeline(str(out)), "a photo of sks digit")


def test_dreambooth_lora_with_text_encoder_saves_and_loads(tmp_path, embedded_paths):
    out = tmp_path / "db_lora"
    task_cls = recording(DreamBoothTask)
    train(task_cls, out, "--use_lora", "--lora_rank", "2", "--train_text_encoder", "--learning_rate", "1e-2")
    task = task_cls.instances[-1]
    names = [n for m in task.trainable_modules().values() for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("lora_" in n for n, _ in task.text_encoder.named_parameters())
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("unet.") for k in sd) and any(k.startswith("text_encoder.") for k in sd)
    assert not (out / "model_index.json").exists()

    assert_lora_changes_output(embedded_paths["model"], out, "a photo of sks digit")


# ------------------------------------------------------------------------------------------------ LoRA (t2i)

def test_text_to_image_lora_only_adapters_train_small_file_resume_and_load(tmp_path, embedded_paths):
    out = tmp_path / "t2i_lora"
    task_cls = recording(TextToImageTask)
    flags = ["--use_lora", "--lora_rank", "4", "--learning_rate", "1e-2", "--max_train_samples", "16"]
    train_and_resume(task_cls, out, *flags, batch=2)
    task = task_cls.instances[-1]

    # Only LoRA parameters receive gradients.
    task.unet.zero_grad(set_to_none=True)
    data = task.build_dataset()
    batch = collate([data[(0, i)] for i in range(2)])
    loss, _ = task.compute_loss(batch)
    loss.backward()
    with_grad = [n for n, p in task.unet.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    # The base weights did not move.
    base_unet = load_file(os.path.join(embedded_paths["model"], "unet", "diffusion_pytorch_model.safetensors"))
    trained = {k.replace(".base_layer", ""): v for k, v in task.unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(trained[k], v) for k, v in base_unet.items())

    lora_file = out / "pytorch_lora_weights.safetensors"
    unet_file = os.path.join(embedded_paths["model"], "unet", "diffusion_pytorch_model.safetensors")
    assert os.path.getsize(lora_file) < 0.1 * os.path.getsize(unet_file)
    assert all(k.startswith("unet.") for k in load_file(str(lora_file)))
    assert_lora_changes_output(embedded_paths["model"], out, "a handwritten digit three")


# ------------------------------------------------------------------------------------------ textual inversion

def test_textual_inversion_only_new_row_changes_resume_and_load(tmp_path, embedded_paths):
    from transformers import CLIPTextModel

    out = tmp_path / "ti"
    task_cls = recording(TextualInversionTask)
    train_and_resume(task_cls, out, "--learning_rate", "5e-2", "--adam_weight_decay", "0.1", "--repeats", "1",
                     batch=2)
    task = task_cls.instances[-1]
    start = CLIPTextModel.from_pretrained(embedded_paths["model"], subfolder="text_encoder")
    start_w = start.get_input_embeddings().weight.detach()
    final_w = task.text_encoder.get_input_embeddings().weight.detach().cpu()
    n_old = start_w.shape[0]
    assert final_w.shape[0] == n_old + 1
    assert torch.equal(final_w[:n_old], start_w)  # bit-identical, weight decay included
    init = start_w[task.tokenizer.convert_tokens_to_ids("digit")]
    assert not torch.equal(final_w[n_old], init)  # the new row moved away from its initializer
    ckpt_w = load_file(str(out / "checkpoint-2" / "token_embedding.safetensors"))["weight"]
    assert torch.equal(ckpt_w[:n_old], start_w)  # the checkpoint holds only the embedding matrix

    learned = load_file(str(out / "learned_embeds.safetensors"))
    assert list(learned) == ["<digit-x>"] and learned["<digit-x>"].shape == (1, start_w.shape[1])
    assert torch.equal(learned["<digit-x>"][0], final_w[n_old])

    pipe = sd_pipeline(embedded_paths["model"])
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    tid = pipe.tokenizer.convert_tokens_to_ids("<digit-x>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid].detach(), final_w[n_old])
    generate(pipe, "a photo of a <digit-x>")
    # The inference scripts' loader (test_infer/textual-inversion.py --learned_embeds) reads it too.
    from diffusers_npu.inference import load_learned_embeds

    token, tensor = load_learned_embeds(str(out / "learned_embeds.safetensors"))
    assert token == "<digit-x>" and torch.equal(tensor.reshape(-1), learned["<digit-x>"].reshape(-1))


# ------------------------------------------------------------------------------------------------- ControlNet

def test_zero_initialised_controlnet_leaves_unet_output_unchanged(embedded_paths):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(embedded_paths["model"], subfolder="unet").eval()
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels_for(2)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    cond = torch.rand(2, 3, 16, 16, generator=g)  # conditioning at image resolution (the VAE's f=2)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        down, mid = cn(x, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
        plain = unet(x, t, states).sample
        steered = unet(x, t, states, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert all(r.abs().max() == 0 for r in (*down, mid))
    assert torch.equal(plain, steered)
    assert embedding_channels_for(8) == (16, 32, 96, 256)  # Stable Diffusion's f=8 VAE: diffusers' default


def test_derived_conditioning_is_an_edge_map_in_unit_range():
    img = -torch.ones(3, 16, 16)
    img[:, 4:12, 4:12] = 1.0  # a bright square
    edges = derive_conditioning(img, "sobel")
    assert edges.shape == (3, 16, 16) and edges.min() >= 0 and edges.max() == 1
    assert edges[0, 8, 8] == 0 and edges[0, 4, 8] > 0.5  # flat inside, strong on the border
    blur = derive_conditioning(img, "blur")
    assert 0 < blur[0, 4, 4] < 1


def test_conditioning_column_gets_the_images_crop_and_flip():
    from datasets import Dataset, Features, Image as ImageFeature

    from diffusers_npu.data.dataset import ImageCaptionDataset
    from diffusers_npu.train.tasks.controlnet import ConditionedDataset
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)) for _ in range(4)]
    ds = Dataset.from_dict({"image": images, "conditioning_image": images},
                           features=Features({"image": ImageFeature(), "conditioning_image": ImageFeature()}))
    base = ImageCaptionDataset(ds, "image", None, None, 16, random_flip=True, seed=3)
    data = ConditionedDataset(base, "conditioning_image", "sobel")
    for key in [(0, 0), (0, 1), (1, 0), (2, 3), (5, 2)]:
        ex = data[key]
        assert torch.allclose(ex["conditioning_pixel_values"] * 2 - 1, ex["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("task_cls, flags, message", [
    (TextualInversionTask, ["--placeholder_token", "digit"], "already a token"),
    (ControlNetTask, ["--conditioning_image_column", "edges"], "no column 'edges'"),
])
def test_bad_task_flags_fail_with_a_named_error(task_cls, flags, message, tmp_path, embedded_paths, capsys):
    from diffusers_npu.train import main

    rc = main(task_cls, ["--output_dir", str(tmp_path / "bad"), "--max_train_steps", "1", *QUIET, *flags])
    assert rc == 2 and message in capsys.readouterr().err


def test_controlnet_trains_resumes_and_steers_the_pipeline(tmp_path, embedded_paths):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    out = tmp_path / "cn"
    first, _ = train_and_resume(ControlNetTask, out, "--learning_rate", "1e-2", "--max_train_samples", "16",
                                "--validation_prompts", "a handwritten digit one", "--num_validation_images", "1",
                                batch=2)
    assert first["conditioning_embedding_out_channels"] == [16, 32] and first["conditioning"] == "derived (sobel)"
    assert (out / "validation" / "final.png").exists()  # validation got the conditioning image (hook)
    cn = ControlNetModel.from_pretrained(str(out))
    assert max(float(b.weight.detach().abs().max()) for b in cn.controlnet_down_blocks) > 0  # no longer zero

    base = sd_pipeline(embedded_paths["model"])
    pipe = StableDiffusionControlNetPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                             unet=base.unet, scheduler=base.scheduler, controlnet=cn,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    edge = np.zeros((16, 16, 3), np.uint8)
    edge[4:12, 4] = edge[4:12, 11] = 255
    image = Image.fromarray(edge)
    steered = generate(pipe, "a handwritten digit one", image=image)
    unsteered = generate(pipe, "a handwritten digit one", image=image, controlnet_conditioning_scale=0.0)
    assert np.abs(steered - unsteered).max() > 1e-4


# ----------------------------------------------------------------------------------------- structure / scripts

def test_no_copied_training_loop_between_task_modules():
    if shutil.which("duplicates") is None:
        pytest.skip("the duplicates tool is not installed here")
    tasks = os.path.join(REPO, "src", "diffusers_npu", "train", "tasks")
    r = subprocess.run(["duplicates", "--repo", tasks, "--most", "50"], capture_output=True, text=True, timeout=120)
    first = r.stdout.splitlines()[0] if r.stdout else ""
    assert "no duplicates" in first or not any(line.strip().startswith("D") for line in r.stdout.splitlines()), \
        r.stdout


def test_1p_launcher_runs_textual_inversion_and_writes_the_summary(tmp_path, embedded_paths):
    device_id = f"pytest-downstream-{os.getpid()}"
    env = dict(os.environ, ASCEND_DEVICE_ID=device_id, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    try:
        r = subprocess.run(["bash", os.path.join(REPO, "test", "train_full_1p_textual_inversion.sh"),
                            "--max_train_steps=2", "--batch_size=2", f"--output_dir={tmp_path / 'run'}"],
                           capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Final Performance images/sec : " in r.stdout and "Final Train Loss : " in r.stdout
        case_log = os.path.join(REPO, "test", "output", device_id,
                                "StableDiffusion_textual_inversion_bs2_1p_acc.log")
        case = dict(line.strip().split(" = ", 1) for line in open(case_log) if " = " in line)
        assert case["RankSize"] == "1" and case["BatchSize"] == "2" and float(case["ActualFPS"]) > 0
        assert (tmp_path / "run" / "learned_embeds.safetensors").exists()
    finally:
        shutil.rmtree(os.path.join(REPO, "test", "output", device_id), ignore_errors=True)


@pytest.mark.parametrize("script", [f"train_full_{n}p_{t}.sh" for t in ("dreambooth", "textual_inversion",
                                                                        "controlnet") for n in (1, 8)])
def test_launch_scripts_plan_the_right_run(script):
    r = subprocess.run(["bash", "-n", os.path.join(REPO, "test", script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if script == "train_full_8p_controlnet.sh":  # the 8p wrappers share one body; plan one (the 1p runs above)
        device_id = f"pytest-dry-{os.getpid()}"
        env = dict(os.environ, ASCEND_DEVICE_ID=device_id)
        try:
            r = subprocess.run(["bash", os.path.join(REPO, "test", script), "--dry_run=1"], capture_output=True,
                               text=True, timeout=300, env=env, cwd=REPO)
        finally:
            shutil.rmtree(os.path.join(REPO, "test", "output", device_id), ignore_errors=True)
        assert r.returncode == 0, r.stdout + r.stderr
        world = "8" if "_8p_" in script else "1"
        assert f"world={world}" in r.stdout
        task = script.split("p_", 1)[1][:-3]
        example = {"dreambooth": "examples/dreambooth/train_dreambooth.py",
                   "controlnet": "examples/controlnet/train_controlnet.py"}[task]
        assert example in r.stdout and "--resume_from_checkpoint=latest" in r.stdout
