"""Several processes and nodes on one CPU machine (torchrun, gloo): two simulated nodes of two processes each
match one process with the same global batch when they share --output_dir, are refused at start when their
folders are node-local, and when a rank dies the survivors say so in one line; the launcher keeps the
documented exit codes (4, 2) with two processes and still writes the result lines and CaseName.log.

Each torchrun launch runs several jobs in one process group (tests/dist_worker.py) to keep CI time down.
"""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from trainkit import QUIET, REPO, train, weights

WORKER = os.path.join(REPO, "tests", "dist_worker.py")
# Same global batch, per-sample noise, AdamW at a huge epsilon: the update is proportional to the gradient,
# so comparing weights compares gradients (see test_distributed.py).
COMPARE = ["--per_sample_noise", "--learning_rate", "1.0", "--adam_epsilon", "1e3", "--adam_weight_decay", "0"]
TIMEOUT = "1234"  # --nccl_timeout for every job: the process group must report it


def _job(name, out, steps, *extra, batch=1, ckpt=1000, **kw):
    args = ["--output_dir", str(out), "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            "--checkpointing_steps", str(ckpt), "--nccl_timeout", TIMEOUT, *QUIET, *map(str, extra)]
    return {"name": name, "task": "text_to_image", "args": args, **kw}


def _two_nodes(tmp_path, jobs, port):
    """torchrun --nnodes 2 --nproc_per_node 2 twice on this machine (node ranks 0 and 1); returns
    ``{global_rank: (stdout, stderr)}`` from torchrun's per-rank log files and the two exit codes."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--log-dir", str(tmp_path / f"logs{node}"), "--redirects", "3", WORKER, str(spec)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    ranks = {}
    for node in (0, 1):
        for local in (0, 1):
            found = glob.glob(str(tmp_path / f"logs{node}" / "*" / "attempt_0" / str(local)))
            assert found, outs[node][-3000:]
            read = lambda name: open(os.path.join(found[0], name)).read()  # noqa: E731
            ranks[node * 2 + local] = (read("stdout.log"), read("stderr.log"))
    return ranks, [p.returncode for p in procs], outs


def _results(ranks):
    out = {}
    for rank, (stdout, _) in ranks.items():
        for name, r, rc, timeout in re.findall(r"^RESULT (\S+) rank (\d) rc (\d+) checksum \S+ engine \S+ module \S+ timeout (\S+)$",
                                               stdout, re.M):
            out.setdefault(name, {})[int(r)] = (int(rc), float(timeout))
    return out


@pytest.mark.slow
def test_two_simulated_nodes_share_a_folder_and_refuse_local_ones(tmp_path, embedded_paths):
    shared = tmp_path / "shared"
    jobs = [
        # node-local folders (a different path per node stands for each node's own disk)
        _job("local", tmp_path / "node{node}" / "out", 2, *COMPARE, "--distributed", "fsdp", ckpt=1),
        # one shared folder: 4 ranks x batch 1 under FSDP, a checkpoint at every step
        _job("shared", shared, 2, *COMPARE, "--distributed", "fsdp", ckpt=1),
    ]
    ranks, codes, outs = _two_nodes(tmp_path, jobs, 29641)
    results = _results(ranks)

    # --nccl_timeout reached the process group of every rank
    assert {timeout for job in results.values() for _, timeout in job.values()} == {float(TIMEOUT)}

    # node-local folders: refused at start on every rank, in one line naming the ranks and host that did not
    # see rank 0's file; nothing was written
    assert {r: rc for r, (rc, _) in results["local"].items()} == {0: 2, 1: 2, 2: 2, 3: 2}
    host = socket.gethostname()
    for rank, (_, stderr) in ranks.items():
        line = next(l for l in stderr.splitlines() if "is not one shared folder" in l)
        assert line.startswith(f"error: --output_dir {tmp_path}/node{rank // 2}/out is not one shared folder: "
                               f"ranks 2, 3 (host {host}) did not see the file rank 0 (host {host}) wrote there.")
        assert line.endswith("give that path on every node; nothing was trained")
    for node in (0, 1):
        folder = tmp_path / f"node{node}" / "out"
        assert not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()], list(folder.rglob("*"))

    # one shared folder: the 4 ranks match one process with the same global batch (4)
    assert {r: rc for r, (rc, _) in results["shared"].items()} == {0: 0, 1: 0, 2: 0, 3: 0}
    one = tmp_path / "one"
    train("text_to_image", one, *COMPARE, steps=2, batch=4)
    base = weights(embedded_paths["model"])
    d4 = torch.cat([(weights(shared)[k] - base[k]).flatten() for k in base])
    d1 = torch.cat([(weights(one)[k] - base[k]).flatten() for k in base])
    assert d1.abs().max() > 0
    assert (d4 - d1).abs().max() <= 1e-3 * d1.abs().max()  # 0.1% of the largest update, as test_distributed
    # every COMPLETE checkpoint holds every rank's shard and RNG state
    for ck in sorted(shared.glob("checkpoint-*")):
        assert (ck / "COMPLETE").exists()
        assert sorted(p.name for p in ck.glob("rng_*.pt")) == [f"rng_{r}.pt" for r in range(4)]
        index = json.load(open(ck / "unet" / "diffusion_pytorch_model.safetensors.index.json"))
        files = set(index["weight_map"].values())
        assert len(files) == 4 and all((ck / "unet" / f).exists() for f in files)



@pytest.mark.slow
def test_two_process_launch_keeps_the_exit_codes_and_writes_the_result_lines(tmp_path, capsys, embedded_paths,
                                                                             monkeypatch):
    """torchrun reports any failing rank as exit code 1; the launcher exits with the rank's own code."""
    from diffusers_npu import launch
    from diffusers_npu.launch import devices

    if devices.usable_cpu_cores() < 2:
        pytest.skip("needs 2 usable CPU cores")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "PORT", "ASCEND_DEVICE_ID"):
        monkeypatch.delenv(var, raising=False)
    common = ["text_to_image", "--num_devices=2", f"--log_dir={tmp_path}", f"--output_dir={tmp_path}/o",
              "--batch_size=2", "--max_train_steps=2"]
    # a learning check below its threshold after training (1 image per digit: tests/short_check_trainer.py)
    rc = launch.main([*common, f"--script={REPO}/tests/short_check_trainer.py", "--learning_check=1",
                      "--", "--report_to=none"])
    out, err = capsys.readouterr()
    assert rc == 4, out[-2000:] + err[-3000:]
    lines = out.splitlines()
    i = lines.index("------------------ Final result ------------------")
    assert lines[i + 1].startswith("Final Performance images/sec : ") and lines[i + 2].startswith("Final Train Loss")
    assert re.match(r"Learning check: [0-9.]+% of 10 generated digits", lines[i + 4])
    case = dict(l.rstrip("\n").split(" = ", 1) for l in open(tmp_path / "StableDiffusion_text_to_image_bs2_2p_acc.log"))
    assert case["RankSize"] == "2" and float(case["ActualFPS"]) > 0
    assert re.fullmatch(r"Learning check FAILED: [0-9.]+% of the generated digits read as the prompt's digit, below "
                        r"the threshold 90\.0% \(--learning_check_min\); see learning_check\.png in the output "
                        r"folder", err.strip().splitlines()[-1])
    # a bad flag value: exit 2, each rank's one line, no torchrun traceback
    rc = launch.main([*common, "--train_data_dir=/nonexistent/data", "--", "--report_to=none"])
    out, err = capsys.readouterr()
    assert rc == 2, err[-3000:]
    assert err.splitlines()[0].startswith("Training failed (exit code 2). Last lines of ")
    host = socket.gethostname()
    assert (f"rank 0 (host {host}) exited 2: error: --train_data_dir: /nonexistent/data is not a folder "
            f"(expected images + metadata.jsonl)") in err.splitlines()
    assert "ChildFailedError" not in err and "Traceback" not in err


