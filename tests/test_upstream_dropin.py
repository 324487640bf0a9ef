"""Drop-in for the upstream diffusers example scripts (issue #16): every upstream flag is accepted, effective
defaults equal upstream's except the deliberate differences listed in the README, and upstream's own README
command lines run (on the tiny local digits model, a few steps).

The upstream flags, defaults and README commands are checked-in fixtures (tests/data/upstream_flags/), read
from huggingface/diffusers' examples."""
import glob
import json
import os
import shutil

import pytest

from trainkit import REPO, main_rc

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "upstream_flags")
SCRIPT_TASK = {"train_text_to_image": "text_to_image", "train_text_to_image_lora": "text_to_image",
               "train_dreambooth": "dreambooth", "train_dreambooth_lora": "dreambooth",
               "textual_inversion": "textual_inversion", "train_controlnet": "controlnet",
               "train_text_to_image_sdxl": "text_to_image_sdxl", "train_text_to_image_lora_sdxl": "text_to_image_sdxl",
               "train_dreambooth_lora_sdxl": "dreambooth_lora_sdxl", "train_controlnet_sdxl": "controlnet_sdxl",
               "train_dreambooth_sd3": "dreambooth_sd3", "train_dreambooth_lora_sd3": "dreambooth_lora_sd3",
               "train_controlnet_sd3": "controlnet_sd3"}
LORA_SCRIPTS = {"train_text_to_image_lora", "train_dreambooth_lora", "train_text_to_image_lora_sdxl"}

# Deliberate differences from upstream's defaults (the README's table lists each one with its reason).
DELIBERATE = {
    "--seed": "0 instead of random: a rerun and a resume reproduce the run",
    "--instance_prompt": "'a photo of sks digit' for the embedded default instead of required",
    "--placeholder_token": "'<digit-x>' for the embedded default instead of required",
    "--initializer_token": "'digit' for the embedded default instead of required",
    "--mixed_precision": "bf16 on CUDA/NPU (where supported), no on CPU, instead of accelerate's config",
    "--conditioning_image_column": "'conditioning_image' when the column exists, else derived from the image",
    "--pretrained_model_name_or_path": "the embedded offline model instead of required",
    "--resolution": "16 for the embedded model, upstream's value otherwise",
    "--caption_column": "'text' (upstream: the second column when none is given, same on upstream's data sets)",
    "--image_column": "'image' (upstream: the first column when none is given, same on upstream's data sets)",
    "--dataset_name": "the embedded digits data set when no data flag is given",
    "--validation_scheduler": "kept in DreamBooth; validation of the SDXL tasks uses the base model's scheduler",
    "--crops_coords_top_left_h": "each sample's real crop (SDXL time ids) instead of a fixed corner (0, 0)",
    "--crops_coords_top_left_w": "each sample's real crop (SDXL time ids) instead of a fixed corner (0, 0)",
}


def _fixtures():
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(FIXTURES, "*.json")))


def _task(script):
    from diffusers_npu.train.registry import find_task

    cls = find_task(SCRIPT_TASK[script])
    if cls is None:
        pytest.skip(f"task {SCRIPT_TASK[script]} is not registered")
    return cls


@pytest.mark.parametrize("script", _fixtures())
def test_every_upstream_flag_is_accepted(script):
    from diffusers_npu.train.config import build_parser

    flags = json.load(open(os.path.join(FIXTURES, f"{script}.json")))["flags"]
    ours = {o for a in build_parser(_task(script))._actions for o in a.option_strings}
    missing = sorted(f for f in flags if f not in ours)
    assert missing == [], f"{script}: upstream flags this project refuses: {missing}"


