"""The self-check's multi-process section (``diffusers-npu selfcheck --nproc 2``) on CPU with gloo: every
engine's steps on 2 processes match one process with the same global batch, the comparison would catch a
gradient summed instead of averaged, and the all-reduce bandwidth is measured."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_npu import cli
from diffusers_npu.selfcheck import distributed


@pytest.mark.slow
def test_two_processes_match_one_under_every_engine(tmp_path):
    rows = list(distributed.distributed_checks("cpu", 2, str(tmp_path)))
    engines = {r.check.rsplit(": ", 1)[1]: r for r in rows if r.check.startswith("2 processes")}
    assert set(engines) == {"ddp", "fsdp", "deepspeed"}
    for name in ("ddp", "fsdp"):
        row = engines[name]
        assert row.result == "pass", (name, row.note)
        assert row.max_error <= distributed.TOLERANCE and row.argv[:3] == ["torchrun", "--nproc_per_node", "2"]
    bandwidth = next(r for r in rows if r.check.startswith("all-reduce 2 processes"))
    assert bandwidth.result == "pass" and " GB/s (algorithm " in bandwidth.note and "gloo" in bandwidth.note

    # The comparison catches a gradient summed over the ranks instead of averaged (twice the update).
    root = tmp_path / "dist2"
    base = load_file(str(tmp_path / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors"))
    ref = load_file(str(root / "reference" / "unet" / "diffusion_pytorch_model.safetensors"))
    summed = root / "summed"
    shutil.copytree(root / "reference", summed)
    save_file({k: base[k] + 2 * (ref[k] - base[k]) for k in base},
              str(summed / "unet" / "diffusion_pytorch_model.safetensors"))
    err, largest = distributed.update_error(str(tmp_path / "tiny-sd"), str(root / "reference"), str(summed))
    assert largest > 0 and err == pytest.approx(1.0, rel=1e-6)

    ds = engines["deepspeed"]
    if ds.result == "skip":
        assert ds.note == "DeepSpeed is not installed (pip install --no-build-isolation -e '.[deepspeed]' in the checkout)"
    else:  # DeepSpeed really trains on CPU now (issue #19): its steps match one process
        assert ds.result == "pass", ds.note


def test_nproc_out_of_range_is_one_line(capsys):
    assert cli.main(["selfcheck", "--nproc", "9"]) == 2
    assert capsys.readouterr().err.strip() == "error: --nproc must be between 1 and 8 (got 9)"
