"""Checkpoints that cannot be trusted are not used (issue #23): every checkpoint carries a manifest (size and
CRC of every file, checked across ranks before COMPLETE); ``latest`` verifies it, renames a damaged checkpoint
``<name>.damaged`` and falls back to the previous one with one line; an explicitly named damaged checkpoint is
one error line (exit 3); any unreadable file of a checkpoint without a manifest is one line, never a traceback.

One training run makes three checkpoints; each fault case only links them into a fresh folder, damages one
file of the newest and resumes (tests/faults.py)."""
import itertools
import json
import os
import re
import shutil

import pytest

from diffusers_npu import checkpoint as ckpt
from diffusers_npu import manifest
from faults import FAULTS, KINDS, copy_checkpoints, damage, pick
from trainkit import argv, main_rc, same_weights, train, weights

T2I = "text_to_image"
FLAGS = ["--use_ema", "--resume_from_checkpoint", "latest"]


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, embedded_paths):
    out = tmp_path_factory.mktemp("three") / "o"
    train(T2I, out, *FLAGS, steps=3, ckpt=1)
    return out


def test_manifest_lists_every_file_and_the_marker_vouches_for_it(three_checkpoints):
    folder = three_checkpoints / "checkpoint-3"
    m = json.load(open(folder / manifest.MANIFEST))
    listed = {rel for rel, _ in manifest.listing(str(folder))}
    assert set(m["files"]) == listed and pick(str(folder), "optimizer") in listed and "unet/diffusion_pytorch_model.safetensors" in listed
    for rel, entry in m["files"].items():
        assert entry["size"] == os.path.getsize(folder / rel)
        assert entry["crc32"] == manifest.file_crc(str(folder / rel)) and entry["hashed_by"] == 0
    marker = ckpt.read_marker(str(folder))
    assert marker["manifest_crc32"] == manifest.file_crc(str(folder / manifest.MANIFEST))
    assert not os.path.exists(folder / manifest.RANKS_DIR)
    assert ckpt.check(str(folder)) is None


def test_damaged_newest_checkpoint_falls_back_with_one_line_to_the_same_bits(three_checkpoints, tmp_path, capsys):
    """7 kinds of file x {flipped bytes, truncated, deleted}, 1 process. Every case goes through the resume's
    selection (verify, rename, fall back); one case per kind (the faults rotating) also trains on to the end
    and must match the uninterrupted run bit for bit -- after the fallback every case resumes from the same
    intact checkpoint-2, so the other 14 would repeat the same computation."""
    expected = weights(three_checkpoints)
    for seed, (kind, fault) in enumerate(itertools.product(KINDS, FAULTS)):
        out = tmp_path / f"{kind}-{fault}"
        copy_checkpoints(str(three_checkpoints), str(out))
        rel = pick(str(out / "checkpoint-3"), kind)
        what = damage(str(out / "checkpoint-3"), rel, fault, seed)
        full_run = seed % len(FAULTS) == (seed // len(FAULTS)) % len(FAULTS)
        if full_run:
            rc, stdout, err = main_rc(T2I, argv(out, 3, *FLAGS), capsys)
            assert rc == 0 and "Traceback" not in err + stdout, f"{what}: rc {rc}\n{err[-2000:]}"
            assert f"resumed from {out / 'checkpoint-2'} at step 2" in stdout, what
            assert same_weights(weights(out), expected), f"{what}: the resumed run ended on other weights"
        else:
            capsys.readouterr()
            assert ckpt.resolve_resume("latest", str(out)) == str(out / "checkpoint-2"), what
            stdout = capsys.readouterr().out
        lines = [ln for ln in stdout.splitlines() if "is damaged" in ln]
        assert len(lines) == 1 and f"checkpoint-3/{rel}" in lines[0] and "renamed to checkpoint-3.damaged" in lines[0], \
            (what, lines)
        assert os.path.isdir(out / "checkpoint-3.damaged") and not os.path.exists(out / "checkpoint-3"), what
        assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2], what  # never counted as a checkpoint
        shutil.rmtree(out)


