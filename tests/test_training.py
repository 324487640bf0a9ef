"""The training engine on the main task (text-to-image): what flags configure, what a run writes, the
objective's options against float64 formulas, and the promise of no host synchronisation inside a step."""
import collections
import json
import os

import numpy as np
import pytest
import torch

from trainkit import QUIET, argv, main_rc, same_weights, train, trainer_for, weights

T2I = "text_to_image"


# ------------------------------------------------------------------------------------- flags -> engine
def test_original_port_flags_pick_optimizer_attention_and_loader(tmp_path):
    from diffusers_npu.attention import attention_mode_summary
    from diffusers_npu.optim import MegatronAdamW

    t = trainer_for(T2I, tmp_path / "a", "--use_megatron_npu_adamW", "--enable_npu_flash_attention",
                    "--enable_pin_memory", "--enable_persistent_workers", "--dataloader_num_workers", "1")
    assert isinstance(t.optimizer, MegatronAdamW)
    assert set(attention_mode_summary(t.task.unet)) == {"FlashAttnProcessor"}
    dl = t.loader(0)
    assert dl.pin_memory is True and dl.persistent_workers is True and dl.num_workers == 1
    t = trainer_for(T2I, tmp_path / "b", "--use_npu_fuse_adamW", "--attention", "upcast")
    assert isinstance(t.optimizer, torch.optim.AdamW) and t.optimizer.defaults.get("fused")
    assert set(attention_mode_summary(t.task.unet)) == {"UpcastAttnProcessor"}
    t = trainer_for(T2I, tmp_path / "c")
    assert t.args.optimizer == "adamw" and not t.optimizer.defaults.get("fused")
    assert t.loader(0).pin_memory is False


def test_xformers_flag_maps_to_flash_attention_and_says_so(tmp_path, caplog):
    t = trainer_for(T2I, tmp_path / "x", "--enable_xformers_memory_efficient_attention")
    assert t.args.attention == "flash"


def test_scale_lr_multiplies_by_batch_accumulation_and_processes(tmp_path):
    t = trainer_for(T2I, tmp_path / "s", "--scale_lr", "--learning_rate", "1e-4", "--gradient_accumulation_steps", "3")
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 4 * 3 * 1)
    t = trainer_for(T2I, tmp_path / "n", "--learning_rate", "1e-4")
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_gradient_checkpointing_fraction_checkpoints_the_outermost_blocks(tmp_path):
    t = trainer_for(T2I, tmp_path / "g", "--gradient_checkpointing", "--gradient_checkpointing_fraction", "0.5")
    unet = t.task.unet
    flags = lambda block: any(getattr(m, "gradient_checkpointing", False) for m in block.modules())  # noqa: E731
    # digits UNet: down (2), up (2), mid: order = down0, up-last, down1, up0, mid; half of 5 -> 2 blocks
    assert flags(unet.down_blocks[0]) and flags(unet.up_blocks[-1])
    assert not flags(unet.down_blocks[1]) and not flags(unet.up_blocks[0]) and not flags(unet.mid_block)
    full = trainer_for(T2I, tmp_path / "f", "--gradient_checkpointing").task.unet
    assert all(flags(b) for b in (*full.down_blocks, *full.up_blocks))