def test_preemption_of_two_processes_through_the_launcher_exits_0(tmp_path, capsys, monkeypatch):
    """SIGTERM to the launcher goes to torchrun's workers, not torchrun: they save and exit 0, torchrun exits 0
    (no SignalException), and the launcher says Pre-empted, exit 0 (the stand-in trainer of test_launchers)."""
    from test_launchers import FAKE_TRAINER

    from diffusers_npu import launch
    from diffusers_npu.launch import devices

    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAINER)
    monkeypatch.setenv("FAKE_ARGV_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_MODE", "wait_for_term")
    monkeypatch.setattr(devices, "count_devices", lambda: ("cpu", 2))
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "PORT", "ASCEND_DEVICE_ID"):
        monkeypatch.delenv(var, raising=False)
    log = tmp_path / "train_0.log"

    def term_when_both_train():
        deadline = time.time() + 120
        while time.time() < deadline:
            if log.exists() and log.read_text().count("step 1/6 ") == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    sender = threading.Thread(target=term_when_both_train)
    sender.start()
    rc = launch.main(["text_to_image", "--num_devices=2", f"--script={fake}", f"--log_dir={tmp_path}",
                      f"--output_dir={tmp_path}/o", "--max_train_steps=6", "--learning_check=0"])
    sender.join()
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert out.splitlines()[-1].startswith("Pre-empted at step 1 of 6: a checkpoint was saved.")
    text = log.read_text()
    assert "SignalException" not in text and "ChildFailedError" not in text  # torchrun itself ended cleanly


@pytest.mark.slow
def test_two_simulated_nodes_report_a_lost_rank(tmp_path, embedded_paths):
    lost = tmp_path / "lost"
    host = socket.gethostname()
    # rank 3 dies after step 3 (SIGKILL), before the checkpoint of step 3: the last good one is step 2
    jobs = [_job("lost", lost, 6, "--distributed", "ddp", ckpt=1, kill_at=3, sigterm_rank=3)]
    ranks, codes, outs = _two_nodes(tmp_path, jobs, 29643)
    results = _results(ranks)
    # a rank dies: each survivor says which one and where to resume from, in one line, with no traceback
    assert 3 not in results["lost"] and codes == [1, 1]
    for rank in (0, 1, 2):
        stdout, stderr = ranks[rank]
        assert f"RESULT lost rank {rank} rc 3 " in stdout
        lines = [l for l in stderr.splitlines() if l.startswith("error:") and "not one shared folder" not in l]
        assert len(lines) == 1 and re.fullmatch(
            rf"error: the job lost a process: rank 3 \(host {re.escape(host)}, pid \d+\) has ended; the last "
            rf"complete checkpoint is {re.escape(str(lost))}/checkpoint-2: rerun the same command \(with "
            rf"--resume_from_checkpoint latest\) to continue from it", lines[0]), lines
        assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-2000:]
