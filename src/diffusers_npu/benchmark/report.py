"""The training harness's result record and tables (what ``--json`` writes and what it prints)."""
from __future__ import annotations

from . import common
from .flops import step_flops


def add_flops(row: dict, counts: dict, kind: str, encoders_in_step: bool, peak_tflops) -> None:
    """TFLOP/s per device of what the row's step executes (the encoders only when they run in the step)."""
    if counts.get(f"{kind}_fwd_bwd") is None:
        row.update(flops_per_image=None, tflops_per_device=None, pct_of_peak=None)
        return
    per_image = step_flops(counts, kind, encoders_in_step)
    row["flops_per_image"] = per_image
    row["tflops_per_device"] = per_image * row["images_per_sec_per_device"] / 1e12
    row["pct_of_peak"] = 100.0 * row["tflops_per_device"] / peak_tflops if peak_tflops else None


def _scaling(rows: list) -> None:
    """Scaling efficiency of each multi-process row against the same mode in one process."""
    single = {r["mode"]: r for r in rows if r.get("nproc") == 1 and "images_per_sec" in r}
    for r in rows:
        base = single.get(r.get("mode"))
        if r.get("nproc", 1) > 1 and "images_per_sec" in r and base:
            r["scaling_efficiency"] = r["images_per_sec"] / (r["nproc"] * base["images_per_sec"])


def _vs(rows: list) -> None:
    ref = next((r for r in rows if r.get("mode") == "reference" and "images_per_sec" in r), None)
    up = next((r for r in rows if r.get("mode") == "upstream" and "images_per_sec" in r), None)
    for r in rows:
        if "images_per_sec" in r and r.get("nproc", 1) == 1:
            r["vs_reference"] = r["images_per_sec"] / ref["images_per_sec"] if ref else None
            r["vs_upstream"] = r["images_per_sec"] / up["images_per_sec"] if up else None


def result(a, fx: dict, rows: list, env: dict, flop_counts: dict) -> dict:
    _scaling(rows)
    _vs(rows)
    return {
        "benchmark": "train_throughput",
        "figures": "rows with figure 'Trainer.train_step' time the real Trainer step built from the recorded "
                   "training command; 'reference' is the upstream step re-implemented here; 'upstream' is the "
                   "user-supplied upstream script",
        "harness_command": "python bench/train_throughput.py " + " ".join(getattr(a, "argv", [])),
        "config": {"preset": a.preset, "resolution": a.resolution, "batch_size": a.batch_size, "steps": a.steps,
                   "warmup": a.warmup, "num_samples": a.num_samples, "nproc": a.nproc,
                   "engines": [e for e in a.engines if e], "reference_precision": a.ref_precision,
                   "mixed_precision": a.mixed_precision or "the script's default", "threads": a.threads,
                   "dataloader_num_workers": a.workers, "extra_flags": a.extra_flags, "flags": a.flags,
                   "peak_tflops": a.peak_tflops, "seed": a.seed, "isolate": a.isolate,
                   "dit_depth": list(a.dit.depth) if getattr(a, "dit", None) and a.dit.depth else None},
        "fixture": {k: v for k, v in fx.items() if k not in ("logs", "cache")},
        "flops_per_image": {str(res): c for res, c in flop_counts.items()},
        "flops_counted": "matmul/conv/attention FLOPs at batch 1 on the meta device (FlopCounterMode): full / LoRA / "
                         "ControlNet step forward+backward, encoders forward; no recomputation counted",
        "peak_memory_kind": _memory_kind(a),
        "environment": env,
        "modes": rows,
    }


def _memory_kind(a) -> str:
    if a.device != "cpu":
        return "peak bytes allocated by the device allocator during the timed steps (max over ranks)"
    if a.nproc > 1 or a.isolate:
        return "peak RSS of each mode's own process(es) (max over ranks)"
    return common.memory_kind("cpu")


def banner(a, env: dict) -> str:
    procs = f", {a.nproc} processes ({','.join(e for e in a.engines if e)})" if a.nproc > 1 else ""
    return (f"train_throughput: preset {a.preset}, {a.resolution} px, batch {a.batch_size} per device (unless a mode's "
            f"flags set it), {a.warmup} warm-up + {a.steps} timed steps per mode{procs}, device {env['device_name']}")


def progress_line(r: dict) -> str:
    name = r["mode"] + (f" [{r['engine']} x{r['nproc']}]" if r.get("nproc", 1) > 1 else "")
    if "images_per_sec" in r:
        warm = f", warm-up {r['warmup_s']:.1f} s" if r.get("warmup_s") is not None else ""
        return f"  {name}: {r['images_per_sec']:.2f} images/s ({r['ms_per_step']:.1f} ms/step{warm})"
    return f"  {name}: {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED ' + r.get('error', '')}"