def test_damaged_checkpoint_named_explicitly_is_one_error_line(three_checkpoints, tmp_path, capsys):
    out = tmp_path / "o"
    copy_checkpoints(str(three_checkpoints), str(out))
    opt = pick(str(out / "checkpoint-3"), "optimizer")  # the optimizer state's file (DCP: optimizer/__0_0.distcp)
    damage(str(out / "checkpoint-3"), opt, "flip", 0)
    rc, _, err = main_rc(T2I, argv(out, 3, "--use_ema", "--resume_from_checkpoint", "checkpoint-3"), capsys)
    assert rc == 3 and err.count("\n") == 1 and err.startswith(
        f"error: --resume_from_checkpoint: {out / 'checkpoint-3'} is damaged: checkpoint-3/{opt} does not "
        f"hold what was written (crc32 "), err
    assert ckpt.is_complete(str(out / "checkpoint-3"))  # named by the user: not renamed
    # sizes-only verification does not read the content: the flipped bytes go unnoticed (documented trade-off)
    assert ckpt.check(str(out / "checkpoint-3"), hashes=False) is None


def _as_earlier_version(folder):
    """Remove the manifest and write the marker of the previous layout (no manifest fields)."""
    os.remove(folder / manifest.MANIFEST)
    marker = ckpt.read_marker(str(folder))
    (folder / ckpt.MARKER).write_text(json.dumps({k: marker[k] for k in ("step", "world_size", "layout")}))


def test_unreadable_files_of_a_checkpoint_without_manifest_are_one_line(three_checkpoints, tmp_path, capsys):
    """Earlier versions' checkpoints have no manifest: they still resume (a log line says so), and a truncated
    or deleted file of any kind is one CheckpointDamaged line naming it (exit 3), never a traceback."""
    out = tmp_path / "o"
    copy_checkpoints(str(three_checkpoints), str(out), names=("checkpoint-2",))
    _as_earlier_version(out / "checkpoint-2")
    rc, stdout, _ = main_rc(T2I, argv(out, 3, *FLAGS), capsys)
    assert rc == 0 and "has no manifest.json (written by an earlier version)" in stdout
    assert same_weights(weights(out), weights(three_checkpoints))
    for seed, (kind, fault) in enumerate(itertools.product(KINDS, ("truncate", "delete"))):
        case = tmp_path / f"{kind}-{fault}"
        copy_checkpoints(str(three_checkpoints), str(case), names=("checkpoint-2",))
        _as_earlier_version(case / "checkpoint-2")
        rel = pick(str(case / "checkpoint-2"), kind)
        what = damage(str(case / "checkpoint-2"), rel, fault, seed)
        rc, _, err = main_rc(T2I, argv(case, 3, *FLAGS), capsys)
        # a missing file is an incomplete checkpoint (exit 3), or for a model folder "holds no weights" (exit 2)
        assert rc in ((3,) if fault == "truncate" else (2, 3)) and err.count("\n") == 1 and "Traceback" not in err, \
            (what, rc, err[-3000:])
        named = os.path.basename(rel) if kind != "weights" and kind != "ema" else rel.split("/")[0]
        assert err.startswith("error: --resume_from_checkpoint: ") and named in err, (what, err)
        shutil.rmtree(case)


# ------------------------------------------------------------------------------------------- empty captions
@pytest.mark.parametrize("captions, expected", [
    (["", " ", "", ""], "caption column 'text': every caption of the training data is empty"),
    ([["a digit"], [""], ["", " "], [" "]], "caption column 'text': 3 of 4 captions (75%) of the training data are empty"),
    (["a digit", "", "two", "three"], None),
])
def test_empty_captions_are_warned_in_one_line_naming_the_column(tmp_path, caplog, captions, expected):
    from PIL import Image

    from diffusers_npu.data.sources import load_training_data

    folder = tmp_path / "data"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    with caplog.at_level("WARNING"):
        load_training_data(train_data_dir=str(folder), caption_column="text")
    warned = [r.getMessage() for r in caplog.records if "caption column" in r.getMessage()]
    assert warned == ([] if expected is None else [warned[0]]) and (expected is None or warned[0].startswith(expected))


