"""Data at scale: peak memory and latent-cache build time against the number of rows and processes.

    python bench/data_scale.py                               # 2,000 and 10,000 rows, 1 and 2 processes (CPU)
    python bench/data_scale.py --rows 500,1000 --procs 1     # a quick look

The set-up is the one issue #24 measured: 64 px images with distinct captions, a tiny Stable Diffusion built
from configs whose text encoder is CLIP-L wide (hidden 768, 77 tokens, so each caption's encoder output is
77 x 768 floats, 236 KB), written to a parquet file. For each row count:

* ``build``: the cache is built from scratch by ``--procs`` processes (torchrun, gloo): the time of the cache
  step alone (the ranks enter and leave it together) and every rank's peak RSS, with the rows each rank encoded;
* ``train``: one process trains ``--steps`` steps from that already built cache (the real trainer,
  ``python -m diffusers_npu.train text_to_image --cache_latents``); its peak RSS, read with ``wait4``.

Timings on a machine shared with other jobs are noisy: compare the ratios of one run. The table is printed and,
with ``--json``, written with the environment.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from .upstream import free_port

MIB = 1024 * 1024


def write_model(folder: str) -> str:
    """A tiny SD pipeline from configs with a CLIP-L-wide text encoder (768 wide, 77 tokens, 1 layer)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .. import presets

    p = presets.get_preset("tiny")
    torch.manual_seed(0)
    tok = presets.build_tokenizer(os.path.join(folder + "-tok"), presets.EMBEDDED_WORDS, 77)
    v = len(tok)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=v, max_position_embeddings=77, bos_token_id=v - 2,
                                      eos_token_id=v - 1, pad_token_id=v - 1, hidden_size=768,
                                      intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12))
    comps = dict(unet=UNet2DConditionModel(**{**p.unet, "cross_attention_dim": 768}),
                 vae=AutoencoderKL(**p.vae, scaling_factor=p.vae_scaling_factor), text_encoder=te, tokenizer=tok,
                 noise_scheduler=DDPMScheduler(**presets.SD_SCHEDULER, prediction_type=p.prediction_type))
    presets.save_pipeline_folder(comps, folder)
    shutil.rmtree(folder + "-tok", ignore_errors=True)
    return folder


def caption(i: int) -> str:
    from ..presets import DIGIT_WORDS

    return "a photo of " + " ".join(DIGIT_WORDS[int(d)] for d in str(i))  # distinct for every i


def write_rows(path: str, n: int, size: int = 64) -> str:
    """``n`` rows of ``size`` px PNG gradients (each different) with distinct captions, as one parquet file."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    writer = None
    for start in range(0, n, 1000):
        rows = []
        for i in range(start, min(n, start + 1000)):
            img = np.stack([(xx * (1 + i % 7)) % 256, (yy * (1 + i % 11)) % 256,
                            np.full_like(xx, i % 256)], -1).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "PNG")
            rows.append({"image": {"bytes": buf.getvalue(), "path": None}, "text": caption(i)})
        table = pa.Table.from_pylist(rows)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return path


def train_argv(model, data, cache, out, steps, batch) -> list:
    return ["--pretrained_model_name_or_path", model, "--dataset_name", data, "--resolution", "64",
            "--cache_latents", "--cache_dir", cache, "--output_dir", out, "--max_train_steps", str(steps),
            "--train_batch_size", str(batch), "--checkpointing_steps", "100000", "--report_to", "none",
            "--disable_progress_bar", "--lr_warmup_steps", "0", "--no-use_ema"]


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return env


def run_measured(cmd: list, log: str) -> tuple:
    """(seconds, peak RSS in MiB of the largest process of the tree, return code)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, p.returncode


