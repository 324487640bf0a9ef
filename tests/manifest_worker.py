"""Worker for the 2-process manifest test (run under torchrun, gloo): the checkpoint protocol's collectives
without a training run. Prints ``OK <rank> <what>`` lines the test reads.

    torchrun --nproc_per_node 2 tests/manifest_worker.py OUT
"""
import json
import os
import sys

import torch.distributed as dist

from diffusers_npu import checkpoint as ckpt
from diffusers_npu.errors import CheckpointError


def save(out, step, shared=True):
    """Every rank writes its own shard (plus the main process a shared file), then the collective commit.
    With ``shared=False`` each rank writes into a folder of its own, as on node-local disks."""
    rank = dist.get_rank()
    final = os.path.join(out if shared else f"{out}-rank{rank}", f"checkpoint-{step}")
    tmp = ckpt.tmp_path_for(final)
    if rank == 0 or not shared:
        ckpt.begin(final)
    dist.barrier()
    with open(os.path.join(tmp, f"shard_{rank}.bin"), "wb") as f:
        f.write(bytes([step, rank]) * (1000 + 100 * rank))
    if rank == 0:
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump({"step": step}, f)
    dist.barrier()
    done = ckpt.commit(tmp, final, {"step": step, "layout": 2}, ckpt.Ranks())
    dist.barrier()  # the main process renames after the others return (the trainer's save ends with a barrier)
    return done


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for step in (1, 2):
        save(out, step)
    m = json.load(open(os.path.join(out, "checkpoint-2", "manifest.json")))
    print(f"OK {rank} hashed_by {sorted({e['hashed_by'] for e in m['files'].values()})} files {sorted(m['files'])}",
          flush=True)
    try:
        save(out + "-local", 1, shared=False)
        print(f"OK {rank} node-local committed", flush=True)
    except CheckpointError as e:
        print(f"OK {rank} refused: {e}", flush=True)
    if rank == 0:
        with open(os.path.join(out, "checkpoint-2", "shard_1.bin"), "r+b") as f:
            f.write(b"\xff\xff")
    dist.barrier()
    chosen = ckpt.resolve_resume("latest", out, ranks=ckpt.Ranks())
    print(f"OK {rank} resume {os.path.basename(chosen)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
