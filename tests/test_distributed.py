"""Two real processes on CPU (torchrun, gloo, ACCELERATE_USE_CPU=true) through accelerate's engines:
the matrix {ddp, fsdp, DeepSpeed ZeRO-2, ZeRO-3} x accumulation {1, 2} equals one process with the same global
batch and really trains, with the engine asked for being the one that ran; every task runs under ddp and fsdp;
a pre-empted 2-process run resumes bit-identically; a NaN on one rank is skipped by every rank alike.
One torchrun launch runs many jobs (tests/dist_worker.py)."""
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
    results, engines = {}, {}
    for name, rank, rc, checksum, engine, module in re.findall(
            r"^RESULT (\S+) rank (\d) rc (\d+) checksum (\S+) engine (\S+) module (\S+) timeout \S+$", r.stdout, re.M):
        results.setdefault(name, {})[int(rank)] = (int(rc), float(checksum))
        engines.setdefault(name, set()).add((engine, module))
    assert set(results) == {j["name"] for j in jobs}, r.stdout[-3000:]
    _torchrun.engines = engines
    return results, r.stdout


# Same global batch (2 x 2 = 4), per-sample noise: the same maths up to float summation order. A huge AdamW
# epsilon makes the update proportional to the gradient (lr * (1 - b1) * g / eps) rather than its sign, so
# comparing weights compares gradients.
COMPARE = ["--per_sample_noise", "--learning_rate", "1.0", "--adam_epsilon", "1e3", "--adam_weight_decay", "0"]
RESUMABLE = ["--per_sample_noise", "--use_ema", "--ema_decay", "0.9", "--lr_scheduler", "cosine",
             "--resume_from_checkpoint", "latest"]


def _assert_ranks_agree(results, sharded=()):
    """Per rank, the float64 sum of what the rank itself holds (no collective): replicas (DDP, ZeRO-2) must be
    equal; under FSDP / ZeRO-3 each rank holds a different shard, checked against the saved model instead."""
    for name, ranks in results.items():
        (rc0, c0), (rc1, c1) = ranks[0], ranks[1]
        assert rc0 == rc1 == 0, (name, ranks)
        if name not in sharded:
            assert c0 == c1, f"{name}: ranks hold different weights ({c0} vs {c1})"


def _saved_sum(out) -> float:
    return float(sum(v.double().sum() for v in weights(out).values()))


def _update(out, base):
    a, b = weights(out), weights(base)
    return torch.cat([(a[k] - b[k]).flatten() for k in b])


def assert_same_update(multi, one, base, sub="unet", tol=1e-3):
    """The saved model of a multi-process run moved from ``base`` by the same update as the one-process run
    (within ``tol`` of the largest update), and it moved at all."""
    b, m, o = weights(base, sub), weights(multi, sub), weights(one, sub)
    d_one = torch.cat([(o[k].double() - b[k].double()).flatten() for k in b])
    d_multi = torch.cat([(m[k].double() - b[k].double()).flatten() for k in b])
    assert d_one.abs().max() > 0 and d_multi.abs().max() > 0, "nothing trained"
    err = float((d_multi - d_one).abs().max() / d_one.abs().max())
    assert err <= tol, f"{multi}: the update differs from one process by {err:.2e} of the largest update"


MATRIX = {"ddp": ["--distributed", "ddp"], "fsdp": ["--distributed", "fsdp"],
          "zero2": ["--distributed", "deepspeed", "--zero_stage", "2"],
          "zero3": ["--distributed", "deepspeed", "--zero_stage", "3"]}
#: the class of the prepared module per engine (FSDP2 generates "FSDP<module class>")
MODULE = {"ddp": "DistributedDataParallel", "fsdp": "FSDP", "zero2": "DeepSpeedEngine", "zero3": "DeepSpeedEngine"}


def _ran(engines, name, engine):
    """The job trained under ``engine``: Engine.running() read from the module, and the module's class."""
    (running, module), = engines[name]
    return running == engine and module.startswith(MODULE[engine])


