"""Training throughput harness: times the REAL training step, ``Trainer.train_step()``.

Every Trainer mode builds the Trainer from a training script's command line -- the flags
``examples/text_to_image/train_text_to_image.py`` (or the task's own script) takes -- on a pipeline folder of
a preset architecture with random weights and an image folder of random images, and records that command:

``online``      encoders in the step (the script's defaults for the device)
``cached``      ``--cache_latents`` (the cache is built during set-up, reported apart)
``compiled``    ``--cache_latents --compile`` (compilation is in the warm-up, reported apart)
``lora``        ``--use_lora``
``controlnet``  the ControlNet task (conditioning derived from the image)
``flags``       the training flags given with ``--flags "..."`` (one mode per ``--flags``)

Other rows, which are not Trainer-step figures:

``reference``   the upstream example's step, RE-IMPLEMENTED HERE (:mod:`.reference`), one process
``upstream``    the real upstream script the user supplies (``--upstream_script PATH``), timed between its
                progress-bar updates (:mod:`.upstream`)

SDXL presets use the SDXL tasks (``text_to_image_sdxl``, ``controlnet_sdxl``); a task this checkout does not
have is reported as "not run". The diffusion-transformer presets (``sd3-medium``, ``sd35-large``, ``flux1-dev``,
``--dit_depth``; ``sd3-tiny`` and ``flux-tiny`` for CPU) time the SD3 / FLUX DreamBooth tasks -- ``online`` /
``cached`` / ``compiled`` the full fine-tuning script, ``lora`` the LoRA script: :mod:`.dit`. ``--nproc N`` runs
each mode under torchrun with every engine of ``--distributed`` and reports images/s in total and per device,
scaling efficiency against the same mode in one process, and per rank the peak memory and the bytes of
parameters, gradients and optimizer state.
How the step is timed: :mod:`.trainer_step`. FLOPs: :mod:`.flops`.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time

from . import common, report
from ..errors import UsageError
from .commands import TRAINER_MODES, check_flags, equivalent_command, mode_spec, parsed_args, trainer_argv
from .dit import PRESETS as DIT_PRESETS

MODES = ("reference", "upstream") + tuple(TRAINER_MODES)
PRESET_CHOICES = ("tiny", "digits", "sd15", "sd21-base", "sd21", "sdxl-tiny", "sdxl", "embedded") + DIT_PRESETS


def build_parser():
    from ..cliutil import ArgumentParser

    p = ArgumentParser(prog="train_throughput.py",
                       description="Training images/s of the real Trainer step (Trainer.train_step) built from a "
                                   "training script's flags, on a preset architecture with random weights and an "
                                   "image folder of random images (no downloads).")
    p.add_argument("--preset", default="sd21-base", choices=PRESET_CHOICES,
                   help="architecture (random weights); 'embedded' trains the embedded digits model and data set "
                        "as the main job does (no model or data flags); sd3-*, sd35-*, flux*: the SD3 / FLUX "
                        "DreamBooth rows (module benchmark.dit)")
    p.add_argument("--dit_depth", default=None, metavar="D[,S]",
                   help="SD3 / FLUX presets: keep D transformer blocks (FLUX: D double-stream, S single-stream; "
                        "default S = 2D); the rows then measure that smaller model and add a FLOPs projection of "
                        "the full depth")
    p.add_argument("--resolution", type=int, default=None, help="image side; default: the preset's")
    p.add_argument("--batch_size", type=int, default=None,
                   help="--train_batch_size; default 24 on GPU/NPU, 8 on CPU (SD3 / FLUX presets: 4, 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode; default 20 (GPU/NPU), 10 (CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 5 (GPU/NPU), 2 (CPU)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated subset of {','.join(MODES)}; default reference,online,cached,compiled "
                        f"(on CPU compiled is listed as skipped: inductor's compile of a UNet takes minutes there), "
                        f"plus upstream with --upstream_script; only the --flags modes when --flags is given")
    p.add_argument("--flags", action="append", default=[], metavar="'FLAGS'",
                   help="a Trainer mode with these training-script flags (shlex-split; repeatable); write "
                        "--flags='--use_lora' with '=' when they start with '-' and have no space")
    p.add_argument("--extra_flags", default="", metavar="'FLAGS'",
                   help="training-script flags added to every Trainer mode, e.g. "
                        "--extra_flags='--gradient_checkpointing'")
    p.add_argument("--task", default=None, help="training task of the online/cached/compiled/flags modes; default: "
                                                "text_to_image (text_to_image_sdxl for SDXL presets)")
    p.add_argument("--upstream_script", default=None, metavar="PATH",
                   help="a copy of upstream diffusers' examples/text_to_image/train_text_to_image.py to time on the "
                        "same model and data (never part of this project)")
    p.add_argument("--upstream_flags", default="", metavar="'FLAGS'", help="extra flags for the upstream script")
    p.add_argument("--nproc", type=int, default=1, help="processes per mode (torchrun; CPU: gloo)")
    p.add_argument("--distributed", default="ddp",
                   help="with --nproc > 1: comma-separated engines to measure, of ddp,fsdp,deepspeed")
    p.add_argument("--isolate", action="store_true",
                   help="run each one-process Trainer mode in its own process (a clean peak-memory figure per "
                        "mode on CPU, where the peak RSS cannot be reset)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"], help="device to run on")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Trainer modes' --mixed_precision; default: the script's own (bf16 on CUDA/NPU, no on CPU)")
    p.add_argument("--reference_precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="reference and upstream precision; auto = fp16 on CUDA/NPU (upstream's usual command), "
                        "fp32 on CPU")
    p.add_argument("--num_samples", type=int, default=None, help="images in the data folder; default 4 x batch x nproc")
    p.add_argument("--dataloader_num_workers", type=int, default=None,
                   help="Trainer modes' loader workers (with pinned memory and persistent workers when > 0); "
                        "default 4 on GPU/NPU, 0 on CPU")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for the precision used (989 for H100/H200 SXM dense bf16) to "
                        "report %% of peak")
    p.add_argument("--work_dir", default=None, metavar="FOLDER",
                   help="where the model and image folders are made (and reused when they match); default: a "
                        "temporary folder removed at the end")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (after every mode)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (OMP_NUM_THREADS); default 1 on CPU (more threads on small "
                        "tensors were slower and erratic on a shared machine)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per child process")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and the training run")
    return p


def resolve_args(a):
    from . import dit
    from ..presets import get_preset

    a.device = common.resolve_device(a.device)
    accel = a.device != "cpu"
    a.embedded = a.preset == "embedded"
    a.dit = dit.bench_info(a.preset, a.dit_depth) if dit.is_dit(a.preset) else None
    if a.dit_depth and not a.dit:
        raise UsageError(f"--dit_depth applies to the SD3 / FLUX presets ({', '.join(dit.REAL)})")
    a.arch = None if a.dit else get_preset("digits" if a.embedded else a.preset)
    a.sdxl = bool(a.arch and a.arch.is_sdxl)
    a.resolution = a.resolution or (16 if a.embedded else (a.dit or a.arch).resolution)
    if a.resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8 (got {a.resolution})")
    a.batch_size = a.batch_size or ((4 if accel else 2) if a.dit else (24 if accel else 8))
    a.steps = a.steps if a.steps is not None else (20 if accel else 10)
    a.warmup = a.warmup if a.warmup is not None else (5 if accel else 2)
    if a.steps < 1 or a.batch_size < 1 or a.warmup < 0 or a.nproc < 1:
        raise UsageError("--steps, --batch_size and --nproc must be >= 1, --warmup >= 0")
    a.num_samples = a.num_samples or 4 * a.batch_size * a.nproc
    if a.num_samples < a.batch_size * a.nproc:
        raise UsageError("--num_samples must be at least --batch_size x --nproc (one step's images)")
    a.workers = a.dataloader_num_workers if a.dataloader_num_workers is not None else (4 if accel else 0)
    a.threads = a.threads or (1 if a.device == "cpu" else None)
    a.ref_precision = (("fp16" if accel else "no") if a.reference_precision == "auto" else a.reference_precision)
    a.engines = [e.strip() for e in a.distributed.split(",") if e.strip()] if a.nproc > 1 else [None]
    bad = [e for e in a.engines if e not in (None, "ddp", "fsdp", "deepspeed")]
    if bad or not a.engines:
        raise UsageError(f"--distributed: unknown engine(s) {bad}; choose from ddp,fsdp,deepspeed")
    a.skipped = {}
    if a.modes is None:
        names = [] if a.flags else list(dit.DEFAULT_MODES) if a.dit else ["reference", "online", "cached", "compiled"]
        if a.device == "cpu" and not a.flags and not a.dit:
            names.remove("compiled")
            a.skipped["compiled"] = ("skipped on CPU by default (inductor's compile of the UNet takes minutes on a "
                                     "small CPU); name it in --modes to run it")
        if a.upstream_script:
            names.insert(0, "upstream")
    else:
        names = [m.strip() for m in a.modes.split(",") if m.strip()]
        unknown = [m for m in names if m not in MODES]
        if unknown or not (names or a.flags):
            raise UsageError(f"--modes: unknown {unknown}; choose from {','.join(MODES)}")
    if "upstream" in names and not a.upstream_script:
        raise UsageError("--modes upstream needs --upstream_script PATH (a copy of upstream's train_text_to_image.py)")
    if a.upstream_script and not os.path.isfile(a.upstream_script):
        raise UsageError(f"--upstream_script: {a.upstream_script} does not exist")
    a.mode_list = names + [f"flags{i + 1}" if len(a.flags) > 1 else "flags" for i in range(len(a.flags))]
    return a


# ------------------------------------------------------------------------------------------- running
def run_trainer_mode(a, fx: dict, name: str, spec: dict, engine, nproc: int, counts) -> dict:
    from ..train import task_class
    from . import processes, trainer_step

    task_cls = task_class(spec["task"])
    out_dir = trainer_step.output_dir()
    argv = trainer_argv(a, fx, spec, task_cls, out_dir, engine)
    parsed = parsed_args(task_cls, argv)
    kind = "lora" if getattr(parsed, "use_lora", False) else spec["kind"]
    row = {"mode": name, "task": spec["task"], "kind": kind, "engine": engine or "none", "nproc": nproc,
           "flags": spec["flags"], "argv": argv, "command": equivalent_command(a, spec["task"], argv, nproc),
           "script": task_cls.example, "figure": "Trainer.train_step"}
    try:
        if nproc > 1 or a.nproc > 1 or a.isolate:  # the 1-process baseline of --nproc in its own process too
            env = processes.child_env(a.device, a.threads, nproc)
            log = os.path.join(fx["logs"], f"{name}-{engine or 'single'}-{nproc}p.log")
            r = processes.run_trainer_processes(spec["task"], argv, a.steps, a.warmup, nproc, env,
                                                _free_port(), log, a.timeout)
        else:
            r = trainer_step.time_trainer(spec["task"], argv, a.steps, a.warmup)
    except Exception as e:  # one failing mode (OOM, compile error, bad flag) must not hide the others
        r = {"error": common.error_line(e)}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    row.update(r)
    if "images_per_sec" in row and a.dit:
        from .dit import add_flops

        add_flops(a, row, counts, kind)
    elif "images_per_sec" in row:
        res = row["resolved"]["resolution"] if "resolved" in row else a.resolution
        report.add_flops(row, counts(res, kind), kind, encoders_in_step=not row["resolved"].get("cache_latents"),
                         peak_tflops=a.peak_tflops)
    return row


def run_other_mode(a, fx: dict, name: str, counts) -> dict:
    from . import processes, reference, upstream
    from .trainer_step import precision_label

    if a.embedded:
        return {"mode": name, "skipped": "needs the harness's model and image folders (not --preset embedded)"}
    if a.dit:
        return {"mode": name, "skipped": "the reference re-implements the SD 1.x/2.x text-to-image step only; the "
                                         "DiT rows time the DreamBooth scripts' Trainer step"}
    if a.sdxl:
        return {"mode": name, "skipped": "the reference re-implements the SD 1.x/2.x text-to-image step only" if
                name == "reference" else "the upstream command line is train_text_to_image.py's (SD 1.x/2.x)"}
    row = {"mode": name, "task": "text_to_image", "kind": "full", "nproc": 1, "engine": "none"}
    try:
        if name == "reference":
            if a.nproc > 1:
                return {**row, "skipped": "the re-implemented reference runs in one process only"}
            row.update(label=reference.LABEL, batch_size=a.batch_size)
            row["figure"] = "re-implemented upstream step"
            row.update(reference.run_reference(fx["model"], fx["data"], a.device, a.resolution, a.batch_size,
                                               a.steps, a.warmup, a.ref_precision, a.seed))
        else:
            out_dir = upstream.scratch_dir()
            argv = upstream.upstream_argv(
                fx["model"], fx["data"], a.resolution, a.batch_size, max(1, a.warmup) + a.steps, out_dir,
                a.ref_precision, a.seed, a.upstream_flags)
            launcher = (["ACCELERATE_USE_CPU=true"] if a.device == "cpu" and a.nproc > 1 else []) + (
                ["torchrun", "--nproc_per_node", str(a.nproc)] if a.nproc > 1 else ["python"])
            row.update(label="the upstream script", figure="upstream script, between progress-bar updates",
                       batch_size=a.batch_size,
                       precision=precision_label(a.ref_precision, a.ref_precision == "fp16"),
                       command=" ".join(launcher + [a.upstream_script, shlex.join(argv)]), nproc=a.nproc)
            env = processes.child_env(a.device, a.threads, a.nproc)
            try:
                row.update(upstream.run_upstream(a.upstream_script, argv, a.batch_size, a.steps, a.warmup, a.nproc,
                                                 env, _free_port(), os.path.join(fx["logs"], "upstream.log"),
                                                 a.timeout))
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
    except Exception as e:
        row["error"] = common.error_line(e)
    if "images_per_sec" in row:
        report.add_flops(row, counts(a.resolution, "full"), "full", encoders_in_step=True, peak_tflops=a.peak_tflops)
    return row


def _load():
    """The machine's load average (1, 5, 15 min): a busy shared machine explains erratic figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _free_port() -> int:
    from .upstream import free_port

    return free_port()