def _state(r: dict) -> str:
    if r.get("param_bytes") is None:
        return "-"
    return common.fmt_bytes(r["param_bytes"] + r.get("optimizer_state_bytes", 0))


def _batch(r: dict) -> str:
    """Per-device batch the mode trained with (its flags or --config may set their own)."""
    resolved = r.get("resolved") or {}
    return str(resolved.get("train_batch_size") or r.get("batch_size") or "-")


def _mode_name(r: dict) -> str:
    if r["mode"] == "reference":
        return "reference*"
    return r["mode"]


HEADERS = ("mode", "task", "precision", "batch", "images/s", "ms/step", "CPU ms/step", "TFLOP/s", "% peak", "peak mem",
           "params+opt", "setup s", "warm-up s", "vs ref")
DIST_HEADERS = ("mode", "engine", "procs", "batch", "images/s", "per device", "scaling", "ms/step", "CPU ms/step",
                "TFLOP/s/dev", "peak mem/rank", "params+opt/rank")


def table_rows(result: dict) -> list:
    out = []
    for r in result["modes"]:
        if "images_per_sec" not in r:
            out.append([_mode_name(r), r.get("task", "-"), "not run" if "skipped" in r else "FAILED"]
                       + ["-"] * (len(HEADERS) - 3))
            continue
        vs = r.get("vs_reference")
        out.append([_mode_name(r), r.get("task", "-"), r["precision"] if "precision" in r else "-", _batch(r),
                    common.fmt_num(r["images_per_sec"], 2), common.fmt_num(r["ms_per_step"]),
                    common.fmt_num(r.get("cpu_ms_per_step")), common.fmt_num(r.get("tflops_per_device"), 2),
                    common.fmt_num(r["pct_of_peak"]) if r.get("pct_of_peak") is not None else "-",
                    common.fmt_bytes(r.get("peak_memory_bytes")), _state(r), common.fmt_num(r.get("setup_s")),
                    common.fmt_num(r.get("warmup_s")), f"{vs:.2f}x" if vs else "-"])
    return out


def dist_rows(result: dict) -> list:
    out = []
    for r in result["modes"]:
        if "images_per_sec" not in r:
            out.append([r["mode"], r.get("engine", "-"), str(r.get("nproc", "-")), "-",
                        "not run" if "skipped" in r else "FAILED"] + ["-"] * (len(DIST_HEADERS) - 5))
            continue
        eff = r.get("scaling_efficiency")
        out.append([r["mode"], r.get("engine", "none"), str(r.get("nproc", 1)), _batch(r),
                    common.fmt_num(r["images_per_sec"], 2),
                    common.fmt_num(r["images_per_sec_per_device"], 2), f"{100 * eff:.0f}%" if eff else "-",
                    common.fmt_num(r["ms_per_step"]), common.fmt_num(r.get("cpu_ms_per_step")),
                    common.fmt_num(r.get("tflops_per_device"), 3),
                    common.fmt_bytes(r.get("peak_memory_bytes")), _state(r)])
    return out


def format_results(result: dict, markdown: bool = False) -> str:
    c = result["config"]
    head = (f"preset {c['preset']} @ {c['resolution']} px, {c['steps']} timed steps (+{c['warmup']} warm-up) per "
            f"mode on {result['environment']['device_name']}; batch = per device")
    if c["nproc"] > 1:
        table = common.format_table(DIST_HEADERS, dist_rows(result), markdown=markdown)
    else:
        table = common.format_table(HEADERS, table_rows(result), markdown=markdown)
    notes = []
    for r in result["modes"]:
        if "images_per_sec" not in r:
            notes.append(f"{r['mode']}: {r.get('skipped') or r.get('error')}")
        elif r.get("nonfinite_losses"):
            notes.append(f"{r['mode']}: {r['nonfinite_losses']} of the timed steps had a non-finite loss")
        if r.get("fp16_skipped_steps"):
            notes.append(f"{r['mode']}: the GradScaler skipped {r['fp16_skipped_steps']} optimizer steps (fp16)")
    notes += result["fixture"].get("notes", [])
    if result["fixture"].get("notes"):  # the DiT rows: which script's step ran, full-depth projections
        from .dit import row_notes

        notes += row_notes(result)
    if any(r.get("mode") == "reference" for r in result["modes"]):
        notes.append("reference*: the upstream step, re-implemented here (not a Trainer-step figure)")
    notes.append("other Trainer modes time Trainer.train_step; each row's training command is in the JSON")
    notes.append(f"peak mem: {result['peak_memory_kind']}; params+opt: trained parameters + optimizer state "
                 f"held by one rank; CPU ms/step: the (rank 0) process's CPU time per timed step")
    return "\n".join([head, table] + notes)