# ------------------------------------------------------------------------------- the build worker (per rank)
def build_worker(argv: list, out_json: str) -> None:
    """One rank: set up the trainer's runtime, task and data, then time the cache step alone."""
    from ..train import build, prepare_args, task_class
    from ..train.loop import Trainer

    cls = task_class("text_to_image")
    t = Trainer(prepare_args(cls, argv), cls)
    build.runtime_and_precision(t)
    t.task = cls(t.args, t.rt)
    build.module_and_speed(t)
    ds = t.task.build_dataset()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t.rt.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    cached = build.cached(t, ds)
    cpu = time.process_time() - cpu0  # this rank's own CPU seconds: its share of the work, whatever the load
    t.rt.barrier()
    seconds = time.perf_counter() - t0
    from ..data.cache_build import PLAN_FILE, plan_shards

    with open(os.path.join(cached.cache.folder, PLAN_FILE)) as f:
        k = json.load(f)["rows_per_shard"]
    import numpy as np

    shards = plan_shards(np.zeros(len(ds), np.int64), 1, k)
    mine = sum(len(r) for s, (_, r) in enumerate(shards) if s % t.rt.world_size == t.rt.rank)
    with open(f"{out_json}.rank{t.rt.rank}", "w") as f:
        json.dump({"rank": t.rt.rank, "seconds": seconds, "cpu_seconds": cpu, "rss_before_mib": before, "rows_encoded": mine,
                   "shards": len(shards), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "hit": cached.cache.hit}, f)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def measure_build(model, data, cache, work, rows, procs, port) -> dict:
    port = port or free_port()
    out = os.path.join(work, f"build-{rows}-{procs}.json")
    argv = train_argv(model, data, cache, os.path.join(work, f"out-build-{rows}-{procs}"), 1, 16)
    spec = os.path.join(work, f"build-{rows}-{procs}.argv.json")
    with open(spec, "w") as f:
        json.dump(argv, f)
    worker = ["-m", "diffusers_npu.benchmark.data_scale", "--_build_worker", spec, out]
    cmd = [sys.executable, *worker] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port),
        *worker]
    wall, _, rc = run_measured(cmd, out + ".log")
    if rc:
        raise SystemExit(f"build {rows} rows x {procs} processes failed (rc {rc}); see {out}.log")
    ranks = [json.load(open(f"{out}.rank{r}")) for r in range(procs)]
    return {"rows": rows, "procs": procs, "build_s": round(ranks[0]["seconds"], 2), "wall_s": round(wall, 1),
            "peak_rss_mib": [round(r["peak_rss_mib"]) for r in ranks],
            "rss_before_build_mib": [round(r["rss_before_mib"]) for r in ranks],
            "rows_per_rank": [r["rows_encoded"] for r in ranks],
            "cpu_s_per_rank": [round(r.get("cpu_seconds", 0), 1) for r in ranks], "shards": ranks[0]["shards"],
            "cache_bytes": sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(cache) for f in fs)}


def measure_train(model, data, cache, work, rows, steps, batch) -> dict:
    out = os.path.join(work, f"out-train-{rows}")
    cmd = [sys.executable, "-m", "diffusers_npu.train", "text_to_image",
           *train_argv(model, data, cache, out, steps, batch)]
    wall, rss, rc = run_measured(cmd, out + ".log")
    if rc:
        raise SystemExit(f"training from the {rows}-row cache failed (rc {rc}); see {out}.log")
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    return {"rows": rows, "steps": steps, "batch": batch, "peak_rss_mib": round(rss), "wall_s": round(wall, 1),
            "cache_hit": (summary.get("cache") or {}).get("hit")}


def table(result: dict) -> str:
    lines = ["| rows | processes | cache build (s) | rows encoded per rank | CPU s per rank | build peak RSS per rank "
             "(MiB) | cache on disk (MB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in result["build"]:
        lines.append(f"| {b['rows']:,} | {b['procs']} | {b['build_s']} | {b['rows_per_rank']} | "
                     f"{b.get('cpu_s_per_rank')} | {b['peak_rss_mib']} | {b['cache_bytes'] / 1e6:,.0f} |")
    lines += ["", "| rows | training from the built cache: peak RSS (MiB) | steps x batch | cache hit |",
              "| --- | --- | --- | --- |"]
    for t in result["train"]:
        lines.append(f"| {t['rows']:,} | {t['peak_rss_mib']} | {t['steps']} x {t['batch']} | {t['cache_hit']} |")
    return "\n".join(lines)


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="2000,10000", help="comma-separated row counts (default 2000,10000)")
    p.add_argument("--procs", default="1,2", help="comma-separated process counts for the build (default 1,2)")
    p.add_argument("--steps", type=int, default=40, help="training steps from the built cache (default 40)")
    p.add_argument("--train_batch_size", type=int, default=32, help="batch of those steps (default 32)")
    p.add_argument("--work_dir", default=None, help="where model, data and caches go (default: a temp folder, "
                   "removed at the end); needs about 3 GB per 10,000 rows")
    p.add_argument("--json", default=None, help="also write the result (with the environment) here")
    p.add_argument("--port", type=int, default=0, help="torchrun master port of the multi-process builds (default: "
                   "a free one)")
    p.add_argument("--_build_worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._build_worker:
        with open(a._build_worker[0]) as f:
            build_worker(json.load(f), a._build_worker[1])
        return 0
    from .common import environment

    work = a.work_dir or tempfile.mkdtemp(prefix="dnpu-datascale-")
    os.makedirs(work, exist_ok=True)
    result = {"environment": environment("cpu"), "build": [], "train": []}
    try:
        model = write_model(os.path.join(work, "model"))
        for rows in [int(r) for r in a.rows.split(",")]:
            data = write_rows(os.path.join(work, f"rows-{rows}.parquet"), rows)
            cache = None
            for procs in [int(x) for x in a.procs.split(",")]:
                cache = os.path.join(work, f"cache-{rows}-{procs}")
                result["build"].append(measure_build(model, data, cache, work, rows, procs, a.port))
                print(json.dumps(result["build"][-1]), flush=True)
            result["train"].append(measure_train(model, data, cache, work, rows, a.steps, a.train_batch_size))
            print(json.dumps(result["train"][-1]), flush=True)
            for procs in [int(x) for x in a.procs.split(",")][:-1]:  # keep the disk use to one cache per size
                shutil.rmtree(os.path.join(work, f"cache-{rows}-{procs}"), ignore_errors=True)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    if a.json:
        from ..fsutil import write_json_atomic

        write_json_atomic(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