def main(argv=None) -> dict:
    """Run the benchmark; print the table; return (and with ``--json`` write) the results dict."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return common.run_on_device(args, lambda a: _main(resolve_args(a)))


def _main(a) -> dict:
    from . import dit, fixture, flops
    from ..train.registry import find_task
    from .trainer_step import threads_env

    old_omp = os.environ.get("OMP_NUM_THREADS")
    threads_env(a.threads)
    work = a.work_dir or tempfile.mkdtemp(prefix="dnpu-bench-")
    os.makedirs(work, exist_ok=True)
    fx = {"logs": os.path.join(work, "logs"), "cache": os.path.join(work, "latent-cache")}
    os.makedirs(fx["logs"], exist_ok=True)
    rows, flop_cache, env = [], {}, common.environment(a.device)
    env["load_average_at_start"] = _load()
    seq_len = a.arch.tokenizer_max_length if a.arch else None
    if a.dit:
        fx["notes"] = dit.fixture_notes(a.dit)

    def counts(resolution, kind, text_len=None):
        """FLOP counts at ``resolution`` (and ``text_len`` T5 tokens for DiT rows) with ``kind``'s step (counted
        once, on first use)."""
        have = flop_cache.setdefault(resolution if text_len is None else f"{resolution}px-{text_len}tok", {})
        if f"{kind}_fwd_bwd" not in have:
            try:
                have.update(dit.count_flops(a, fx["model"], resolution, kind, text_len) if a.dit else
                            flops.count_training_flops(a.arch, resolution, seq_len, kinds=(kind,)))
            except Exception as e:  # e.g. peft missing for the LoRA count: the figures stay, TFLOP/s does not
                have[f"{kind}_fwd_bwd"] = None
                have[f"{kind}_error"] = common.error_line(e)
        return have

    def publish_partial():
        if a.json:
            common.write_json(a.json, report.result(a, fx, rows, env, flop_cache))

    try:
        plan = []
        for name in a.mode_list:
            if name in ("reference", "upstream"):
                plan.append((name, None))
                continue
            spec = mode_spec(a, name)
            if "skipped" in spec:
                rows.append({"mode": name, "task": "-", "skipped": spec["skipped"]})
            elif find_task(spec["task"]) is None:
                rows.append({"mode": name, "task": spec["task"], "skipped": f"not run: the task {spec['task']!r} is "
                             f"not in this checkout (its rows wait for it)"})
            else:
                check_flags(a, name, spec)
                plan.append((name, spec))
        t0 = time.perf_counter()
        if plan and not a.embedded:
            fx["model"], fx["model_build_s"] = (dit.model_folder(work, a.dit, a.seed, a.device) if a.dit else
                                                fixture.model_folder(work, a.preset, a.seed, a.device))
            fx["data"], fx["data_build_s"] = fixture.image_folder(work, a.num_samples, a.resolution, a.seed)
        fx["setup_s"] = time.perf_counter() - t0
        print(report.banner(a, env), flush=True)
        for name, spec in plan:
            if spec is None:
                runs = [lambda: run_other_mode(a, fx, name, counts)]
            else:
                # With --nproc: first the one-process figure that scaling efficiency compares against.
                runs = ([lambda: run_trainer_mode(a, fx, name, spec, None, 1, counts)] if a.nproc > 1 else []) + [
                    lambda e=e: run_trainer_mode(a, fx, name, spec, e, a.nproc, counts) for e in a.engines]
            for run in runs:
                rows.append(run())
                print(report.progress_line(rows[-1]), flush=True)
                publish_partial()
        for name, why in a.skipped.items():
            rows.append({"mode": name, "skipped": why})
        env["load_average_at_end"] = _load()
    finally:
        if old_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_omp
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result = report.result(a, fx, rows, env, flop_cache)
    return common.publish(result, report.format_results(result), a.json)


def cli(argv=None) -> int:
    """The script's entry point: 0 when every row was measured or deliberately not run, 1 when one failed."""
    from ..cliutil import run_main

    failed = []
    code = run_main(lambda: failed.extend(r for r in main(argv)["modes"] if "error" in r))
    return code or (1 if failed else 0)