@pytest.mark.parametrize("script", _fixtures())
def test_effective_defaults_are_upstreams_except_the_listed_ones(script):
    from diffusers_npu.train.config import DeviceInfo, parse_args, resolve_defaults

    cls = _task(script)
    spec = json.load(open(os.path.join(FIXTURES, f"{script}.json")))["flags"]
    argv = ["--pretrained_model_name_or_path", "/m", "--dataset_name", "/d"]
    if script in LORA_SCRIPTS:
        argv.append("--use_lora")
    args = resolve_defaults(parse_args(cls, argv), DeviceInfo("cpu"), None, cls)
    by_flag = {}
    from diffusers_npu.train.config import build_parser

    for action in build_parser(cls)._actions:
        for o in action.option_strings:
            by_flag[o] = action.dest
    differ = []
    for flag, up in spec.items():
        if up.get("action") in ("store_true", "store_false") or up.get("default_is_expression") or flag not in by_flag:
            continue
        ours = getattr(args, by_flag[flag])
        if isinstance(ours, str) and isinstance(up["default"], str) and ours.lower() == up["default"].lower():
            continue  # upstream's "AdamW" is this project's "adamw"
        if ours != up["default"] and not (isinstance(ours, float) and up["default"] is not None
                                          and abs(ours - float(up["default"])) < 1e-12):
            differ.append(flag)
    undocumented = sorted(f for f in differ if f not in DELIBERATE)
    assert undocumented == [], f"{script}: defaults that silently differ from upstream: " + ", ".join(
        f"{f} (upstream {spec[f]['default']!r}, ours {getattr(args, by_flag[f])!r})" for f in undocumented)


def test_readme_lists_every_deliberate_difference():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text[text.index("Deliberate differences from upstream"):]
    for flag in DELIBERATE:
        assert f"`{flag}`" in section, flag


# ------------------------------------------------------------------------------- upstream README commands
def _readme_commands():
    out = []
    for script in _fixtures():
        for i, cmd in enumerate(json.load(open(os.path.join(FIXTURES, f"{script}.json")))["readme_commands"]):
            out.append(pytest.param(script, cmd, id=f"{script}-{i}"))
    return out


