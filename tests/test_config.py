"""Configuration: --config files validated like the command line, one resolver for device defaults, and the
one-line errors a user sees (issue #13 item 2, #15 items 8-9, #14's argparse abbreviations)."""
import argparse
import os

import pytest

from trainkit import argv, main_rc

T2I = "text_to_image"


def _config(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, name, message", [
    ("train_batch_sise: 2\n", "c.yaml", "unknown key 'train_batch_sise' (did you mean 'train_batch_size'?)"),
    ("mixed_precision: fp61\n", "c.yaml", "key 'mixed_precision': invalid choice: 'fp61'"),
    ("mixed_precision: fp8\n", "c.yaml", "key 'mixed_precision': invalid choice: 'fp8'"),
    ("use_ema: \"false\"\n", "c.yaml", "key 'use_ema': expected true or false, got str 'false' (write false without"),
    ("train_batch_size: two\n", "c.yaml", "key 'train_batch_size': expected an integer >= 1, got 'two'"),
    ("learning_rate: .nan\n", "c.yaml", "key 'learning_rate': expected a finite number"),
    ("resolution: 20\n", "c.yaml", "key 'resolution': expected a positive multiple of 8, got '20'"),
    ("[unclosed\n", "c.yaml", "is not valid YAML at line"),
    ("{\"max_train_steps\": 2,}", "c.json", "is not valid JSON at line 1"),
    ("- just\n- a list\n", "c.yaml", "must hold a mapping of flag names to values, not a list"),
])
def test_bad_config_files_give_one_line_naming_key_and_file(tmp_path, capsys, text, name, message):
    cfg = _config(tmp_path, text, name)
    out = tmp_path / "out"
    rc, stdout, err = main_rc(T2I, ["--config", cfg, "--output_dir", out], capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0] and str(cfg) in lines[0] or "YAML" in message, err
    assert message in lines[0], lines[0]
    assert not os.path.exists(out)  # nothing written
    assert "usage:" not in stdout + err


def test_config_values_are_typed_and_the_command_line_wins(tmp_path):
    from diffusers_npu.train.config import parse_args
    from diffusers_npu.train.registry import get_task

    cfg = _config(tmp_path, "train_batch_size: 2\nlearning_rate: 1e-3\nuse_ema: true\nvalidation_prompts: one\n"
                            "channels_last: false\n")
    args = parse_args(get_task(T2I), ["--config", str(cfg), "--learning_rate", "5e-4"])
    assert args.train_batch_size == 2 and args.use_ema is True and args.channels_last is False
    assert args.learning_rate == 5e-4  # "1e-3" is a string for YAML 1.1; it is read as the number it means
    assert args.validation_prompts == ["one"]
    args = parse_args(get_task(T2I), ["--config", str(cfg)])
    assert args.learning_rate == 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--learning_rat", "1e-4"], "unrecognized arguments: --learning_rat 1e-4 (did you mean --learning_rate?)"),
    (["--resolution", "0"], "expected an integer >= 1, got '0'"),
    (["--resolution", "-16"], "expected an integer >= 1, got '-16'"),
    (["--learning_rate", "nan"], "expected a finite number, got 'nan'"),
    (["--max_train_samples", "0"], "argument --max_train_samples: expected an integer >= 1, got '0'"),
    (["--lr_scheduler", "cosine_wobble"], "--lr_scheduler cosine_wobble"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    rc, _, err = main_rc(T2I, argv(out, 1, *flags), capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)


def _resolve(kind, *flags, bf16=True, fusion=True, world=1, task=T2I):
    from diffusers_npu.train.config import DeviceInfo, parse_args, resolve_defaults
    from diffusers_npu.train.registry import get_task

    cls = get_task(task)
    args = parse_args(cls, ["--pretrained_model_name_or_path", "/m", "--dataset_name", "/d", *flags])
    return resolve_defaults(args, DeviceInfo(kind, bf16, fusion, world), None, cls)


def test_device_defaults_come_from_one_pure_function():
    npu = _resolve("npu")
    assert (npu.channels_last, npu.optimizer, npu.mixed_precision, npu.attention, npu.log_every) == \
        (False, "fused_adamw", "bf16", "auto", 10)  # no channels_last on NPU: torch_npu refuses it
    assert _resolve("npu", bf16=False).mixed_precision == "no"
    cuda = _resolve("cuda")
    assert (cuda.channels_last, cuda.optimizer, cuda.mixed_precision) == (True, "fused_adamw", "bf16")
    cpu = _resolve("cpu")
    assert (cpu.channels_last, cpu.optimizer, cpu.mixed_precision, cpu.log_every) == (False, "adamw", "no", 1)
    assert _resolve("cpu", world=2).distributed == "ddp" and cpu.distributed == "none"
    from diffusers_npu.errors import UsageError

    with pytest.raises(UsageError, match="--channels_last is not supported on NPU"):
        _resolve("npu", "--channels_last")
    with pytest.raises(UsageError, match="bf16 is not supported"):
        _resolve("npu", "--mixed_precision", "bf16", bf16=False)
    with pytest.raises(UsageError, match="--use_clip_grad_norm_fused needs the fused optimizer"):
        _resolve("cpu", "--use_clip_grad_norm_fused")
    assert _resolve("cpu", "--use_npu_fuse_adamW", "--use_clip_grad_norm_fused", "--max_grad_norm", "0").max_grad_norm \
        == 1.0


def test_resolve_defaults_does_not_touch_its_input():
    from diffusers_npu.train.config import DeviceInfo, parse_args, resolve_defaults
    from diffusers_npu.train.registry import get_task

    cls = get_task(T2I)
    args = parse_args(cls, ["--pretrained_model_name_or_path", "/m", "--dataset_name", "/d"])
    before = vars(args).copy()
    resolve_defaults(args, DeviceInfo("cuda"), None, cls)
    assert vars(args) == before


def test_task_names_accept_both_spellings_and_suggest_near_misses():
    from diffusers_npu.errors import UsageError
    from diffusers_npu.train.registry import get_task

    assert get_task("text-to-image") is get_task("text_to_image")
    with pytest.raises(UsageError, match="did you mean 'textual_inversion'"):
        get_task("textual_inversio")


def test_cli_train_usage_line_names_the_subcommand(capsys):
    from diffusers_npu.cli import main

    assert main(["train", "text-to-image", "--no_such_flag"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: unrecognized arguments: --no_such_flag (see diffusers-npu train text_to_image --help)"]


def test_store_true_flags_in_config_must_be_booleans(tmp_path):
    from diffusers_npu.errors import UsageError
    from diffusers_npu.train.config import config_values
    from diffusers_npu.train.config import build_parser
    from diffusers_npu.train.registry import get_task

    p = build_parser(get_task(T2I))
    assert config_values(p, _config(tmp_path, "use_ema: false\n"))["use_ema"] is False
    with pytest.raises(UsageError, match="expected true or false, got int 1"):
        config_values(p, _config(tmp_path, "use_ema: 1\n"))
    assert isinstance(p, argparse.ArgumentParser)
