"""Two real processes on CPU (torchrun, gloo, ACCELERATE_USE_CPU=true) through accelerate's engines:
``ddp`` for every task and ``fsdp`` for text-to-image; both ranks end with identical full weights, a 2-process
run equals a 1-process run with the same global batch, and a pre-empted 2-process run resumes bit-identically.
DeepSpeed runs where it is installed. One torchrun per engine runs all its jobs (tests/dist_worker.py)."""
import json
import os
import re
import shutil
import sys

import pytest
import torch

from trainkit import QUIET, REPO, run_subprocess, same_weights, train, weights

WORKER = os.path.join(REPO, "tests", "dist_worker.py")


def _job(name, task, out, steps=3, *extra, batch=2, ckpt=1000, **kw):
    args = ["--output_dir", str(out), "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            "--checkpointing_steps", str(ckpt), *QUIET, *map(str, extra)]
    return {"name": name, "task": task, "args": args, **kw}


def _torchrun(tmp_path, jobs, port):
    spec = tmp_path / f"jobs-{port}.json"
    spec.write_text(json.dumps(jobs))
    r = run_subprocess(["python", "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        WORKER, str(spec)], timeout=1500, ACCELERATE_USE_CPU="true")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    results = {}
    for name, rank, rc, checksum in re.findall(r"^RESULT (\S+) rank (\d) rc (\d+) checksum (\S+) timeout", r.stdout, re.M):
        results.setdefault(name, {})[int(rank)] = (int(rc), float(checksum))
    assert set(results) == {j["name"] for j in jobs}, r.stdout[-3000:]
    return results, r.stdout


# Same global batch (2 x 2 = 4), per-sample noise: the same maths up to float summation order. A huge AdamW
# epsilon makes the update proportional to the gradient (lr * (1 - b1) * g / eps) rather than its sign, so
# comparing weights compares gradients.
COMPARE = ["--per_sample_noise", "--learning_rate", "1.0", "--adam_epsilon", "1e3", "--adam_weight_decay", "0"]
RESUMABLE = ["--per_sample_noise", "--use_ema", "--ema_decay", "0.9", "--lr_scheduler", "cosine",
             "--resume_from_checkpoint", "latest"]


def _assert_ranks_agree(results):
    for name, ranks in results.items():
        (rc0, c0), (rc1, c1) = ranks[0], ranks[1]
        assert rc0 == rc1 == 0, (name, ranks)
        assert c0 == c1, f"{name}: ranks hold different weights ({c0} vs {c1})"


def _update(out, base):
    a, b = weights(out), weights(base)
    return torch.cat([(a[k] - b[k]).flatten() for k in b])


@pytest.mark.slow
@pytest.mark.parametrize("engine, port", [("ddp", 29611), ("fsdp", 29612)])
def test_two_processes_match_one_and_resume_exactly(tmp_path, embedded_paths, engine, port):
    dist = ["--distributed", engine]
    jobs = [_job("compare", "text_to_image", tmp_path / "two", 2, *COMPARE, *dist),
            _job("straight", "text_to_image", tmp_path / "straight", 4, *RESUMABLE, *dist),
            _job("preempted", "text_to_image", tmp_path / "split", 4, *RESUMABLE, *dist, sigterm_at=2),
            _job("resumed", "text_to_image", tmp_path / "split", 4, *RESUMABLE, *dist)]
    if engine == "ddp":  # every task runs two processes under DDP
        jobs += [_job("dreambooth", "dreambooth", tmp_path / "db", 2, *dist, batch=1),
                 _job("textual_inversion", "textual_inversion", tmp_path / "ti", 2, *dist),
                 _job("controlnet", "controlnet", tmp_path / "cn", 2, *dist),
                 _job("lora", "text_to_image", tmp_path / "lora", 2, "--use_lora", *dist)]
    results, stdout = _torchrun(tmp_path, jobs, port)
    _assert_ranks_agree(results)
    summary = json.load(open(tmp_path / "two" / "train_summary.json"))
    assert (summary["world_size"], summary["global_batch"], summary["distributed"]) == (2, 4, engine)
    two_step_jobs = sum(1 for j in jobs if j["args"][j["args"].index("--max_train_steps") + 1] == "2")
    assert stdout.count("step 2/2 step_loss=") == two_step_jobs  # only the main process logs
    # the pre-empted run saved at its flush and stopped; the rerun resumed to the same bits
    split = json.load(open(tmp_path / "split" / "train_summary.json"))
    assert [p["exit_reason"] for p in split["parts"]] == ["preempted", "completed"]
    assert split["parts"][0]["last_step"] == 2
    assert same_weights(weights(tmp_path / "split"), weights(tmp_path / "straight"))
    # against one process with the same global batch
    one = tmp_path / "one"
    train("text_to_image", one, *COMPARE, steps=2, batch=4)
    d2, d1 = _update(tmp_path / "two", embedded_paths["model"]), _update(one, embedded_paths["model"])
    assert d1.abs().max() > 0
    assert (d2 - d1).abs().max() <= 1e-3 * d1.abs().max()  # stated tolerance: 0.1% of the largest update
    ck = tmp_path / "split" / "checkpoint-2"  # written by both ranks at the pre-emption
    if engine == "fsdp":
        index = ck / "unet" / "diffusion_pytorch_model.safetensors.index.json"
        owners = set(json.load(open(index))["weight_map"].values())
        assert len(owners) == 2  # each rank wrote the tensors it owns; nothing was gathered on one rank
        assert os.path.isdir(ck / "optimizer")  # sharded optimizer state (torch.distributed.checkpoint)
        from diffusers import UNet2DConditionModel

        loaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "split"), subfolder="checkpoint-2/unet")
        assert sum(p.numel() for p in loaded.parameters()) == sum(v.numel() for v in weights(tmp_path / "two").values())
    else:
        assert sorted(os.listdir(ck)) == sorted(["COMPLETE", "lr_scheduler.pt", "optimizer.pt", "precision.pt",
                                                 "rng_0.pt", "rng_1.pt", "train_state.json", "unet", "unet_ema"])


def test_deepspeed_runs_where_installed(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install diffusers-npu[deepspeed]); "
                                            "not installed here")
    if not torch.cuda.is_available():
        pytest.skip("DeepSpeed's ZeRO needs an accelerator backend (nccl/hccl); this machine has none")
    results, _ = _torchrun(tmp_path, [_job("zero2", "text_to_image", tmp_path / "z2", 2, "--distributed",
                                           "deepspeed", "--zero_stage", "2")], 29613)
    _assert_ranks_agree(results)


def test_deepspeed_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from diffusers_npu.errors import UsageError
    from diffusers_npu.train import engine

    real = builtins.__import__

    def no_deepspeed(name, *a, **k):
        if name == "deepspeed":
            raise ImportError("No module named 'deepspeed'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    args = type("A", (), {"zero_stage": 3, "mixed_precision": "bf16", "train_batch_size": 2,
                          "gradient_accumulation_steps": 1, "max_grad_norm": 1.0})()
    with pytest.raises(UsageError, match=r"--distributed deepspeed needs DeepSpeed.*pip install 'diffusers-npu\[deepspeed\]'"):
        engine._deepspeed_plugin(args)


def test_deepspeed_config_for_zero2_and_zero3():
    from diffusers_npu.train.engine import deepspeed_config

    z2 = deepspeed_config(2, "fp16", 24, 2, 1.0)
    z3 = deepspeed_config(3, "bf16", 24)
    assert z2["zero_optimization"]["stage"] == 2 and z2["fp16"]["enabled"] and not z2["bf16"]["enabled"]
    assert (z2["train_micro_batch_size_per_gpu"], z2["gradient_accumulation_steps"], z2["gradient_clipping"]) == \
        (24, 2, 1.0)
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False and z3["bf16"]["enabled"]
