"""``diffusers-npu launch TASK [options] -- [training flags]``: run a training task the ModelZoo way.

It builds the command as a list (torchrun for more than one process; ``ACCELERATE_USE_CPU=true`` on CPU),
runs it, appends the whole output to ``<log_dir>/train_<id>.log`` behind a marker line, shows one live
progress line on a terminal (throttled progress lines elsewhere), and at the end prints the ModelZoo result
lines and writes ``<log_dir>/<CaseName>.log`` from the trainer's ``train_summary.json``. The same launcher is
``python -m diffusers_npu.launch`` and what every ``test/*.sh`` script calls. See docs/launching.md.

Exit status: the trainer's -- 0 done (or pre-empted: rerun to continue), 2 bad input, 3 training failure,
4 learning check below ``--learning_check_min`` -- for any number of processes: torchrun reports any failing
rank as 1, so each rank records its own code in a folder the launcher names (``$DIFFUSERS_NPU_EXIT_DIR``,
:func:`diffusers_npu.train.ranks.record_exit`) and the launcher exits with rank 0's, else the lowest failing
rank's.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Optional, Sequence

from ..cliutil import ArgumentParser, run_main
from . import devices, report, runner
from .options import add_arguments, install_double_dash
from .plan import Plan, PlanBuilder
from .progress import Progress
from .variants import get_variant

DESCRIPTION = ("Run a training task on 1 or N devices / nodes the ModelZoo way: log file, live progress line, "
               "summary lines and CaseName.log. Flags after '--' go to the training script unchanged.")
EXIT_LEARNING_CHECK = 4


def configure_parser(parser) -> None:
    """Add the launcher's options to ``parser`` (``diffusers-npu launch`` or ``python -m``) and its handler."""
    add_arguments(parser)
    install_double_dash(parser)
    parser.set_defaults(func=run)


def plan_runs(args):
    """``(builder, the plan for this machine, the plan for the requested devices or None, notes)``."""
    from ..train.registry import get_task

    task_cls = get_task(args.task)
    builder = PlanBuilder(args, task_cls, get_variant(args.variant) if args.variant else None)
    kind, available = devices.count_devices()
    notes = []
    nproc = builder.requested
    if builder.requested > available:
        what = "usable CPU cores" if kind == "cpu" else f"{kind} devices"
        notes.append(f"Note: {builder.requested} devices requested, {available} {what} on this node; "
                     f"using {available}.")
        nproc = available
    plan = builder.build(kind, nproc)
    requested = None
    if nproc != builder.requested:
        # What the requested run looks like where the devices exist (an NPU node, when planning on a CPU box).
        requested = builder.build("npu" if kind == "cpu" else kind, builder.requested)
    return builder, plan, requested, notes


def run(args) -> int:
    builder, plan, requested, notes = plan_runs(args)
    print(plan.header())
    for note in notes:
        print(note)
    if args.dry_run:
        check_training_flags(builder, plan)
        return dry_run(builder, plan, requested)
    return launch(builder, plan)


def check_training_flags(builder: PlanBuilder, plan: Plan) -> None:
    """What the run would refuse, the dry run refuses too, in the same words: the training flags are parsed and
    resolved by the trainer's own functions (nothing is prepared, loaded or written)."""
    from ..train import check_model_family
    from ..train.config import device_info, parse_args, resolve_defaults

    task_cls = builder.task_cls
    prog = os.path.basename(plan.program[0]) if plan.program[0] != "-m" else f"diffusers-npu train {plan.task}"
    args = parse_args(task_cls, plan.train_args, prog=prog)
    embedded = {"model": "<the embedded model>", "dataset": "<the embedded data set>"}
    from .. import device as dev

    info = device_info(plan.topology.device, plan.world)
    if dev.detect_device() != plan.topology.device:
        # A dry run for devices this machine does not have (8 NPUs planned on a laptop): what the devices
        # support cannot be probed here, so the capable case is assumed (Atlas A2/A3 and current GPUs have bf16)
        # and only the flags themselves are validated.
        info = dataclasses.replace(info, supports_bf16=True)
    args = resolve_defaults(args, info, embedded, task_cls)
    check_model_family(args, task_cls)
    task_cls(args).validate_args()


def deepspeed_text(plan: Plan) -> Optional[str]:
    if plan.world == 1 or plan.effective("distributed") != "deepspeed":
        return None
    from ..train.engine import deepspeed_config_json

    stage = int(plan.effective("zero_stage", 2))
    default_precision = "no" if plan.topology.device == "cpu" else "bf16"  # the trainer's device default
    text = deepspeed_config_json(
        zero_stage=stage, mixed_precision=str(plan.effective("mixed_precision", default_precision)),
        train_batch_size=int(plan.effective("train_batch_size", 16)),
        gradient_accumulation_steps=int(plan.effective("gradient_accumulation_steps", 1)),
        max_grad_norm=float(plan.effective("max_grad_norm", 1.0)))
    import importlib.util

    missing = "" if importlib.util.find_spec("deepspeed") else \
        " (deepspeed is not installed here: pip install --no-build-isolation -e '.[deepspeed]' in the checkout)"
    return f"DeepSpeed config (ZeRO-{stage}), as the trainer builds it{missing}:\n{text}"


def dry_run(builder: PlanBuilder, plan: Plan, requested: Optional[Plan]) -> int:
    print(f"Launch: {plan.shell()}")
    shown = plan
    if requested is not None:
        t = requested.topology
        nodes = f" x {t.nnodes} nodes" if t.nnodes > 1 else ""
        print(f"Requested: {requested.header()}")
        print(f"On {t.nproc} {t.device} devices{nodes} it would run: {requested.shell()}")
        shown = requested
    text = deepspeed_text(shown)
    if text:
        print(text)
    print(f"Log: {builder.log_file} (dry run: nothing was run or written)")
    return 0


