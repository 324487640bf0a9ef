"""How long a pre-emption takes, against torchrun's window (30 s by default between forwarding SIGTERM to its
workers and SIGKILL).

    python bench/preemption_window.py [--nproc 2] [--write_mb 512]

Runs ``diffusers-npu launch text_to_image`` on the embedded digits model with EMA on N CPU processes, sends
SIGTERM (1) to the launcher and (2) to torchrun itself once training is under way, and measures the seconds
from the signal to the exit, the checkpoint's size, and the exit codes. It then measures this disk's
write + fsync bandwidth and estimates an SD 1.5 and an SDXL pre-emption checkpoint (fp32 UNet + EMA + AdamW's
two moments = 16 bytes per UNet parameter, written once however it is sharded) as the measured fixed overhead
plus bytes / bandwidth. Prints one table.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_PARAMS = {"SD 1.5 / 2.1 UNet": 865e6, "SDXL UNet": 2.57e9}
BYTES_PER_PARAM = 16  # fp32 weights + fp32 EMA + AdamW exp_avg + exp_avg_sq


def run_once(nproc: int, workdir: str, target: str) -> dict:
    out = os.path.join(workdir, target)
    cmd = [sys.executable, "-m", "diffusers_npu.launch", "text_to_image", f"--num_devices={nproc}",
           f"--log_dir={out}", f"--output_dir={out}/o", "--batch_size=2", "--max_train_steps=10000",
           "--learning_check=0", "--", "--report_to=none", "--use_ema", "--checkpointing_steps=100000",
           "--log_every=1"]  # the save starts at the next step, not up to --log_every steps later
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO, "src"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    log = os.path.join(out, "train_0.log")
    while not (os.path.exists(log) and re.search(r"^step 3/", open(log).read(), re.M)):
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read()[-3000:])
        time.sleep(0.2)
    if target == "launcher":
        pid = proc.pid
    else:  # torchrun: the launcher's child
        pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == proc.pid)
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGTERM)
    text = proc.communicate()[0]
    seconds = time.perf_counter() - t0
    ckpts = [d for d in os.listdir(f"{out}/o") if d.startswith("checkpoint-")]
    size = sum(os.path.getsize(os.path.join(r, f)) for c in ckpts for r, _, fs in os.walk(f"{out}/o/{c}") for f in fs)
    return {"target": target, "rc": proc.returncode, "seconds": seconds, "bytes": size, "checkpoints": ckpts,
            "preempted_line": next((l for l in text.splitlines() if l.startswith("Pre-empted")), ""),
            "signal_exception": "SignalException" in open(log).read()}


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def write_bandwidth(folder: str, mb: int) -> float:
    path = os.path.join(folder, "bw.bin")
    block = os.urandom(2 ** 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    os.remove(path)
    return mb * 2 ** 20 / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    p.add_argument("--write_mb", type=int, default=512, help="MiB written to measure the disk (default 512)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dnpu-preempt-") as work:
        rows = [run_once(a.nproc, work, t) for t in ("launcher", "torchrun")]
        bw = write_bandwidth(work, a.write_mb)
    print(f"| signal sent to | exit code | signal -> exit (s) | checkpoint MB | launcher says | torchrun traceback |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['rc']} | {r['seconds']:.1f} | {r['bytes'] / 1e6:.1f} | "
              f"{r['preempted_line'][:40] or '-'} | {'yes' if r['signal_exception'] else 'no'} |")
    fixed = rows[0]["seconds"]
    print(f"\nDisk write + fsync: {bw / 1e6:.0f} MB/s. Estimated pre-emption (fixed {fixed:.1f} s + bytes / "
          f"bandwidth, one step of waiting not included):")
    for name, params in UNET_PARAMS.items():
        gb = params * BYTES_PER_PARAM / 1e9
        print(f"  {name}: {gb:.1f} GB -> {fixed + gb * 1e9 / bw:.0f} s")


if __name__ == "__main__":
    main()
