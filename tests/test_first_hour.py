"""What a newcomer meets in the first hour (issue #22): no-argument example runs, the plan line, resume into an
empty folder, a pipeline of another family, a data set path that does not exist, single-file checkpoints, the
launcher's dry run, --help and the documentation's claims."""
import json
import os
import time

import pytest

from trainkit import REPO, argv, main_rc

T2I = "text_to_image"


def test_no_arguments_is_the_launchers_embedded_default():
    from diffusers_npu.train.config import parse_args
    from diffusers_npu.train.registry import get_task

    args = parse_args(get_task(T2I), [])
    assert (args.train_batch_size, args.max_train_steps, args.learning_check, args.use_ema) == (64, 600, True, True)
    assert args.config_file.endswith("examples/text_to_image/configs/embedded_digits.yaml")
    dream = parse_args(get_task("dreambooth"), [])
    assert (dream.max_train_steps, dream.train_batch_size, dream.with_prior_preservation) == (400, 4, True)
    # any argument: the plain defaults (upstream's), as before
    assert parse_args(get_task(T2I), ["--seed", "0"]).train_batch_size == 16


def test_plan_line_and_loud_resume_latest_into_an_empty_folder(tmp_path, embedded_paths, capsys):
    rc, out, err = main_rc(T2I, argv(tmp_path / "o", 1, "--resume_from_checkpoint", "latest"), capsys)
    assert rc == 0, err
    assert f"warning: --resume_from_checkpoint latest: no checkpoint in {tmp_path / 'o'}; starting from step 1" in out
    plan = next(l for l in out.splitlines() if l.startswith("Plan: "))
    for part in ("text_to_image", "(the embedded digits model)", "digits-dataset", "1 steps",
                 "batch 4 x 1 cpu device x 1 accumulation = 4", "fp32", "one process", f"output {tmp_path / 'o'}",
                 "expected time unknown"):
        assert part in plan, plan


def test_explicit_resume_path_that_does_not_exist_is_one_line_exit_2(tmp_path, embedded_paths, capsys):
    rc, out, err = main_rc(T2I, argv(tmp_path / "o", 1, "--resume_from_checkpoint", str(tmp_path / "nope")), capsys)
    assert rc == 2
    assert err.strip() == (f"error: --resume_from_checkpoint: '{tmp_path / 'nope'}' does not exist (expected a "
                           f"checkpoint-N folder or 'latest')")


def _pipeline_folder(path, class_name):
    os.makedirs(path)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": class_name}, f)
    return str(path)


@pytest.mark.parametrize("task,class_name,script", [
    (T2I, "StableDiffusionXLPipeline", "examples/text_to_image/train_text_to_image_sdxl.py"),
    ("text_to_image_sdxl", "StableDiffusionPipeline", "examples/text_to_image/train_text_to_image.py"),
    (T2I, "StableDiffusion3Pipeline", "examples/dreambooth/train_dreambooth_sd3.py"),
    ("text_to_image_sdxl", "FluxPipeline", "examples/dreambooth/train_dreambooth_flux.py"),
])
def test_a_pipeline_of_another_family_is_refused_naming_the_script(task, class_name, script, tmp_path, capsys):
    folder = _pipeline_folder(tmp_path / "m", class_name)
    rc, out, err = main_rc(task, argv(tmp_path / "o", 1, "--pretrained_model_name_or_path", folder,
                                      "--dataset_name", str(tmp_path)), capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --pretrained_model_name_or_path: {folder} is a ") and err.strip().endswith(
        f"models: use {script}")


@pytest.mark.parametrize("value", ["./no-such-data", "data/no-such-data/x", "no-such.parquet", "user/name"])
def test_dataset_name_that_does_not_exist_says_folder_does_not_exist_without_hub_retries(value, tmp_path,
                                                                                           monkeypatch):
    from diffusers_npu.data.sources import load_source
    from diffusers_npu.errors import DataError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the suite is offline: a Hub id must not be tried either
    started = time.time()
    with pytest.raises(DataError) as e:
        load_source(dataset_name=value)
    assert str(e.value).startswith(f"--dataset_name: {value}: folder does not exist")
    assert time.time() - started < 5