def test_bf16_autocast_is_really_active_in_the_step(tmp_path, monkeypatch):
    seen = []
    from diffusers import UNet2DConditionModel

    real = UNet2DConditionModel.forward

    def spy(self, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(self, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    train(T2I, tmp_path / "b", "--mixed_precision", "bf16", steps=1)
    assert seen and seen[0] == (True, torch.bfloat16)
    seen.clear()
    train(T2I, tmp_path / "n", "--mixed_precision", "no", steps=1)
    assert seen and seen[0][0] is False


# ------------------------------------------------------------------------------------------ objective
def _objective(prediction="epsilon", **kw):
    from diffusers import DDPMScheduler

    from diffusers_npu.presets import SD_SCHEDULER
    from diffusers_npu.train.objective import Objective

    return Objective(DDPMScheduler(**SD_SCHEDULER, prediction_type=prediction), **kw)


def test_min_snr_weighting_matches_the_float64_formula():
    obj = _objective(snr_gamma=5.0)
    pred, target = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    a = obj.scheduler.alphas_cumprod.double()[t]
    snr = a / (1 - a)
    w = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    mse = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    assert obj.loss(pred, target, t).double().item() == pytest.approx((w * mse).mean().item(), rel=1e-5)
    v = _objective("v_prediction", snr_gamma=5.0)
    wv = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    assert v.loss(pred, target, t).double().item() == pytest.approx((wv * mse).mean().item(), rel=1e-5)
    assert w[0] < 1 and w[-1] == pytest.approx(1.0)  # low-noise steps are down-weighted


def test_v_prediction_target_matches_the_float64_formula():
    obj = _objective("v_prediction", per_sample_noise=True)
    x0 = torch.randn(3, 4, 2, 2)
    batch = {"epoch": torch.tensor([0, 0, 0]), "index": torch.tensor([1, 2, 3])}
    noisy, t, target = obj.noisy(x0, obj.generators(batch))
    noise = torch.stack([torch.randn(4, 2, 2, generator=g) for g in obj.generators(batch)])
    a = obj.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    assert torch.allclose(target.double(), a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double(), atol=1e-5)
    assert torch.allclose(noisy.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(), atol=1e-5)


def test_noise_offset_adds_one_constant_per_sample_and_channel():
    x0 = torch.zeros(2, 4, 3, 3)
    batch = {"epoch": torch.tensor([0, 0]), "index": torch.tensor([5, 6])}
    plain = _objective(per_sample_noise=True)
    off = _objective(per_sample_noise=True, noise_offset=0.5)
    _, _, e1 = plain.noisy(x0, plain.generators(batch))
    _, _, e2 = off.noisy(x0, off.generators(batch))
    diff = e2 - e1
    # the same offset over each sample's spatial grid, different per channel, scaled by 0.5
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    assert diff[:, :, 0, 0].abs().min() > 0 and diff[0, 0, 0, 0] != diff[0, 1, 0, 0]


# ------------------------------------------------------------------------------- outputs and checkpoints
def test_checkpoint_folders_load_as_models_and_the_pipeline_generates(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "o"
    s = train(T2I, out, "--use_ema", "--ema_decay", "0.9", "--validation_prompts", "a handwritten digit one",
              "--num_validation_images", "2", "--validation_inference_steps", "2", steps=2, ckpt=2)
    unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="checkpoint-2/unet")
    ema = UNet2DConditionModel.from_pretrained(str(out), subfolder="checkpoint-2/unet_ema")
    final = weights(out)
    # the final pipeline holds the EMA weights (as upstream); the checkpoint keeps both
    assert all(torch.equal(ema.state_dict()[k], final[k]) for k in final)
    assert not all(torch.equal(unet.state_dict()[k], final[k]) for k in final)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), unet=unet)
    img = pipe("a handwritten digit three", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
    assert os.path.isfile(out / "validation" / "final.png") and os.path.isfile(out / "train_curves.png")
    info = json.load(open(out / "training_info.json"))
    assert info["kind"] == "pipeline" and info["task"] == "text_to_image" and os.path.isdir(info["base_model"])
    assert s["output"]["kind"] == "pipeline" and "unet" in s["output"]["files"]
    for key in ("images_per_sec", "final_loss", "e2e_seconds", "e2e_seconds_total", "parts", "peak_memory_bytes",
                "mixed_precision", "distributed", "exit_reason"):
        assert key in s, key


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"])
def test_saved_pipeline_keeps_the_base_models_scheduler(tmp_path, embedded_paths, scheduler):
    import shutil

    import diffusers

    base = tmp_path / "base"
    shutil.copytree(embedded_paths["model"], base)
    cfg = json.load(open(base / "scheduler" / "scheduler_config.json"))
    cls = getattr(diffusers, scheduler)
    extra = {"skip_prk_steps": True} if scheduler == "PNDMScheduler" else {}
    cls.from_config(cfg, **extra).save_pretrained(str(base / "scheduler"))
    out = tmp_path / "o"
    train(T2I, out, "--pretrained_model_name_or_path", base, steps=1)
    saved = json.load(open(out / "scheduler" / "scheduler_config.json"))
    want = json.load(open(base / "scheduler" / "scheduler_config.json"))
    assert saved["_class_name"] == scheduler
    assert {k: v for k, v in saved.items() if k != "_diffusers_version"} == \
        {k: v for k, v in want.items() if k != "_diffusers_version"}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out))
    for steps in (1, 2, 3):  # a PNDM rebuilt without skip_prk_steps crashed below 4 steps
        img = pipe("a handwritten digit one", num_inference_steps=steps, height=16, width=16, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert img.shape == (1, 16, 16, 3)


def test_checkpoint_resume_latest_and_pruning(tmp_path):
    out = tmp_path / "o"
    train(T2I, out, "--checkpoints_total_limit", "2", steps=3, ckpt=1)
    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-3"]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    s = train(T2I, out, "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest", steps=5, ckpt=1)
    assert s["steps"] == 5
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-5"]
    history = json.load(open(out / "checkpoint-5" / "train_state.json"))["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]  # resumed at 3: no step repeated or lost
    assert [p["last_step"] for p in s["parts"]] == [3, 5]
    assert s["e2e_seconds_total"] == pytest.approx(sum(p["seconds"] for p in s["parts"]))


def test_epochs_and_max_train_samples_set_the_step_count(tmp_path):
    s = train(T2I, tmp_path / "o", "--max_train_samples", "8", "--num_train_epochs", "3", steps=1)
    assert s["steps"] == 1  # --max_train_steps wins
    from diffusers_npu.train import run

    s = run(T2I, ["--output_dir", str(tmp_path / "e"), "--max_train_samples", "8", "--num_train_epochs", "3",
                  "--train_batch_size", "4", *QUIET])
    assert s["steps"] == 6  # 8 samples / batch 4 = 2 steps per epoch


def test_data_sources_train_through_the_real_loaders(tmp_path, embedded_paths):
    from datasets import load_dataset

    rows = load_dataset(embedded_paths["dataset"], split="train").select(range(8))
    rows.save_to_disk(str(tmp_path / "disk"))
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    with open(img_dir / "metadata.jsonl", "w") as f:
        for i, r in enumerate(rows):
            r["image"].save(img_dir / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": r["text"]}) + "\n")
    for flags in (["--local_data_dir", tmp_path / "disk"], ["--train_data_dir", img_dir]):
        s = train(T2I, tmp_path / flags[0].strip("-"), *flags, steps=1)
        assert s["steps"] == 1 and np.isfinite(s["final_loss"])


def test_metrics_a_task_returns_are_logged(tmp_path, capsys):
    rc, out, _ = main_rc("dreambooth", argv(tmp_path / "d", 1, batch=1), capsys)
    assert rc == 0
    assert "instance_loss=" in out and "grad_norm=" in out


def test_help_says_each_default_once_and_describes_the_script(capsys):
    from diffusers_npu.train.config import build_parser
    from diffusers_npu.train.registry import get_task

    text = build_parser(get_task(T2I)).format_help()
    assert "Fine-tune a Stable Diffusion UNet" in text
    assert "(default: None)" not in text
    for flag, fragment in (("--seed", "(default: 0)"), ("--max_grad_norm", "(default: 1.0)")):
        start = text.index(f"\n  {flag} ")
        block = text[start:start + 400]
        assert fragment in block, (flag, block)
    assert " ".join(text.split()).count("default 512 (1024 for SDXL), or 16 for the embedded model") == 1


# ------------------------------------------------------------------------------------- no host sync
def test_no_host_synchronisation_between_flushes(tmp_path, monkeypatch):
    """Tensor.item / __float__ / __bool__ / tolist and the device sync are called only inside flushes, with
    clipping, EMA and fp16 (GradScaler) on, with the default optimizer (under fp16 it is the kernel that takes
    the scaler's found_inf on the device) and with the Megatron-style one."""
    from diffusers_npu import device as dev
    from diffusers_npu.train import prepare_args, task_class
    from diffusers_npu.train.loop import Trainer

    phase = {"now": None}
    calls = collections.Counter()

    def spy(name, real):
        def wrapper(*a, **k):
            if phase["now"] is not None:
                calls[(phase["now"], name)] += 1
            return real(*a, **k)
        return wrapper

    for name in ("item", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(dev, "synchronize", spy("synchronize", dev.synchronize))

    def in_phase(name, real):
        def wrapper(self, *a, **k):
            phase["now"] = name
            try:
                return real(self, *a, **k)
            finally:
                phase["now"] = None
        return wrapper

    monkeypatch.setattr(Trainer, "train_step", in_phase("step", Trainer.train_step))
    monkeypatch.setattr(Trainer, "flush", in_phase("flush", Trainer.flush))
    cls = task_class(T2I)
    for name, extra in (("default", []), ("megatron", ["--optimizer", "megatron_adamw"])):
        calls.clear()
        args = prepare_args(cls, argv(tmp_path / name, 6, "--log_every", "3", "--use_ema", "--mixed_precision",
                                      "fp16", "--max_grad_norm", "1", *extra, batch=2))
        s = Trainer(args, cls).run()
        assert s["steps"] == 6
        in_step = {k: v for k, v in calls.items() if k[0] == "step"}
        assert in_step == {}, (name, in_step)
        assert calls[("flush", "tolist")] >= 2 and calls[("flush", "synchronize")] == 2  # one read per flush


# ------------------------------------------------------------------------------------- aspect-ratio buckets
def test_aspect_ratio_buckets_batch_by_shape_record_crops_and_resume_exactly(tmp_path, monkeypatch, embedded_paths):
    from datasets import load_dataset
    from PIL import Image

    from diffusers_npu.train.tasks.text_to_image import TextToImageModule

    rows = load_dataset(embedded_paths["dataset"], split="train").select(range(24))
    data = tmp_path / "imgs"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as f:
        for i, r in enumerate(rows):
            w, h = [(16, 16), (32, 16), (16, 32)][i % 3]  # square, wide, tall
            r["image"].resize((w, h), Image.NEAREST).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": r["text"]}) + "\n")
    seen = []
    real = TextToImageModule.forward

    def spy(self, batch):
        seen.append((tuple(batch["pixel_values"].shape[-2:]), batch["crop_top_left"].tolist(),
                     batch["original_size"].tolist()))
        return real(self, batch)

    monkeypatch.setattr(TextToImageModule, "forward", spy)
    flags = ["--train_data_dir", data, "--aspect_ratio_buckets", "--random_flip", "--resume_from_checkpoint", "latest"]
    train(T2I, tmp_path / "straight", *flags, steps=6, batch=2)
    shapes = {s for s, _, _ in seen}
    assert len(shapes) == 3  # three buckets, each batch one shape (a stack of mixed shapes would fail)
    assert all(len(crops) == 2 and len(orig) == 2 for _, crops, orig in seen)
    assert any(o[0] != o[1] for _, _, origs in seen for o in origs)  # original sizes of wide/tall images kept
    train(T2I, tmp_path / "split", *flags, steps=3, batch=2, ckpt=3)
    train(T2I, tmp_path / "split", *flags, steps=6, batch=2)
    assert same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"))
