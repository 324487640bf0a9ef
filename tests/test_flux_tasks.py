"""FLUX.1 DreamBooth (full) and DreamBooth-LoRA (issue #21 item 1) on the tiny FLUX pipeline (diffusers'
pipeline-test sizes, with the guidance embedding of FLUX.1-dev): outputs load in FluxPipeline and generate, the
LoRA changes the image, a checkpoint's transformer loads with from_pretrained, a resumed run ends bit-identical
to an uninterrupted one, and the FLUX-specific bad input is one line, exit 2."""
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


# ------------------------------------------------------------------ upstream's flags and README commands
FIXTURES = os.path.join(os.path.dirname(__file__), "data", "upstream_flags_flux")
SCRIPTS = {"train_dreambooth_flux": "dreambooth_flux", "train_dreambooth_lora_flux": "dreambooth_lora_flux"}
DELIBERATE = {"--pretrained_model_name_or_path", "--dataset_name", "--instance_prompt", "--seed", "--mixed_precision"}


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


def _readme_commands():
    import json

    return [pytest.param(s, c, id=f"{s}-{i}") for s in sorted(SCRIPTS)
            for i, c in enumerate(json.load(open(os.path.join(FIXTURES, f"{s}.json")))["readme_commands"])]


@pytest.mark.parametrize("script, cmd", _readme_commands())
def test_flux_readme_commands_run_on_the_tiny_model(script, cmd, flux_model, tmp_path, capsys, monkeypatch):
    """Upstream's README commands, unchanged (Prodigy included), on the tiny FLUX model (32 px, 2 steps): they
    train, keep the output and say in one line what was not pushed to the (offline) Hub."""
    model, data = flux_model
    monkeypatch.chdir(tmp_path)
    subst = {"{MODEL}": model, "{INSTANCE_DIR}": data, "{OUTPUT_DIR}": str(tmp_path / "out")}
    argv = []
    for tok in cmd["argv"]:
        for k, v in subst.items():
            tok = tok.replace(k, v)
        argv.append(tok)
    tiny = ["--resolution", "32", "--max_train_steps", "2", "--report_to", "none", "--max_sequence_length", "16",
            "--disable_progress_bar", "--num_validation_images", "1", "--validation_inference_steps", "2"]
    assert any(t.lower() == "--optimizer=prodigy" for t in argv), argv
    rc, _, err = main_rc(SCRIPTS[script], argv + tiny, capsys)
    assert rc == 2 and "--push_to_hub: the Hugging Face Hub cannot be reached" in err, err
    assert os.path.isfile(tmp_path / "out" / "training_info.json") or \
        os.path.isfile(tmp_path / "out" / "model_index.json")


@pytest.mark.slow
def test_flux_two_processes_fsdp_full_resume_exactly_and_lora_under_ddp(flux_model, tmp_path):
    """One torchrun (2 CPU processes, gloo): full fine-tuning under FSDP (its default) straight vs pre-empted at
    step 2 and resumed -- the same bits; DreamBooth-LoRA under DDP (its default); both ranks agree."""
    from test_distributed import COMPARE, _assert_ranks_agree, _job, _torchrun, assert_same_update

    model, data = flux_model
    common = ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt",
              "a photo of sks dog", "--resolution", "32", "--max_sequence_length", "16", "--lr_warmup_steps", "0",
              "--per_sample_noise", "--resume_from_checkpoint", "latest"]
    jobs = [_job("straight", "dreambooth_flux", tmp_path / "straight", 4, *common),
            _job("preempted", "dreambooth_flux", tmp_path / "split", 4, *common, sigterm_at=2),
            _job("resumed", "dreambooth_flux", tmp_path / "split", 4, *common),
            _job("lora", "dreambooth_lora_flux", tmp_path / "lora", 2, *common),
            _job("compare", "dreambooth_flux", tmp_path / "compare", 1, *common, *COMPARE)]
    import socket

    with socket.socket() as sock:  # a free port: other test runs on this machine use the fixed ones
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results, _ = _torchrun(tmp_path, jobs, port)
    # full fine-tuning runs under FSDP by default: each rank holds its own shard (the saved models are compared)
    _assert_ranks_agree(results, sharded={"straight", "preempted", "resumed", "compare"})
    # one optimizer step under FSDP on 2 processes = one process with the same global batch (4)
    from trainkit import train

    train("dreambooth_flux", tmp_path / "one", *common, *COMPARE, steps=1, batch=4)
    assert_same_update(tmp_path / "compare", tmp_path / "one", model, "transformer")
    import json

    split = json.load(open(tmp_path / "split" / "train_summary.json"))
    assert [p["exit_reason"] for p in split["parts"]] == ["preempted", "completed"]
    assert split["distributed"] == "fsdp"
    assert same_weights(weights(tmp_path / "split", "transformer"), weights(tmp_path / "straight", "transformer"))
    assert json.load(open(tmp_path / "lora" / "train_summary.json"))["distributed"] == "ddp"
    assert os.path.isfile(tmp_path / "lora" / "pytorch_lora_weights.safetensors")


def test_flux_8_device_launchers_shard_full_fine_tuning_and_keep_lora_on_ddp(monkeypatch, capsys, tmp_path):
    """The 8-device launchers' commands: full fine-tuning with --distributed=fsdp (the memory plan that fits 8
    devices of 64 GB, tests/test_memory_plan.py), LoRA with ddp; MindSpeed-MM's FLUX row settings."""
    from diffusers_npu import launch
    from diffusers_npu.launch import devices

    monkeypatch.setattr(devices, "count_devices", lambda: ("npu", 8))
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "PORT", "ASCEND_DEVICE_ID"):
        monkeypatch.delenv(var, raising=False)
    for task, engine, extra in (("dreambooth_flux", "fsdp", "--resolution=256 --train_batch_size=16"),
                                ("dreambooth_lora_flux", "ddp", "--resolution=512 --train_batch_size=1")):
        rc = launch.main([task, "--num_devices=8", "--dry_run=1", "--model_name=/m/flux1-dev",
                          f"--log_dir={tmp_path}"])
        out = capsys.readouterr().out
        assert rc == 0 and "--nproc_per_node 8" in out and f"--distributed={engine}" in out, out
        assert all(flag in out for flag in extra.split()) and "--mixed_precision=bf16" in out
