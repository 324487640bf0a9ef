"""FLUX.1 DreamBooth (full), DreamBooth-LoRA and ControlNet (issue #21 item 1) on the tiny FLUX pipeline
(diffusers' pipeline-test sizes, with the guidance embedding of FLUX.1-dev): outputs load in FluxPipeline /
FluxControlNetPipeline and generate, the LoRA changes the image and so does the ControlNet's conditioning image,
a checkpoint's transformer / ControlNet loads with from_pretrained, a resumed run ends bit-identical to an
uninterrupted one, and the FLUX-specific bad input is one line, exit 2."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from trainkit import QUIET, main_rc, same_weights, weights


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    from diffusers_npu.tiny_pipelines import build, flux_transformer

    root = tmp_path_factory.mktemp("flux")
    folder = build("flux", str(root / "model"))
    # like FLUX.1-dev: a guidance-distilled transformer (the tiny kind has diffusers' test default, without)
    flux_transformer(guidance_embeds=True).save_pretrained(os.path.join(folder, "transformer"))
    data = root / "instance"
    data.mkdir()
    from PIL import Image

    for i in range(4):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    return folder, str(data)


@pytest.fixture(scope="module")
def flux_fill(flux_model, tmp_path_factory):
    """A fill50k-shaped data set (image, conditioning_image, text) saved with datasets' save_to_disk, and the
    same rows as upstream's --jsonl_for_train reads them (image paths) in ``rows.jsonl`` beside it."""
    import json
    from datasets import Dataset, Image as DImage
    from PIL import Image

    def img(seed):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))

    folder = str(tmp_path_factory.mktemp("fill") / "fill50k")
    rows = Dataset.from_dict({"image": [img(i) for i in range(4)],
                              "conditioning_image": [img(10 + i) for i in range(4)],
                              "text": ["red circle with blue background",
                                       "cyan circle with brown floral background"] * 2})
    rows.cast_column("image", DImage()).cast_column("conditioning_image", DImage()).save_to_disk(folder)
    root = os.path.dirname(folder)
    with open(os.path.join(root, "rows.jsonl"), "w") as f:
        for i, row in enumerate(rows):
            for col in ("image", "conditioning_image"):
                row[col].save(os.path.join(root, f"{col}{i}.png"))
            f.write(json.dumps({"image": os.path.join(root, f"image{i}.png"), "text": row["text"],
                                "conditioning_image": os.path.join(root, f"conditioning_image{i}.png")}) + "\n")
    return folder


def _cn_flags(model, data):
    source = "--jsonl_for_train" if data.endswith(".jsonl") else "--dataset_name"
    return ["--pretrained_model_name_or_path", model, source, data, "--resolution", "32",
            "--max_sequence_length", "16", "--num_double_layers", "1", "--num_single_layers", "1"]


def _cn_argv(model, data, out, steps, *extra):
    return [*_cn_flags(model, data), "--train_batch_size", "2", "--max_train_steps", str(steps), "--output_dir",
            str(out), *QUIET, *extra]


