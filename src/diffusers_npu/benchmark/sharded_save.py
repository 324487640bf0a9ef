"""Memory of a sharded save (issue #19): what each rank's resident memory grows by while the real trainer writes
a checkpoint and the final output under FSDP, against what the rank owns.

    python bench/sharded_save.py                    # 2 processes, FSDP, a ~100 M-parameter UNet (CPU, gloo)
    python bench/sharded_save.py --nproc 1 --width 64

A model folder is written from configs (a UNet of ``--width`` x (1, 2, 4, 4) channels, the tiny preset's VAE and
text encoder), then ``python -m diffusers_npu.train text_to_image`` runs under torchrun with ``--distributed
fsdp`` for 2 steps with a checkpoint at step 2 -- the code path of a user's run. Inside each rank a sampler
thread reads the process's resident set (``/proc/self/statm``, after glibc's ``malloc_trim`` has returned freed
heap pages) every millisecond while
``Checkpointer.save`` (UNet shards, DCP optimizer shards, RNG, manifest) and ``Trainer.save_final`` (the
sharded final pipeline) run. Printed per rank and phase: RSS before, the peak during, the growth, and the
bound ``shard + largest tensor`` (this rank's share of the trained parameters and of the AdamW state, plus the
largest whole parameter, the most a one-tensor-at-a-time gather adds).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

MIB = 1024 * 1024


def write_model(folder: str, width: int) -> str:
    from diffusers import UNet2DConditionModel

    from .. import presets

    comps = presets.build_components("tiny")  # seeded: VAE, text encoder, tokenizer, scheduler
    unet = dict(presets.get_preset("tiny").unet, block_out_channels=(width, 2 * width, 4 * width, 4 * width),
                layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
    comps["unet"] = UNet2DConditionModel(**unet)
    presets.save_pipeline_folder(comps, folder)
    return folder


class RssSampler:
    """The peak resident set of this process while the ``with`` block runs (a thread polls /proc/self/statm)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.before = self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            now = self.rss()
            if now > self.peak:
                self.peak, self.where = now, self._where()
            time.sleep(0.001)

    def _where(self) -> str:
        """The innermost frames of the measured thread in this project's code: where the peak was reached."""
        import traceback

        frame = sys._current_frames().get(self._owner)
        if frame is None:
            return ""
        ours = [f for f in traceback.extract_stack(frame) if "diffusers_npu" in f.filename]
        return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(ours[-3:]))

    def __enter__(self):
        import gc

        gc.collect()
        try:  # hand freed heap pages back first, so that the growth counts what the save allocates
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the growth is then a lower bound
            pass
        self.before = self.peak = self.rss()
        self.where, self._owner = "", threading.get_ident()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def owned_bytes(trainer) -> dict:
    """This rank's share of the trained parameters and of the optimizer state, and the largest whole parameter."""
    shard = largest = state = 0
    for p in trainer.params:
        local = p.to_local() if hasattr(p, "to_local") else p
        shard += local.numel() * local.element_size()
        largest = max(largest, p.numel() * p.element_size())
    for s in trainer.optimizer.state.values():
        for v in s.values():
            if hasattr(v, "numel") and v.numel() > 1:
                local = v.to_local() if hasattr(v, "to_local") else v
                state += local.numel() * local.element_size()
    return {"param_shard": shard, "optimizer_shard": state, "largest_tensor": largest}


def worker(argv_file: str, out_json: str) -> int:
    """One rank: the real trainer with the two saves measured."""
    from ..train import main as train_main, task_class
    from ..train.checkpointing import Checkpointer
    from ..train.loop import Trainer

    rank = int(os.environ.get("RANK", "0"))
    rows, owned = [], {}
    real_save, real_final = Checkpointer.save, Trainer.save_final

    def measured(phase, real):
        def wrapper(self, *a, **k):
            trainer = getattr(self, "t", self)
            owned.update(owned_bytes(trainer))
            with RssSampler() as s:
                result = real(self, *a, **k)
            rows.append({"phase": phase, "rss_before": s.before, "rss_peak": s.peak, "peak_at": s.where})
            return result
        return wrapper

    Checkpointer.save = measured("checkpoint (Checkpointer.save)", real_save)
    Trainer.save_final = measured("final output (Trainer.save_final)", real_final)
    with open(argv_file) as f:
        argv = json.load(f)
    rc = train_main(task_class("text_to_image"), argv)
    with open(f"{out_json}.rank{rank}", "w") as f:
        json.dump({"rank": rank, "rc": rc, "rows": rows, **owned}, f)
    return rc