@pytest.mark.slow
def test_engine_matrix_matches_one_process(tmp_path, embedded_paths):
    """{ddp, fsdp, ZeRO-2, ZeRO-3} x accumulation {1, 2} on 2 processes, global batch 4 (2 x 2 x 1 or 2 x 1 x 2),
    one optimizer step: the saved update equals one process with batch 4 within 0.1% of the largest update,
    the model changed, the engine that trained is the one asked for (DeepSpeed's engine, not DDP), and what
    each rank holds adds up to the saved model. Plus: a NaN loss on rank 1 only under --max_bad_steps is
    skipped by both ranks (the launch would hang, and time out, if they disagreed)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by .ci/run (the deepspeed extra)")
    jobs = []
    for engine, flags in MATRIX.items():
        for accum in (1, 2):
            jobs.append(_job(f"{engine}-a{accum}", "text_to_image", tmp_path / f"{engine}-a{accum}", 1, *COMPARE,
                             *flags, "--gradient_accumulation_steps", accum, batch=2 // accum))
    jobs.append(_job("nan", "text_to_image", tmp_path / "nan", 2, "--max_bad_steps", 1, "--distributed", "ddp",
                     nan_at=1, nan_rank=1))
    results, _ = _torchrun(tmp_path, jobs, 29614)
    engines = _torchrun.engines
    _assert_ranks_agree(results, sharded={n for n in results if n.startswith(("fsdp", "zero3"))})
    one = tmp_path / "one"
    train("text_to_image", one, *COMPARE, steps=1, batch=4)
    d1 = _update(one, embedded_paths["model"])
    assert d1.abs().max() > 0
    for job in jobs[:-1]:
        name, engine = job["name"], job["name"].split("-")[0]
        out = tmp_path / name
        assert _ran(engines, name, engine), (name, engines[name])
        summary = json.load(open(out / "train_summary.json"))
        assert (summary["world_size"], summary["global_batch"], summary["engine"], summary["steps"]) == \
            (2, 4, engine, 1), name
        d2 = _update(out, embedded_paths["model"])
        assert d2.abs().max() > 0, f"{name}: the saved model is the base model (nothing trained)"
        err = float((d2 - d1).abs().max() / d1.abs().max())
        assert err <= 1e-3, f"{name}: update differs from one process by {err:.2e} of the largest update"
        # what the ranks hold (whole replicas, or shards that add up) is what was saved
        (_, c0), (_, c1) = results[name][0], results[name][1]
        held = c0 if engine in ("ddp", "zero2") else c0 + c1
        assert held == pytest.approx(_saved_sum(out), rel=1e-9, abs=1e-6), name
    nan = json.load(open(tmp_path / "nan" / "train_summary.json"))
    assert (nan["steps"], nan["bad_steps_skipped"]) == (2, 1)  # both ranks skipped step 1, applied step 2


@pytest.mark.slow
@pytest.mark.parametrize("engine, port", [("ddp", 29611), ("fsdp", 29612)])
def test_every_task_two_processes_and_resume_exactly(tmp_path, embedded_paths, engine, port):
    dist = ["--distributed", engine]
    jobs = [_job("straight", "text_to_image", tmp_path / "straight", 4, *RESUMABLE, *dist),
            _job("preempted", "text_to_image", tmp_path / "split", 4, *RESUMABLE, *dist, sigterm_at=2),
            _job("resumed", "text_to_image", tmp_path / "split", 4, *RESUMABLE, *dist),
            _job("dreambooth", "dreambooth", tmp_path / "db", 2, *dist, batch=1),
            _job("textual_inversion", "textual_inversion", tmp_path / "ti", 2, *dist),
            _job("controlnet", "controlnet", tmp_path / "cn", 2, *dist),
            _job("lora", "text_to_image", tmp_path / "lora", 2, "--use_lora", *dist)]
    results, stdout = _torchrun(tmp_path, jobs, port)
    # under FSDP every job's module is sharded (LoRA's too: the frozen base weights are in the module)
    _assert_ranks_agree({k: v for k, v in results.items() if k != "preempted"},
                        sharded=set(results) if engine == "fsdp" else ())
    assert all(_ran(_torchrun.engines, name, engine) for name in results), _torchrun.engines
    assert stdout.count("step 2/2 step_loss=") == 4  # only the main process logs
    summary = json.load(open(tmp_path / "straight" / "train_summary.json"))
    assert (summary["world_size"], summary["global_batch"], summary["distributed"]) == (2, 4, engine)
    # the pre-empted run saved at its flush and stopped; the rerun resumed to the same bits
    split = json.load(open(tmp_path / "split" / "train_summary.json"))
    assert [p["exit_reason"] for p in split["parts"]] == ["preempted", "completed"]
    assert split["parts"][0]["last_step"] == 2
    assert same_weights(weights(tmp_path / "split"), weights(tmp_path / "straight"))
    base = weights(embedded_paths["model"])
    assert not same_weights(weights(tmp_path / "straight"), base)
    ck = tmp_path / "split" / "checkpoint-2"  # written by both ranks at the pre-emption
    assert os.path.isdir(ck / "optimizer")  # optimizer state through torch.distributed.checkpoint
    if engine == "fsdp":
        index = ck / "unet" / "diffusion_pytorch_model.safetensors.index.json"
        owners = set(json.load(open(index))["weight_map"].values())
        assert len(owners) == 2  # each rank wrote the tensors it owns; nothing was gathered on one rank
        from diffusers import UNet2DConditionModel

        loaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "split"), subfolder="checkpoint-2/unet")
        assert sum(p.numel() for p in loaded.parameters()) == sum(v.numel() for v in base.values())
    else:
        assert sorted(os.listdir(ck)) == sorted(["COMPLETE", "lr_scheduler.pt", "manifest.json", "optimizer", "precision.pt",
                                                 "rng_0.pt", "rng_1.pt", "train_state.json", "unet", "unet_ema"])
    # every task trained: its saved output differs from where it started
    from safetensors.torch import load_file

    lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    assert not same_weights(weights(tmp_path / "db"), base)


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
    with pytest.raises(UsageError, match=r"--distributed deepspeed needs DeepSpeed.*pip install --no-build-isolation -e '\.\[deepspeed\]' in the checkout"):
        engine._deepspeed_plugin(args)


def test_deepspeed_config_for_zero2_and_zero3():
    from diffusers_npu.train.engine import deepspeed_config

    z2 = deepspeed_config(2, "fp16", 24, 2, 1.0)
    z3 = deepspeed_config(3, "bf16", 24)
    assert z2["zero_optimization"]["stage"] == 2 and z2["fp16"]["enabled"] and not z2["bf16"]["enabled"]
    assert (z2["train_micro_batch_size_per_gpu"], z2["gradient_accumulation_steps"], z2["gradient_clipping"]) == \
        (24, 2, 1.0)
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False and z3["bf16"]["enabled"]