def _argv(model, data, out, steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt",
            "a photo of sks dog", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--output_dir", str(out), "--max_sequence_length", "16", "--lr_warmup_steps", "0", *QUIET, *extra]


def _generate(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, guidance_scale=3.5,
                max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_flux_lora_and_full_outputs_load_generate_and_differ_from_the_base(flux_model, tmp_path, capsys):
    import diffusers

    model, data = flux_model
    rc, _, err = main_rc("dreambooth_lora_flux", _argv(model, data, tmp_path / "lora", 3, "--learning_rate", "1e-2",
                                                        "--rank", "4"), capsys)
    assert rc == 0, err
    pipe = diffusers.FluxPipeline.from_pretrained(model)
    base = _generate(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert np.abs(_generate(pipe) - base).max() > 1e-3  # the trained adapters change the image

    rc, _, err = main_rc("dreambooth_flux", _argv(model, data, tmp_path / "full", 2, "--checkpointing_steps", "1"),
                         capsys)
    assert rc == 0, err
    full = diffusers.FluxPipeline.from_pretrained(str(tmp_path / "full"))
    assert full.transformer.config.guidance_embeds and np.isfinite(_generate(full)).all()
    ckpt = diffusers.FluxTransformer2DModel.from_pretrained(str(tmp_path / "full"), subfolder="checkpoint-2/transformer")
    final = full.transformer.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in ckpt.state_dict().items())
    fresh = diffusers.FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    assert any(not torch.equal(v, final[k]) for k, v in fresh.state_dict().items())  # full fine-tuning trained it


def test_flux_controlnet_output_and_checkpoint_load_and_steer_the_pipeline(flux_model, flux_fill, tmp_path, capsys):
    """Trained on upstream's --jsonl_for_train rows, the FluxControlNetModel (output folder and checkpoint) loads
    with from_pretrained; in FluxControlNetPipeline a different conditioning image gives a different image; the
    inference entry point (test_infer/controlnet.py) takes the output folder as a FLUX ControlNet."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from inference_inputs import COMMON, outputs, run_main, save_rgb

    model, _ = flux_model
    out = tmp_path / "cn"
    rows = os.path.join(os.path.dirname(flux_fill), "rows.jsonl")
    rc, _, err = main_rc("controlnet_flux", _cn_argv(model, rows, out, 2, "--learning_rate", "1e-2",
                                                     "--checkpointing_steps", "2"), capsys)
    assert rc == 0, err
    net = FluxControlNetModel.from_pretrained(str(out))
    assert (net.config.num_layers, net.config.num_single_layers, net.config.guidance_embeds) == (1, 1, True)
    ckpt = FluxControlNetModel.from_pretrained(str(out / "checkpoint-2" / "controlnet"))
    final = net.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in ckpt.state_dict().items())
    pipe = FluxControlNetPipeline.from_pretrained(model, controlnet=net)
    cond = [save_rgb(tmp_path / f"cond{i}.png", size=(32, 32), seed=i) for i in range(2)]
    from PIL import Image

    images = [pipe("a photo", control_image=Image.open(c), num_inference_steps=2, height=32, width=32,
                   max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
              for c in cond]
    assert np.isfinite(images[0]).all() and np.abs(images[0] - images[1]).max() > 1e-4  # the ControlNet steers
    rc, _, err = run_main("controlnet", [*COMMON, "--model", model, "--controlnet", str(out), "--image", cond[0],
                                         "--prompt", "a photo", "--height", "32", "--width", "32", "--output_dir",
                                         tmp_path / "gen"], capsys)
    assert rc == 0, err
    ((_, meta),) = outputs(tmp_path / "gen").values()
    assert meta["pipeline"] == "FluxControlNetPipeline" and meta["controlnet"] == str(out)


def test_flux_controlnet_loss_is_upstreams_plain_velocity_mse():
    """Upstream's train_controlnet_flux.py: MSE of the prediction against noise - latents, neither preconditioned
    nor weighted, whatever --weighting_scheme (it only sets the timestep density)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_npu.train.config import DeviceInfo, parse_args, resolve_defaults
    from diffusers_npu.train.registry import find_task

    cls = find_task("controlnet_flux")
    args = resolve_defaults(parse_args(cls, ["--pretrained_model_name_or_path", "/m", "--dataset_name", "/d",
                                             "--weighting_scheme", "cosmap"]), DeviceInfo("cpu"), None, cls)
    assert args.precondition_outputs == 0
    task = cls(args)
    task.noise_scheduler = FlowMatchEulerDiscreteScheduler()
    objective = task.objective()
    g = torch.Generator().manual_seed(0)
    latents, pred = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    sample = objective.sample(latents)
    expected = torch.nn.functional.mse_loss(pred, sample.noise - latents)
    assert torch.allclose(objective.flow_loss(pred, sample), expected)
    task.weight_loss = True  # the SD3 tasks weight the loss by the scheme: not upstream's FLUX ControlNet loss
    assert not torch.allclose(task.objective().flow_loss(pred, sample), expected)


def test_flux_resume_is_bit_identical(flux_model, tmp_path, capsys):
    model, data = flux_model
    rc, _, err = main_rc("dreambooth_flux", _argv(model, data, tmp_path / "a", 4, "--checkpointing_steps", "2"), capsys)
    assert rc == 0, err
    rc, _, err = main_rc("dreambooth_flux", _argv(model, data, tmp_path / "b", 2, "--checkpointing_steps", "2"), capsys)
    assert rc == 0, err
    rc, _, err = main_rc("dreambooth_flux", _argv(model, data, tmp_path / "b", 4, "--checkpointing_steps", "2",
                                                  "--resume_from_checkpoint", "latest"), capsys)
    assert rc == 0, err
    a = weights(tmp_path / "a", "transformer")
    assert same_weights(a, weights(tmp_path / "b", "transformer"))


def test_flux_bad_resolution_and_sequence_length_are_one_line_errors(flux_model, tmp_path, capsys, monkeypatch):
    from diffusers_npu.train.dit import DiTTask

    model, data = flux_model
    # the released FLUX VAE's factor 8 (the tiny VAE has 1): 40 px is a multiple of 8 but not of 16
    monkeypatch.setattr(DiTTask, "vae_scale_factor", lambda self: 8)
    rc, _, err = main_rc("dreambooth_flux", _argv(model, data, tmp_path / "r", 1, "--resolution", "40"), capsys)
    monkeypatch.undo()
    assert rc == 2 and "--resolution 40: FLUX packs 2x2 latent patches into one token, so the resolution must be a " \
                       "multiple of 16 (2 x the VAE's factor 8)" in err
    assert not os.path.exists(tmp_path / "r")
    argv = _argv(model, data, tmp_path / "s", 1)
    argv[argv.index("--max_sequence_length") + 1] = "600"
    rc, _, err = main_rc("dreambooth_lora_flux", argv, capsys)
    assert rc == 2 and "--max_sequence_length 600: the T5 tokenizer of" in err and "takes 1 to 512 tokens" in err
    assert not os.path.exists(tmp_path / "s")
    rc, _, err = main_rc("dreambooth_flux", ["--instance_data_dir", data, *QUIET, "--output_dir", tmp_path / "e"],
                         capsys)
    assert rc == 2 and "there is no embedded FLUX.1 model" in err


def test_flux_controlnet_bad_input_is_one_line_and_writes_nothing(flux_model, flux_fill, tmp_path, capsys,
                                                                  monkeypatch):
    """A resolution FLUX's packing cannot divide (the check DreamBooth FLUX uses), more ControlNet blocks than
    the transformer has, two data sources at once and upstream's Adafactor: one line, exit 2, no output
    folder."""
    from diffusers_npu.train.dit import DiTTask

    model, _ = flux_model
    cases = [(["--resolution", "40"], "--resolution 40: FLUX packs 2x2 latent patches into one token, so the "
                                      "resolution must be a multiple of 16 (2 x the VAE's factor 8)"),
             (["--num_double_layers", "4"], "--num_double_layers 4: the transformer of"),
             (["--jsonl_for_train", "rows.jsonl"], "--jsonl_for_train: give it or --dataset_name, not both"),
             (["--use_adafactor"], "--use_adafactor: Adafactor is not offered here; use --optimizer with one of")]
    for i, (extra, message) in enumerate(cases):
        if i == 0:  # the released FLUX VAE's factor 8 (the tiny VAE has 1)
            monkeypatch.setattr(DiTTask, "vae_scale_factor", lambda self: 8)
        rc, _, err = main_rc("controlnet_flux", _cn_argv(model, flux_fill, tmp_path / f"o{i}", 1, *extra), capsys)
        monkeypatch.undo()
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(tmp_path / f"o{i}")


# ------------------------------------------------------------------ upstream's flags and README commands
FIXTURES = os.path.join(os.path.dirname(__file__), "data", "upstream_flags_flux")
SCRIPTS = {"train_dreambooth_flux": "dreambooth_flux", "train_dreambooth_lora_flux": "dreambooth_lora_flux",
           "train_controlnet_flux": "controlnet_flux"}
DELIBERATE = {"--pretrained_model_name_or_path", "--dataset_name", "--instance_prompt", "--seed", "--mixed_precision",
              "--conditioning_image_column"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_flux_scripts_take_upstreams_flags_and_defaults(script):
    """Every flag of upstream's script (tests/data/upstream_flags_flux/, transcribed from huggingface/diffusers)
    is accepted, with upstream's default except the project-wide deliberate differences (README)."""
    import json

    from diffusers_npu.train.config import DeviceInfo, build_parser, parse_args, resolve_defaults
    from diffusers_npu.train.registry import find_task

    cls = find_task(SCRIPTS[script])
    spec = json.load(open(os.path.join(FIXTURES, f"{script}.json")))["flags"]
    by_flag = {o: a.dest for a in build_parser(cls)._actions for o in a.option_strings}
    assert sorted(f for f in spec if f not in by_flag) == []
    args = resolve_defaults(parse_args(cls, ["--pretrained_model_name_or_path", "/m", "--dataset_name", "/d"]),
                            DeviceInfo("cpu"), None, cls)
    differ = []
    for flag, up in spec.items():
        if up.get("action") in ("store_true", "store_false") or up.get("default_is_expression") or flag in DELIBERATE:
            continue
        ours = getattr(args, by_flag[flag])
        if isinstance(ours, str) and isinstance(up["default"], str) and ours.lower() == up["default"].lower():
            continue
        if ours != up["default"] and not (isinstance(ours, float) and up["default"] is not None
                                          and abs(ours - float(up["default"])) < 1e-12):
            differ.append((flag, up["default"], ours))
    assert differ == []
    assert args.precondition_outputs == 0  # upstream's FLUX scripts target the velocity, never preconditioned
    if "--image_interpolation_mode" in spec:  # upstream's choices: torchvision's InterpolationMode names
        for mode in ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"):
            assert parse_args(cls, ["--image_interpolation_mode", mode]).image_interpolation_mode == mode
    for flag, accepts in ((f, s["accepts"]) for f, s in spec.items() if "accepts" in s):  # upstream's ranges
        for end in ("min", "max"):
            if end in accepts:
                value = accepts[end]
                args = resolve_defaults(parse_args(cls, ["--pretrained_model_name_or_path", "/m", "--dataset_name",
                                                         "/d", f"{flag}={value}"]), DeviceInfo("cpu"), None, cls)
                assert getattr(args, by_flag[flag]) == value, (flag, value)


def _readme_commands():
    import json

    return [pytest.param(s, c, id=f"{s}-{i}") for s in sorted(SCRIPTS)
            for i, c in enumerate(json.load(open(os.path.join(FIXTURES, f"{s}.json")))["readme_commands"])]


@pytest.mark.parametrize("script, cmd", _readme_commands())
def test_flux_readme_commands_run_on_the_tiny_model(script, cmd, flux_model, flux_fill, tmp_path, capsys,
                                                    monkeypatch):
    """Upstream's README commands, unchanged (Prodigy included), on the tiny FLUX model (32 px, 2 steps; the
    ControlNet's one double block, as the tiny transformer has one): they train, keep the output and say in one
    line what was not pushed to the (offline) Hub."""
    from inference_inputs import save_rgb

    model, data = flux_model
    monkeypatch.chdir(tmp_path)
    for i in (1, 2):  # the ControlNet README's validation images
        save_rgb(tmp_path / f"conditioning_image_{i}.png", size=(32, 32), seed=i)
    subst = {"{MODEL}": model, "{INSTANCE_DIR}": data, "{OUTPUT_DIR}": str(tmp_path / "out"),
             "black-forest-labs/FLUX.1-dev": model, "fusing/fill50k": flux_fill, "path to save model": "out"}
    argv = []
    for tok in cmd["argv"]:
        for k, v in subst.items():
            tok = tok.replace(k, v)
        argv.append(tok)
    tiny = ["--resolution", "32", "--max_train_steps", "2", "--report_to", "none", "--max_sequence_length", "16",
            "--disable_progress_bar", "--num_validation_images", "1", "--validation_inference_steps", "2"]
    if script == "train_controlnet_flux":
        tiny += ["--num_double_layers", "1"]
    else:
        assert any(t.lower() == "--optimizer=prodigy" for t in argv), argv
    rc, _, err = main_rc(SCRIPTS[script], argv + tiny, capsys)
    assert rc == 2 and "--push_to_hub: the Hugging Face Hub cannot be reached" in err, err
    assert os.path.isfile(tmp_path / "out" / "training_info.json") or \
        os.path.isfile(tmp_path / "out" / "model_index.json")


@pytest.mark.slow
def test_flux_two_processes_fsdp_full_resume_exactly_and_lora_under_ddp(flux_model, flux_fill, tmp_path):
    """One torchrun (2 CPU processes, gloo): full fine-tuning under FSDP (its default) straight vs pre-empted at
    step 2 and resumed -- the same bits; one FSDP step and one DDP step each equal one process on the same global
    batch; DreamBooth-LoRA under DDP (its default), pre-empted and resumed to the same bits, and under FSDP; the
    ControlNet under DDP, saved as the bf16 variant
    (--save_weight_dtype, which test_infer/controlnet.py loads), and under FSDP (its default); both ranks agree."""
    from test_distributed import COMPARE, _assert_ranks_agree, _job, _torchrun, assert_same_update

    model, data = flux_model
    common = ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt",
              "a photo of sks dog", "--resolution", "32", "--max_sequence_length", "16", "--lr_warmup_steps", "0",
              "--per_sample_noise", "--resume_from_checkpoint", "latest"]
    jobs = [_job("straight", "dreambooth_flux", tmp_path / "straight", 4, *common),
            _job("preempted", "dreambooth_flux", tmp_path / "split", 4, *common, sigterm_at=2),
            _job("resumed", "dreambooth_flux", tmp_path / "split", 4, *common),
            _job("lora", "dreambooth_lora_flux", tmp_path / "lora", 2, *common),
            _job("compare", "dreambooth_flux", tmp_path / "compare", 1, *common, *COMPARE),
            _job("compare_ddp", "dreambooth_flux", tmp_path / "compare_ddp", 1, *common, *COMPARE, "--distributed",
                 "ddp"),
            _job("lora_fsdp", "dreambooth_lora_flux", tmp_path / "lora_fsdp", 2, *common, "--distributed", "fsdp"),
            _job("lora_preempted", "dreambooth_lora_flux", tmp_path / "lora_split", 2, *common, sigterm_at=1),
            _job("lora_resumed", "dreambooth_lora_flux", tmp_path / "lora_split", 2, *common),
            _job("cn_ddp", "controlnet_flux", tmp_path / "cn_ddp", 2, *_cn_flags(model, flux_fill), "--distributed",
                 "ddp", "--save_weight_dtype", "bf16"),
            _job("cn_fsdp", "controlnet_flux", tmp_path / "cn_fsdp", 2, *_cn_flags(model, flux_fill))]
    from trainkit import free_port  # other test runs on this machine use the fixed ports

    results, _ = _torchrun(tmp_path, jobs, free_port())
    # full fine-tuning runs under FSDP by default: each rank holds its own shard (the saved models are compared)
    _assert_ranks_agree(results, sharded={"straight", "preempted", "resumed", "compare", "cn_fsdp", "lora_fsdp"})
    # one optimizer step on 2 processes, under FSDP and under DDP = one process with the same global batch (4)
    from trainkit import train

    train("dreambooth_flux", tmp_path / "one", *common, *COMPARE, steps=1, batch=4)
    assert_same_update(tmp_path / "compare", tmp_path / "one", model, "transformer")
    assert_same_update(tmp_path / "compare_ddp", tmp_path / "one", model, "transformer")
    from test_distributed import _ran

    assert _ran(_torchrun.engines, "compare_ddp", "ddp") and _ran(_torchrun.engines, "lora_fsdp", "fsdp")
    import json

    split = json.load(open(tmp_path / "split" / "train_summary.json"))
    assert [p["exit_reason"] for p in split["parts"]] == ["preempted", "completed"]
    assert split["distributed"] == "fsdp"
    assert same_weights(weights(tmp_path / "split", "transformer"), weights(tmp_path / "straight", "transformer"))
    assert json.load(open(tmp_path / "lora" / "train_summary.json"))["distributed"] == "ddp"
    for name in ("lora", "lora_fsdp"):
        assert os.path.isfile(tmp_path / name / "pytorch_lora_weights.safetensors")
    from safetensors.torch import load_file

    lora_parts = json.load(open(tmp_path / "lora_split" / "train_summary.json"))["parts"]
    assert [p["exit_reason"] for p in lora_parts] == ["preempted", "completed"]  # LoRA resumes to the same bits
    assert same_weights(load_file(str(tmp_path / "lora_split" / "pytorch_lora_weights.safetensors")),
                        load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")))
    from diffusers import FluxControlNetModel

    saved = load_file(str(tmp_path / "cn_ddp" / "diffusion_pytorch_model.bf16.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    FluxControlNetModel.from_pretrained(str(tmp_path / "cn_ddp"), variant="bf16")
    from inference_inputs import COMMON, run_main, save_rgb  # the inference entry point finds the bf16 variant

    rc, _, err = run_main("controlnet", [*COMMON, "--model", model, "--controlnet", tmp_path / "cn_ddp", "--image",
                                         save_rgb(tmp_path / "c.png", size=(32, 32)), "--prompt", "a photo", "--height",
                                         "32", "--width", "32", "--output_dir", tmp_path / "gen"])
    assert rc == 0, err
    assert json.load(open(tmp_path / "cn_ddp" / "train_summary.json"))["distributed"] == "ddp"
    assert json.load(open(tmp_path / "cn_fsdp" / "train_summary.json"))["distributed"] == "fsdp"
    FluxControlNetModel.from_pretrained(str(tmp_path / "cn_fsdp"))


def test_flux_8_device_launchers_shard_full_fine_tuning_and_keep_lora_on_ddp(monkeypatch, capsys, tmp_path):
    """The 8-device launchers' commands: full fine-tuning and the ControlNet with --distributed=fsdp (the memory
    plan that fits 8 devices of 64 GB, tests/test_memory_plan.py), LoRA with ddp; MindSpeed-MM's FLUX row
    settings, upstream's ControlNet README ones."""
    from diffusers_npu import launch
    from diffusers_npu.launch import devices

    monkeypatch.setattr(devices, "count_devices", lambda: ("npu", 8))
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "PORT", "ASCEND_DEVICE_ID"):
        monkeypatch.delenv(var, raising=False)
    for task, engine, extra in (("dreambooth_flux", "fsdp", "--resolution=256 --train_batch_size=16"),
                                ("dreambooth_lora_flux", "ddp", "--resolution=512 --train_batch_size=1"),
                                ("controlnet_flux", "fsdp", "--resolution=512 --gradient_accumulation_steps=16")):
        rc = launch.main([task, "--num_devices=8", "--dry_run=1", "--model_name=/m/flux1-dev",
                          f"--log_dir={tmp_path}"])
        out = capsys.readouterr().out
        assert rc == 0 and "--nproc_per_node 8" in out and f"--distributed={engine}" in out, out
        assert all(flag in out for flag in extra.split()) and "--mixed_precision=bf16" in out
