"""What a newcomer reads (issue #15 items 6-11): messages that name what happened, no alarming library
warnings, one-line errors; and a task added with one file plus its example script (issue #13)."""
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from trainkit import REPO, argv, main_rc, train


@pytest.mark.parametrize("task, flags, said", [
    ("text_to_image", ["--use_lora"], "saved the LoRA weights to "),
    ("textual_inversion", [], "saved the learned embedding to "),
    ("controlnet", [], "saved the trained ControlNet to "),
    ("text_to_image", [], "saved the trained pipeline to "),
])
def test_the_final_log_line_names_what_was_saved(task, flags, said, tmp_path, capsys):
    rc, out, _ = main_rc(task, argv(tmp_path / "o", 1, *flags, batch=2), capsys)
    assert rc == 0 and said + str(tmp_path / "o") in out
    if task != "text_to_image" or flags:
        assert "saved the trained pipeline" not in out


def test_no_float32_cast_warning_and_no_attention_warning_for_an_embedding(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for task in ("text_to_image", "textual_inversion"):
            rc, out, err = main_rc(task, argv(tmp_path / task, 1, "--mixed_precision", "bf16", batch=2), capsys)
            assert rc == 0
            text = out + err + caplog.text + "".join(str(w.message) for w in caught)
            assert "should be kept in float32" not in text
            assert "has no diffusers Attention modules" not in text and "Embedding" not in caplog.text


def test_offline_hub_model_says_to_pass_a_local_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = main_rc("text_to_image", argv(tmp_path / "o", 1, "--pretrained_model_name_or_path",
                                                "runwayml/stable-diffusion-v1-5"), capsys)
    assert rc == 2
    assert err.strip() == (
        "error: --pretrained_model_name_or_path: 'runwayml/stable-diffusion-v1-5' is not a local folder and the "
        "Hugging Face Hub cannot be reached (no network, or HF_HUB_OFFLINE is set); pass a local model folder with "
        "--pretrained_model_name_or_path")
    assert not os.path.exists(tmp_path / "o")


def test_a_task_is_one_new_file_plus_its_example(tmp_path, capsys, monkeypatch):
    """A task module dropped into the tasks package path is found by the CLI, the training entry point and the
    launcher, with nothing else edited."""
    from diffusers_npu.train import registry, tasks

    package = tmp_path / "more_tasks"
    package.mkdir()
    (package / "empty_prompt_demo.py").write_text(textwrap.dedent('''
        from diffusers_npu.train.registry import LaunchProfile, register_task
        from diffusers_npu.train.tasks.text_to_image import TextToImageTask


        @register_task
        class EmptyPromptDemoTask(TextToImageTask):
            """Every caption replaced by the empty prompt: the UNet learns the unconditional distribution."""

            name = "empty_prompt_demo"
            description = "Demo: text-to-image training with every caption empty."
            example = "examples/empty_prompt_demo.py"
            launch = LaunchProfile(network="Demo_empty_prompt", embedded={"train_batch_size": 2})

            def tokenize(self, caption):
                return super().tokenize("")

            def tokenizer_fn(self):
                return self.tokenize
    '''))
    example = tmp_path / "empty_prompt_demo.py"
    example.write_text("import sys\nfrom diffusers_npu.train import main\nsys.exit(main('empty_prompt_demo'))\n")
    monkeypatch.setattr(tasks, "__path__", list(tasks.__path__) + [str(package)])
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    assert "empty_prompt_demo" in registry.task_names()
    from diffusers_npu.cli import main as cli

    assert cli(["train", "empty-prompt-demo", *argv(tmp_path / "o", 1, batch=2)]) == 0
    assert os.path.isfile(tmp_path / "o" / "model_index.json")
    from diffusers_npu.launch import main as launch

    assert launch(["empty_prompt_demo", "--dry_run", f"--log_dir={tmp_path}"]) == 0
    assert "Network=Demo_empty_prompt" in capsys.readouterr().out
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package.parent), os.path.join(REPO, "src")]))
    code = (f"import diffusers_npu.train.tasks as t; t.__path__.append({str(package)!r}); "
            f"import runpy, sys; sys.argv = [{str(example)!r}, '--help']; runpy.run_path({str(example)!r}, "
            f"run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "Demo: text-to-image training with every caption empty." in r.stdout, r.stderr
