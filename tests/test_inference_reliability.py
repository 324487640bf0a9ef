"""An inference run delivers all its images or none: a failure midway, Ctrl-C, SIGTERM (issue #14 item 4) and
a full disk each remove every file of the run (and --output_dir if the run created it) and end with one line.

The signals are real (os.kill on this process) and sent at chosen moments from inside the run, so each test
knows where the signal landed. The full disk is a real 64 KiB tmpfs (needs root; skipped otherwise).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from inference_inputs import COMMON, outputs, run_main, tiny
from inference_inputs import one_torch_thread  # noqa: F401 (autouse fixture)

from diffusers_npu import cli, inference
from diffusers_npu.inference import loading, outputs as outputs_module


def ddpm_argv(out, n=4):
    return [*COMMON, "--model", tiny("ddpm"), "--num_images", str(n), "--seed", "0", "--output_dir", str(out)]


def kill_after_images(monkeypatch, n_images, sig=signal.SIGTERM):
    """Send ``sig`` to this process right after image ``n_images`` (PNG + sidecar) is complete."""
    real = outputs_module.OutputWriter._write
    done = {"n": 0}

    def write(self, *args, **kwargs):
        path = real(self, *args, **kwargs)
        done["n"] += 1
        if done["n"] == n_images:
            os.kill(os.getpid(), sig)
        return path

    monkeypatch.setattr(outputs_module.OutputWriter, "_write", write)
    return done


def test_sigterm_after_the_first_image_leaves_nothing(tmp_path, capsys, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "new" / "out"
    done = kill_after_images(monkeypatch, 1)
    rc, _, err = run_main("unconditional", ddpm_argv(out), capsys)
    assert done["n"] == 1  # the signal landed right after a complete image
    assert rc == 143 and err.strip().splitlines()[-1] == "terminated (SIGTERM); removed the 2 file(s) this run had written"
    assert not (tmp_path / "new").exists()  # the folders this run created are gone too
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back

    # a folder that existed keeps what was there before
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.png").write_bytes(b"not ours")
    done = kill_after_images(monkeypatch, 2)
    rc, _, err = run_main("unconditional", ddpm_argv(kept), capsys)
    assert rc == 143 and "removed the 4 file(s)" in err and sorted(os.listdir(kept)) == ["mine.png"]


def test_sigterm_between_png_and_sidecar_removes_the_png(tmp_path, capsys, monkeypatch):
    """The PNG already carries its final name when the sidecar is written; a signal there must not orphan it."""
    real = outputs_module.write_json_atomic
    calls = []

    def write_json(path, data, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            assert os.path.exists(str(path)[:-5] + ".png")  # image 2's PNG is in place
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path, data, **kwargs)

    monkeypatch.setattr(outputs_module, "write_json_atomic", write_json)
    out = tmp_path / "out"
    rc, _, err = run_main("unconditional", ddpm_argv(out, 3), capsys)
    assert rc == 143 and len(calls) == 2 and "removed the 3 file(s)" in err and not out.exists()


def test_ctrl_c_is_the_same_all_or_none(tmp_path, capsys, monkeypatch):
    # Ctrl-C as a terminal delivers it: Python's own SIGINT handler (KeyboardInterrupt), not blocked. In the
    # whole suite something earlier leaves SIGINT otherwise (seen twice, not yet traced: the run then ignores
    # the signal and completes), so the precondition is set here and reported if it was not met.
    found = (signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    out = tmp_path / "out"
    kill_after_images(monkeypatch, 1, signal.SIGINT)
    try:
        rc, _, err = run_main("unconditional", ddpm_argv(out), capsys)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 130, f"rc {rc}; SIGINT handler and blocked before the test: {found}"
    assert err.strip().splitlines()[-1] == "interrupted; removed the 2 file(s) this run had written"
    assert not out.exists()


def test_sigterm_while_loading_and_through_the_cli(tmp_path, capsys, monkeypatch):
    def load_then_term(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM must stop the run before this line")

    monkeypatch.setattr(loading, "load_pipeline", load_then_term)
    out = tmp_path / "out"
    rc = cli.main(["generate", "unconditional", *ddpm_argv(out)])
    err = capsys.readouterr().err
    assert rc == 143 and err.strip() == "terminated (SIGTERM); no image was written" and not out.exists()


def test_failure_midway_removes_this_runs_files(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"not ours")
    real_load = loading.load_pipeline

    def flaky_load(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        calls = {"n": 0}
        real_call = type(pipe).__call__

        class Flaky(type(pipe)):
            def __call__(self, *a, **k):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("device lost")
                return real_call(self, *a, **k)

        pipe.__class__ = Flaky
        return pipe

    monkeypatch.setattr(loading, "load_pipeline", flaky_load)
    args = inference.parse_args("unconditional", ddpm_argv(out, 3))
    with pytest.raises(RuntimeError, match="device lost"):
        inference.run(args)
    assert sorted(os.listdir(out)) == ["keep.png"]  # image 1 and its sidecar were removed again
    args.output_dir = str(tmp_path / "new" / "nested")
    with pytest.raises(RuntimeError):
        inference.run(args)
    assert not (tmp_path / "new").exists()  # folders this run created are gone too


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs with 3 free pages: room for one PNG + sidecar pair (a page each) but not two."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (mnt / "filler").write_bytes(b"\0" * (52 * 1024))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_one_line_and_leaves_nothing(small_disk, capsys):
    out = small_disk / "out"
    rc, stdout, err = run_main("unconditional", ddpm_argv(out), capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err
    m = re.fullmatch(r"error: --output_dir: no space left on the device while writing image (\d) to (.+); the (\d) "
                     r"image\(s\) this run had written were removed again \(free some space or choose another "
                     r"--output_dir\)", lines[-1])
    assert m and m.group(2) == str(out), lines[-1]
    assert int(m.group(3)) == int(m.group(1)) - 1 >= 1 and stdout.count("saved") == int(m.group(3))
    assert sorted(os.listdir(small_disk)) == ["filler"]  # no image, sidecar, temp file or folder of the run
    assert outputs(small_disk) == {}


def test_sigterm_after_the_last_image_keeps_the_finished_set(tmp_path, capsys, monkeypatch):
    """A signal after every image is complete (the writer closed) must not delete finished work."""
    real_exit = outputs_module.OutputWriter.__exit__

    def exit_then_term(self, *exc_info):
        result = real_exit(self, *exc_info)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(outputs_module.OutputWriter, "__exit__", exit_then_term)
    out = tmp_path / "out"
    rc, _, err = run_main("unconditional", ddpm_argv(out, 2), capsys)
    assert rc == 143
    assert err.strip().splitlines()[-1] == ("terminated (SIGTERM) after the run had finished; its 2 image(s) are "
                                            "complete and kept")
    assert len(outputs(out)) == 2