@pytest.fixture(scope="module")
def readme_inputs(tmp_path_factory, embedded_paths):
    """Local stand-ins for the data the README commands name (a Hub data set, an image folder, ...)."""
    from datasets import Dataset, Image as DImage, load_dataset

    root = tmp_path_factory.mktemp("readme-inputs")
    rows = load_dataset(embedded_paths["dataset"], split="train").select(range(8))
    (root / "dataset").mkdir()
    rows.to_parquet(str(root / "dataset" / "train.parquet"))
    for name in ("data", "instance"):
        (root / name).mkdir()
    with open(root / "data" / "metadata.jsonl", "w") as f:
        for i, r in enumerate(rows):
            r["image"].save(root / "data" / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": r["text"]}) + "\n")
    for i, r in enumerate(rows.select(range(5))):
        r["image"].save(root / "instance" / f"{i}.png")
    fill = Dataset.from_dict({"image": [r["image"] for r in rows], "text": [r["text"] for r in rows],
                              "conditioning_image": [r["image"] for r in rows]})
    fill.cast_column("image", DImage()).cast_column("conditioning_image", DImage()).save_to_disk(str(root / "fill50k"))
    rows[0]["image"].save(root / "cond.png")
    return root


OVERRIDES = {  # a tiny model and two steps, no tracker: appended after upstream's flags, so they win
    "common": ["--resolution", "16", "--max_train_steps", "2", "--report_to", "none", "--checkpointing_steps", "1",
               "--validation_inference_steps", "2", "--num_validation_images", "1", "--disable_progress_bar"],
    # the tiny text encoder has 16 positions (the README's 77 is SD's)
    "dreambooth": ["--num_class_images", "2", "--sample_batch_size", "2", "--class_inference_steps", "2",
                   "--tokenizer_max_length", "16"],
    "dreambooth_lora_sdxl": ["--num_class_images", "2", "--sample_batch_size", "2"],
    # the embedded SD3 model's CLIP has 8 positions; its T5 prompts are cut to 8 tokens as well
    "dreambooth_sd3": ["--max_sequence_length", "8"],
    "dreambooth_lora_sd3": ["--max_sequence_length", "8"],
    "controlnet_sd3": ["--max_sequence_length", "8"],
}


@pytest.mark.parametrize("script, cmd", _readme_commands())
def test_upstream_readme_command_runs(script, cmd, readme_inputs, embedded_paths, tmp_path, monkeypatch, capsys):
    cls = _task(script)
    monkeypatch.chdir(tmp_path)  # relative output folders of the README (sd-naruto-model, ...) land here
    shutil.copy(readme_inputs / "cond.png", tmp_path / "conditioning_image_1.png")
    shutil.copy(readme_inputs / "cond.png", tmp_path / "conditioning_image_2.png")
    model = embedded_paths["model"] if not cls.name.endswith(("sdxl", "sd3")) else cls.prepare_embedded()["model"]
    subst = {"{MODEL}": model, "{DATASET}": str(readme_inputs / "dataset"), "{DATA_DIR}": str(readme_inputs / "data"),
             "{INSTANCE_DIR}": str(readme_inputs / "instance"), "{CLASS_DIR}": str(tmp_path / "class"),
             "{OUTPUT_DIR}": str(tmp_path / "out"), "{VALIDATION_IMAGES}": str(readme_inputs / "cond.png"),
             "fusing/fill50k": str(readme_inputs / "fill50k"), "{VAE}": model + "/vae",
             "Norod78/Yarn-art-style": str(readme_inputs / "dataset")}
    argv = []
    for tok in cmd["argv"]:
        for k, v in subst.items():
            tok = tok.replace(k, v)
        if tok.startswith("--pretrained_model_name_or_path="):  # README commands name Hub models
            tok = f"--pretrained_model_name_or_path={model}"
        if tok == "--train_data_dir=fill50k":  # SD3 ControlNet README: a local copy of fill50k
            tok = f"--dataset_name={readme_inputs / 'fill50k'}"
        if tok == "--instance_data_dir=dog":  # a README's literal folder of dog pictures
            tok = f"--instance_data_dir={readme_inputs / 'instance'}"
        # the tiny model's whole-word tokenizer: "toy" is not one token there, "digit" is
        argv.append("--initializer_token=digit" if tok == "--initializer_token=toy" else tok)
    launcher = [t for t in cmd.get("launcher", []) if t.startswith("--mixed_precision")]
    prefix = ["--mixed_precision", launcher[0].split("=", 1)[1]] if launcher else []  # accelerate's flag
    extra = OVERRIDES["common"] + OVERRIDES.get(cls.name, [])
    if script in LORA_SCRIPTS and "--use_lora" not in argv and cls.name in ("text_to_image", "dreambooth",
                                                                            "text_to_image_sdxl"):
        extra = extra + ["--use_lora"]
    rc, _, err = main_rc(cls.name, prefix + argv + extra, capsys)
    import importlib.util

    if "--use_8bit_adam" in argv and importlib.util.find_spec("bitsandbytes") is None:
        assert rc == 2 and "--use_8bit_adam" in err and "bitsandbytes" in err, err
    elif "--validation_images" in argv:
        assert rc == 2 and "DeepFloyd IF" in err, err
    elif "--push_to_hub" in argv:  # trained and kept locally, then one line on what was not pushed
        assert rc == 2 and "--push_to_hub: the Hugging Face Hub cannot be reached" in err, err
        outs = [argv[i + 1] for i, a in enumerate(argv) if a == "--output_dir"] + \
            [a.split("=", 1)[1] for a in argv if a.startswith("--output_dir=")]
        out = outs[-1] if outs else cls.defaults.get("output_dir") or "sd-model-finetuned"
        assert os.path.isfile(os.path.join(out, "training_info.json"))
    else:
        assert rc == 0, err


@pytest.mark.parametrize("script", _fixtures())
def test_every_value_upstream_accepts_is_accepted(script):
    """The fixtures' 'accepts' ranges (what upstream's script runs with, e.g. --num_validation_images 0 in its
    own example tests): the ends of each range parse and resolve here too."""
    from diffusers_npu.train.config import DeviceInfo, parse_args, resolve_defaults

    cls = _task(script)
    spec = json.load(open(os.path.join(FIXTURES, f"{script}.json")))["flags"]
    ranged = {f: s["accepts"] for f, s in spec.items() if "accepts" in s}
    assert ranged, f"{script}: the fixture carries no accepted ranges"
    base = ["--pretrained_model_name_or_path", "/m", "--dataset_name", "/d"]
    for flag, accepts in ranged.items():
        for end in ("min", "max"):
            if end in accepts:
                value = accepts[end]
                args = resolve_defaults(parse_args(cls, base + [f"{flag}={value}"]), DeviceInfo("cpu"), None, cls)
                assert getattr(args, flag.lstrip("-")) == value or flag == "--num_validation_images", (flag, value)
