"""Worker for the multi-process tests: run under ``torchrun``, it trains a list of jobs one after the other in
ONE process group (saving the interpreter and process-group start-up per job) and prints, per job and rank,
the exit code and a checksum of the rank's full trained weights; it exits with the last job's code.

    torchrun --nproc_per_node 2 tests/dist_worker.py JOBS.json

``JOBS.json``: ``[{"name": ..., "task": ..., "args": [...], "sigterm_at": step or null, "sigterm_rank": r}]``.
A job with ``sigterm_at`` sends SIGTERM to this process on rank ``sigterm_rank`` (default 1) right after that
optimizer step, like a pre-emption that reaches one rank first; ``kill_at`` sends SIGKILL instead (a rank that
dies). ``{node}`` in an argument becomes this process's node rank (``GROUP_RANK``), for node-local folders.
Each RESULT line also gives the process group's timeout (``timeout S``).
"""
import json
import os
import signal
import sys

import torch


def main():
    from diffusers_npu.train import main as train_main, task_class
    from diffusers_npu.train.loop import Trainer
    from diffusers_npu.train.weights import full_tensor

    rank = int(os.environ.get("RANK", "0"))
    jobs = json.load(open(sys.argv[1]))
    real_finish = Trainer.finish
    checksums = {}

    def finish(self, exit_reason):
        # every rank: the full value of every trained tensor (an all-gather under FSDP)
        checksums["last"] = sum(float(full_tensor(p.detach()).double().sum()) for p in self.params)
        return real_finish(self, exit_reason)

    Trainer.finish = finish
    rc = 0
    for job in jobs:
        cls = task_class(job["task"])
        real_step = cls.after_optimizer_step

        def after(self, step, _real=real_step, _job=job):
            _real(self, step)
            if _job.get("sigterm_at") == step and rank == _job.get("sigterm_rank", 1):
                os.kill(os.getpid(), signal.SIGTERM)
            if _job.get("kill_at") == step and rank == _job.get("sigterm_rank", 1):
                os.kill(os.getpid(), signal.SIGKILL)

        cls.after_optimizer_step = after
        checksums.pop("last", None)
        try:
            node = os.environ.get("GROUP_RANK", "0")
            rc = train_main(cls, [a.replace("{node}", node) for a in job["args"]])
        finally:
            cls.after_optimizer_step = real_step
        from diffusers_npu.train.ranks import group_timeout_s

        print(f"RESULT {job['name']} rank {rank} rc {rc} checksum {checksums.get('last', float('nan')):.12e} "
              f"timeout {group_timeout_s()}", flush=True)


    return rc


if __name__ == "__main__":
    torch.set_num_threads(1)
    # The last job's exit code is the process's: torchrun then sees a failed job as a failure (with every
    # worker at 0 an agent would wait for the others at its exit barrier, minutes when a node has failed).
    sys.exit(main())
