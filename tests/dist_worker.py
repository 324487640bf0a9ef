"""Worker for the multi-process tests: run under ``torchrun``, it trains a list of jobs one after the other in
ONE process group (saving the interpreter and process-group start-up per job) and prints, per job and rank,
the exit code, the engine that really trained and a checksum of what this rank holds of the trained weights.

    torchrun --nproc_per_node 2 tests/dist_worker.py JOBS.json

``JOBS.json``: ``[{"name": ..., "task": ..., "args": [...], "sigterm_at": step or null, "sigterm_rank": r,
"nan_at": step or null, "nan_rank": r, "kill_at": step or null, "damage": {...} or null}]``. A job with ``sigterm_at`` sends SIGTERM to this process on rank
``sigterm_rank`` (default 1) right after that optimizer step, like a pre-emption that reaches one rank first.
A job with ``kill_at`` sends SIGKILL instead (a rank that dies). ``{node}`` in an argument becomes this
process's node rank (``GROUP_RANK``), for node-local folders. A job with ``nan_at`` makes the loss NaN on rank ``nan_rank`` (default 1) only, in that optimizer step.

The checksum is of the rank's LOCAL data (float64 sum of every trained parameter as the rank holds it: the
whole tensor under DDP / ZeRO-2, its own shard under FSDP / ZeRO-3), taken without any collective: replicas
must agree rank by rank, and shards must add up to the saved model. ``engine`` is Engine.running(), read from
the prepared module, and ``module`` its class.
Each RESULT line also gives the process group's timeout (``timeout S``); the process exits with the last job's code.
"""
import json
import os
import signal
import sys

import torch


def local_sum(p) -> float:
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: this rank's partition (padding is zeros)
        return float(p.ds_tensor.detach().double().sum())
    if hasattr(p, "to_local"):  # FSDP2 DTensor: this rank's shard
        return float(p.to_local().detach().double().sum())
    return float(p.detach().double().sum())


def damage_before(job, rank):
    """``"damage": {"src", "kind", "fault", "seed"}``: rank 0 copies the checkpoints of ``src`` into the job's
    --output_dir and damages one file of the newest (tests/faults.py); the others wait for it."""
    import torch.distributed as dist

    from faults import copy_checkpoints, damage, pick

    d = job["damage"]
    out = job["args"][job["args"].index("--output_dir") + 1]
    if rank == 0:
        copy_checkpoints(d["src"], out)
        rel = pick(os.path.join(out, "checkpoint-3"), d["kind"])
        print(f"DAMAGE {job['name']} {rel} {damage(os.path.join(out, 'checkpoint-3'), rel, d['fault'], d['seed'])}",
              flush=True)
    if dist.is_initialized():
        dist.barrier()


def main():
    from diffusers_npu.train import main as train_main, task_class
    from diffusers_npu.train.loop import Trainer

    rank = int(os.environ.get("RANK", "0"))
    jobs = json.load(open(sys.argv[1]))
    real_finish = Trainer.finish
    seen = {}

    def finish(self, exit_reason):
        seen["checksum"] = sum(local_sum(p) for p in self.params)
        seen["engine"] = self.engine.running()
        seen["module"] = type(self.model).__name__
        return real_finish(self, exit_reason)

    Trainer.finish = finish
    rc = 0
    for job in jobs:
        cls = task_class(job["task"])
        real_step = cls.after_optimizer_step
        real_build = cls.build_module

        def after(self, step, _real=real_step, _job=job):
            _real(self, step)
            if _job.get("sigterm_at") == step and rank == _job.get("sigterm_rank", 1):
                os.kill(os.getpid(), signal.SIGTERM)
            if _job.get("kill_at") == step and rank == _job.get("sigterm_rank", 1):
                os.kill(os.getpid(), signal.SIGKILL)

        def build(self, _real=real_build, _job=job):
            module = _real(self)
            if _job.get("nan_at") is None or rank != _job.get("nan_rank", 1):
                return module
            forward, calls = module.forward, {"n": 0}

            def poisoned(batch):  # the loss of this rank only, in optimizer step nan_at
                loss, extra = forward(batch)
                calls["n"] += 1
                step = (calls["n"] - 1) // self.args.gradient_accumulation_steps + 1
                return (loss * float("nan") if step == _job["nan_at"] else loss), extra

            module.forward = poisoned
            return module

        cls.after_optimizer_step = after
        cls.build_module = build
        seen.clear()
        if job.get("damage"):
            damage_before(job, rank)
        try:
            node = os.environ.get("GROUP_RANK", "0")
            rc = train_main(cls, [a.replace("{node}", node) for a in job["args"]])
        finally:
            cls.after_optimizer_step = real_step
            cls.build_module = real_build
        from diffusers_npu.train.ranks import group_timeout_s

        print(f"RESULT {job['name']} rank {rank} rc {rc} checksum {seen.get('checksum', float('nan')):.12e} "
              f"engine {seen.get('engine', '-')} module {seen.get('module', '-')} timeout {group_timeout_s()}",
              flush=True)
    return rc


if __name__ == "__main__":
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 pid`: where a hung worker waits
    torch.set_num_threads(1)
    # The last job's exit code is the process's: torchrun then sees a failed job as a failure (with every
    # worker at 0 an agent would wait for the others at its exit barrier, minutes when a node has failed).
    sys.exit(main())