# ------------------------------------------------------------------------------------------- two processes
def test_two_ranks_share_the_hashing_refuse_node_local_folders_and_agree_on_the_fallback(tmp_path):
    """torchrun, 2 processes, gloo: the manifest holds both ranks' CRCs; ranks writing into folders of their
    own (node-local disks) are refused on every rank with one line; a damaged newest checkpoint makes both
    ranks resume from the same previous one."""
    from trainkit import REPO, run_subprocess

    out = tmp_path / "o"
    r = run_subprocess(["python", "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
                        os.path.join(REPO, "tests", "manifest_worker.py"), str(out)], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ok = re.findall(r"OK (\d) (.+?)(?=OK \d |$)", r.stdout, re.M)  # the two ranks' lines may interleave
    files = "['shard_0.bin', 'shard_1.bin', 'train_state.json']"
    for rank in (0, 1):
        mine = [text for r_, text in ok if r_ == str(rank)]
        assert f"hashed_by [0, 1] files {files}" in mine, r.stdout
        assert "resume checkpoint-1" in mine, r.stdout
        refused = [ln for ln in mine if ln.startswith("refused: ")]
        assert len(refused) == 1 and "rank 1 does not see the same files in " in refused[0] and \
            "the output folder must be on a filesystem shared by all nodes" in refused[0], r.stdout
    assert os.path.isdir(out / "checkpoint-2.damaged") and (r.stdout + r.stderr).count("is damaged") == 1
    assert not [p for p in os.listdir(tmp_path) if "local" in p and
                any(ckpt.is_complete(str(tmp_path / p / c)) for c in os.listdir(tmp_path / p))]


@pytest.mark.slow
def test_two_process_fsdp_resume_falls_back_from_each_kind_of_damaged_file(tmp_path, embedded_paths):
    """2 processes under FSDP (each rank writes its own UNet, EMA and DCP optimizer shards and RNG file): one run
    makes three checkpoints; then, in the same process group, each kind of file of the newest checkpoint is
    damaged in turn (rank 1's own file where the kind has one per rank; the faults rotate) and the same command
    resumes: one line names the damaged file, both ranks fall back to checkpoint-2 and end bit-identical to the
    uninterrupted run, with no traceback."""
    from test_distributed import _job, _torchrun

    fsdp = [*FLAGS, "--distributed", "fsdp"]
    src = tmp_path / "three"
    jobs = [_job("three", T2I, src, 3, *fsdp, ckpt=1)]
    for seed, kind in enumerate(KINDS):
        jobs.append(_job(kind, T2I, tmp_path / kind, 3, *fsdp, ckpt=1,
                         damage={"src": str(src), "kind": kind, "fault": FAULTS[seed % len(FAULTS)], "seed": seed}))
    results, stdout = _torchrun(tmp_path, jobs, 29627)
    assert all(rc == 0 for ranks in results.values() for rc, _ in ranks.values()), results
    assert "Traceback" not in stdout, stdout[-3000:]
    expected = weights(src)
    assert len(set(json.load(open(src / "unet" / "diffusion_pytorch_model.safetensors.index.json"))["weight_map"]
                   .values())) == 2  # the final UNet too was written by both ranks (sharded layout)
    for kind in KINDS:
        out = tmp_path / kind
        (rel, what), = re.findall(rf"^DAMAGE {kind} (\S+) (.+)$", stdout, re.M)
        if kind in ("weights", "ema", "optimizer", "rng"):
            assert re.search(r"(00002-of-|__1_|rng_1)", rel), (kind, rel)  # rank 1's own file
        lines = [ln for ln in stdout.splitlines() if "is damaged" in ln and str(out) in ln]
        assert len(lines) == 1 and f"checkpoint-3/{rel}" in lines[0] and "renamed to checkpoint-3.damaged" in lines[0], \
            (what, lines)
        assert f"resumed from {out / 'checkpoint-2'} at step 2" in stdout, what
        assert same_weights(weights(out), expected), f"{what}: the resumed run ended on other weights"