def launch(builder: PlanBuilder, plan: Plan) -> int:
    log_file = builder.log_file
    print(f"Log: {log_file} (the full output; a rerun appends to it)")
    print(f"Launch: {plan.shell()}")
    sys.stdout.flush()
    summary_path = os.path.join(plan.output_dir, "train_summary.json")
    before = report.mtime_ns(summary_path)
    checking = "--learning_check" in plan.train_args
    done = "All steps done; saving the output" + (" and running the learning check" if checking else "") + "..."
    from ..train.ranks import EXIT_DIR_ENV, read_exits

    exit_dir = tempfile.mkdtemp(prefix="dnpu-exit-")  # the ranks' own exit codes (not part of the command)
    try:
        result = runner.execute(plan.command(), dict(plan.env, **{EXIT_DIR_ENV: exit_dir}), log_file,
                                Progress(sys.stdout, sys.stdout.isatty()), command_text=plan.shell(),
                                after_last_step=done, workers_of_child=plan.topology.world > 1)
        ranks = read_exits(exit_dir)
    finally:
        shutil.rmtree(exit_dir, ignore_errors=True)
    return finish(plan, log_file, result, summary_path, before, ranks)


def finish(plan: Plan, log_file: str, result: runner.RunResult, summary_path: str, before,
           ranks: Optional[dict] = None) -> int:
    from ..train.ranks import job_exit_code

    rc = result.returncode if result.returncode >= 0 else 128 - result.returncode  # killed by a signal
    rc = job_exit_code(ranks or {}, rc)  # torchrun says 1 for any failing rank; the ranks said why
    if plan.topology.node_rank != 0:
        print(f"Node {plan.topology.node_rank} finished (exit code {rc}); node 0 writes the summary.")
        return rc
    summary = report.read_fresh_summary(summary_path, before)
    if (summary or {}).get("exit_reason") == "preempted" or (result.preempted_line and summary is None):
        # torchrun exits 1 when a signal reached it, although every rank saved and exited 0
        ranks_saved = bool(ranks) and not any(rec.get("rc") for rec in ranks.values())
        if rc == 0 or result.forwarded_signal or ranks_saved:
            at = f" at step {summary.get('steps')} of {summary.get('max_train_steps')}" if summary else ""
            print(f"Pre-empted{at}: a checkpoint was saved. Rerun the same command to continue "
                  f"(the log is appended to: {log_file}).")
            return 0
    if summary is None:
        if rc != 0:
            return _failed(rc, log_file, result, ranks)
        print(f"error: training ended (exit code {rc}) but did not write {summary_path}; see {log_file}",
              file=sys.stderr)
        return 3
    # Training ended and wrote its summary: the result lines and CaseName.log come first, whatever failed later.
    lines = report.result_lines(summary)
    lines += [l for l in result.learning_check if not l.startswith("Learning check FAILED")]
    entries = report.case_entries(summary, plan.network, plan.case_suffix, plan.topology.device)
    case_log = report.write_case_log(os.path.dirname(log_file), entries)
    lines.append(f"Summary: {case_log}")
    verdict = report.learning_check_verdict(summary)
    if verdict is None and rc == EXIT_LEARNING_CHECK:
        verdict = next((l for l in result.learning_check if l.startswith("Learning check FAILED")),
                       "Learning check FAILED (exit code 4)")
    print("\n".join(lines))
    with open(log_file, "a", encoding="utf-8") as log:  # the log file tells the whole story too
        log.write("\n".join(lines + ([verdict] if verdict else [])) + "\n")
    if rc not in (0, EXIT_LEARNING_CHECK):
        return _failed(rc, log_file, result, ranks)
    if verdict:
        print(verdict, file=sys.stderr)
        return EXIT_LEARNING_CHECK
    return 0


def _without_torchrun_traceback(tail):
    """torchrun ends a failed job with its own ``ChildFailedError`` traceback, which says only that a rank
    failed; the ranks' lines above it say why (the log file keeps everything)."""
    starts = [i for i, line in enumerate(tail) if line.startswith("Traceback (most recent call last)")]
    if starts and any("ChildFailedError" in line for line in tail[starts[-1]:]):
        tail = tail[:starts[-1]]
    return tail[-runner.TAIL_LINES:]


def _failed(rc: int, log_file: str, result: runner.RunResult, ranks: Optional[dict]) -> int:
    """The failure report: each failing rank's error line (several processes), then the log's last lines."""
    print(f"Training failed (exit code {rc}). Last lines of {log_file}:", file=sys.stderr)
    for line in _without_torchrun_traceback(result.tail):
        print(f"  {line}", file=sys.stderr)
    for r, rec in sorted((ranks or {}).items()):
        if rec.get("rc") and len(ranks) > 1:
            print(f"rank {r} (host {rec.get('host', '?')}) exited {rec['rc']}: {rec.get('error') or '(no message)'}",
                  file=sys.stderr)
    return rc


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m diffusers_npu.launch TASK ...``; returns the exit status."""
    parser = ArgumentParser(prog="python -m diffusers_npu.launch", description=DESCRIPTION)
    configure_parser(parser)
    argv = list(sys.argv[1:] if argv is None else argv)

    def body():
        args = parser.parse_args(argv)
        return args.func(args)

    return run_main(body)


__all__ = ["configure_parser", "dry_run", "finish", "launch", "main", "plan_runs", "run"]