@pytest.mark.parametrize("name", ["model.safetensors", "v1-5-pruned.ckpt"])
def test_single_file_checkpoint_is_refused_with_how_to_convert(name, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(b"\0" * 16)
    rc, out, err = main_rc(T2I, argv(tmp_path / "o", 1, "--pretrained_model_name_or_path", path,
                                     "--dataset_name", str(tmp_path)), capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{path} is a single-file checkpoint" in err and "from_single_file(" in err and "save_pretrained(" in err
    from diffusers_npu.inference.cli import main as infer_main  # inference shares the folder check

    rc = infer_main("text-to-image", ["--model", str(path), "--prompt", "x", "--output_dir", str(tmp_path / "i")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a single-file checkpoint" in err and "Traceback" not in err


def test_launcher_dry_run_refuses_what_the_run_refuses(capsys):
    from diffusers_npu import launch

    rc = launch.main(["text_to_image", "--dry_run", "--resolution=30"])
    out, err = capsys.readouterr()
    assert rc == 2 and "Launch:" not in out
    assert err.strip() == ("error: argument --resolution: expected a positive multiple of 8, got '30' (see "
                           "train_text_to_image.py --help)")


def test_help_states_defaults_and_the_no_argument_run(capsys):
    from diffusers_npu.train.config import build_parser
    from diffusers_npu.train.registry import get_task

    text = " ".join(build_parser(get_task(T2I)).format_help().split())
    assert "default: keep all" in text and "default: off (plain MSE)" in text
    assert "default: none (no validation images)" in text
    assert "With no arguments: trains the embedded offline digits model" in text and "learning check" in text


def test_num_validation_images_0_means_no_validation_images(tmp_path, embedded_paths):
    from diffusers_npu.train import run

    s = run(T2I, argv(tmp_path / "o", 1, "--validation_prompts", "a handwritten digit seven",
                      "--num_validation_images", "0"))
    assert s["config"]["validation_prompts"] is None and not (tmp_path / "o" / "validation").exists()


def test_documentation_claims_that_were_false():
    readme = open(os.path.join(REPO, "README.md")).read()
    launching = open(os.path.join(REPO, "docs", "launching.md")).read()
    assert "picture above" not in readme
    assert '"a 7"' not in launching and "last logged step" not in launching
    assert "--lora test/output/0/lora " not in readme
    ignored = open(os.path.join(REPO, ".gitignore")).read().split()
    assert "/sd-model-finetuned/" in ignored and "/text-inversion-model/" in ignored


def test_embedded_model_starts_sampling_from_pure_noise(embedded_paths):
    """Issue #22 part 1: at 16 px, SD's schedule ends at alpha_bar 0.0047, which over an 8x8x4 latent leaves the
    digit readable in the starting noise; the model then drew the digit the noise suggested, not the prompt's,
    without classifier-free guidance. The embedded model trains and samples with a zero terminal SNR and
    v-prediction, and its sampler's first step is the last training timestep."""
    import torch
    from diffusers import DDIMScheduler

    from diffusers_npu.train.sd import load_component

    train = load_component("scheduler", embedded_paths["model"], None)  # what the trainer trains with
    assert train.config.prediction_type == "v_prediction"
    assert float(train.alphas_cumprod[-1]) == 0.0 and float(train.alphas_cumprod[-2]) > 0.0
    sample = DDIMScheduler.from_pretrained(embedded_paths["model"], subfolder="scheduler")
    sample.set_timesteps(50)
    assert int(sample.timesteps[0]) == 999 and float(sample.alphas_cumprod[999]) == 0.0
    # the same at the default schedule would start at 0.0047: the old embedded model's case
    from diffusers import DDPMScheduler

    from diffusers_npu.presets import SD_SCHEDULER
    assert float(DDPMScheduler(**SD_SCHEDULER).alphas_cumprod[-1]) == pytest.approx(0.0047, abs=2e-4)
    noisy = train.add_noise(torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.tensor([999]))
    assert torch.count_nonzero(noisy) == 0  # no trace of the image at the first sampling step