def run(width: int, nproc: int, work: str, resolution: int) -> list:
    from .data_scale import child_env, write_rows
    from .upstream import free_port

    model = write_model(os.path.join(work, "model"), width)
    data = write_rows(os.path.join(work, "rows.parquet"), 64, size=resolution)
    argv = ["--pretrained_model_name_or_path", model, "--dataset_name", data, "--resolution", str(resolution),
            "--output_dir", os.path.join(work, "out"), "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--train_batch_size", "1", "--distributed", "fsdp", "--report_to", "none", "--disable_progress_bar",
            "--lr_warmup_steps", "0", "--no-use_ema", "--mixed_precision", "no"]
    spec, out = os.path.join(work, "argv.json"), os.path.join(work, "result.json")
    with open(spec, "w") as f:
        json.dump(argv, f)
    worker_cmd = ["-m", "diffusers_npu.benchmark.sharded_save", "--_worker", spec, out]
    cmd = [sys.executable, *worker_cmd] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(free_port()), *worker_cmd]
    # A fixed mmap threshold turns off glibc's dynamic one, under which freed large blocks stay in the heap and
    # keep counting in the RSS: with it, every tensor above 128 KiB is its own mapping, returned when freed, and
    # the growth measures what the save holds at once rather than what the allocator kept.
    env = dict(child_env(), MALLOC_MMAP_THRESHOLD_="131072")
    with open(out + ".log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise SystemExit(f"the measured run failed (rc {rc}); see {out}.log")
    return [json.load(open(f"{out}.rank{r}")) for r in range(nproc)]


def table(ranks: list) -> str:
    """Per rank and phase: the growth against the rank's shard of what the phase writes (a checkpoint: parameters
    and optimizer state; the final output: parameters) plus the largest tensor."""
    lines = ["| rank | phase | RSS before (MiB) | peak (MiB) | growth (MiB) | shard written (MiB) | "
             "largest tensor (MiB) | growth / (shard + largest) | peak reached in |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in ranks:
        for row in r["rows"]:
            growth = row["rss_peak"] - row["rss_before"]
            shard = r["param_shard"] + (r["optimizer_shard"] if row["phase"].startswith("checkpoint") else 0)
            lines.append(f"| {r['rank']} | {row['phase']} | {row['rss_before'] / MIB:,.0f} | {row['rss_peak'] / MIB:,.0f} | "
                         f"{growth / MIB:,.1f} | {shard / MIB:,.1f} | {r['largest_tensor'] / MIB:,.1f} | "
                         f"{growth / (shard + r['largest_tensor']):.3f} | {row.get('peak_at', '')} |")
    return "\n".join(lines)


def cli(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--_worker"]:
        return worker(argv[1], argv[2])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (torchrun, gloo on CPU; default 2)")
    p.add_argument("--width", type=int, default=128,
                   help="UNet base width: channels width x (1, 2, 4, 4), 2 layers per block (default 128: about "
                        "100 M parameters, 0.4 GB in fp32)")
    p.add_argument("--resolution", type=int, default=32, help="image size of the 2 training steps (default 32)")
    p.add_argument("--work_dir", default=None, help="where model, data and outputs go (default: a temp folder, removed)")
    p.add_argument("--json", default=None, help="also write the result (with the environment) here")
    a = p.parse_args(argv)
    work = a.work_dir or tempfile.mkdtemp(prefix="dnpu-shardedsave-")
    try:
        ranks = run(a.width, a.nproc, work, a.resolution)
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(ranks))
    if a.json:
        from .common import environment

        with open(a.json, "w") as f:
            json.dump({"environment": environment("cpu"), "nproc": a.nproc, "width": a.width, "ranks": ranks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
