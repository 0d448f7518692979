"""Faults never leave a broken model: interrupted runs, failing writes, no space, a crash between renames.

The interruption tests run a real merge in a subprocess through a test-side wrapper that holds the merge
still once the first output shard is complete and the second has its header (it writes a marker file and
waits there); the test waits for the marker, then signals. No timing is assumed: the merge is midway when
the signal comes, every time.
"""

from __future__ import annotations

import dataclasses

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO_ROOT, merge
from reliability_helpers import assert_no_output, digests, leftovers, pair_recipe, use_recipe

from fluxrecipe.errors import OutputError

SHARD = "60KB"  # the output (about 260 KB) in 5 shards
FIRST = "diffusion_pytorch_model-00001-of-00005.safetensors"

WRAPPER = '''
import os, signal, sys, time
from pathlib import Path

signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the test runner itself ignores SIGINT
from fluxrecipe import writer

marker = Path(os.environ["FLUXRECIPE_TEST_PAUSE_MARKER"])
original = writer.StreamingFile.write


def write(self, data):
    original(self, data)
    if "-00002-of-" in self.path.name and not marker.exists():
        ready = marker.with_suffix(".tmp")
        ready.write_text(str(self.path))
        ready.rename(marker)  # shard 1 is complete, shard 2 has its header: midway
        while True:  # hold still until the test signals
            time.sleep(0.05)


writer.StreamingFile.write = write
sys.argv = ["fluxrecipe", *sys.argv[1:]]
from fluxrecipe.__main__ import main

main()
'''


def options(out: Path, *more: str) -> list[str]:
    return [f"output={out}", f"shard_size={SHARD}", "progress=false", *more]


def start_paused_merge(tmp_path: Path, recipe: str, out: Path, *more: str) -> tuple[subprocess.Popen, Path]:
    """Start a merge subprocess and return once it holds still midway (shard 1 written, shard 2 begun)."""
    wrapper = tmp_path / "paused_merge.py"
    wrapper.write_text(WRAPPER)
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FLUXRECIPE_TEST_PAUSE_MARKER": str(marker), "HYDRA_FULL_ERROR": "0"}
    log = open(tmp_path / "stderr.txt", "w")
    args = [sys.executable, str(wrapper), recipe, *options(out, *more), f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    deadline = time.monotonic() + 300  # a guard against a hang, not a timed assertion
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the merge ended before it was midway (exit {proc.returncode}):\n{(tmp_path / 'stderr.txt').read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the merge never reached its second shard")
        time.sleep(0.05)
    return proc, marker


@pytest.fixture
def recipe(tmp_path, monkeypatch, schnell, krea) -> str:
    return use_recipe(monkeypatch, tmp_path / "recipes", "pair", pair_recipe(schnell, krea))


def verified(out: Path) -> None:
    from fluxrecipe.verify import verify_folder

    assert verify_folder(out).problems == []
    assert leftovers(out) == [out.name]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGHUP", "SIGKILL"])
def test_interrupted_merge_leaves_nothing_and_rerun_succeeds(tmp_path, recipe, sig):
    out = tmp_path / "out"
    proc, marker = start_paused_merge(tmp_path, recipe, out)
    partial = tmp_path / ".out.fluxrecipe-partial"
    assert (partial / FIRST).is_file() and Path(marker.read_text()).parent == partial and not out.exists()

    proc.send_signal(sig)
    code = proc.wait(timeout=300)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert partial.is_dir()  # nothing could clean up: the next run must
    else:
        assert code == 130, stderr
        assert "interrupted; nothing was left under the output's name" in stderr and "Traceback" not in stderr
        assert_no_output(out)

    merge([recipe, *options(out)])  # the next run removes what a killed one left, and succeeds
    verified(out)


# --- faults inside the process -----------------------------------------------------------------------------


class FailingOs:
    """`os` as fluxrecipe.writer sees it, with write failing (ENOSPC) once `budget` bytes were written, or
    fsync failing (EIO)."""

    def __init__(self, write_budget: int | None = None, fail_fsync: bool = False):
        self.left, self.fail_fsync, self.written = write_budget, fail_fsync, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if self.left is not None:
            if self.left <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = memoryview(data)[: self.left]
            self.left -= len(data)
        n = os.write(fd, data)
        self.written += n
        return n

    def fsync(self, fd):
        if self.fail_fsync:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.fsync(fd)


def test_no_space_midway_leaves_nothing(tmp_path, monkeypatch, recipe):
    from fluxrecipe import writer

    failing = FailingOs(write_budget=150_000)  # past the first two shards
    monkeypatch.setattr(writer, "os", failing)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"\.out\.fluxrecipe-partial/diffusion_pytorch_model-0000[3-5]-of-00005\.safetensors: write failed: No space left on device"):
        merge([recipe, *options(out)])
    assert failing.written == 150_000
    assert_no_output(out)
    monkeypatch.setattr(writer, "os", os)
    merge([recipe, *options(out)])
    verified(out)


def test_flush_failure_leaves_nothing(tmp_path, monkeypatch, recipe):
    from fluxrecipe import writer

    monkeypatch.setattr(writer, "os", FailingOs(fail_fsync=True))
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="flushing to disk failed: Input/output error"):
        merge([recipe, *options(out)])
    assert_no_output(out)


def test_crash_midway_leaves_nothing(tmp_path, monkeypatch, recipe):
    """A bug (any exception) in the middle of the arithmetic: the traceback is kept, and no output is left."""
    from fluxrecipe import ops

    calls = []

    real = ops.OPS["lerp"]

    def broken_lerp(xs, alpha):
        calls.append(1)
        if len(calls) > 40:
            raise RuntimeError("a bug in an op")
        return real.fn(xs, alpha=alpha)

    monkeypatch.setitem(ops.OPS, "lerp", dataclasses.replace(real, fn=broken_lerp))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="a bug in an op"):
        merge([recipe, *options(out, "threads=2")])
    assert_no_output(out)


def test_failed_overwrite_keeps_the_previous_model(tmp_path, monkeypatch, recipe):
    from fluxrecipe import writer

    out = tmp_path / "out"
    merge([recipe, *options(out)])
    before = digests(out)
    monkeypatch.setattr(writer, "os", FailingOs(write_budget=150_000))
    with pytest.raises(OutputError, match="No space left on device"):
        merge([recipe, *options(out, "overwrite=true", "recipe.rules.0.op=lerp:0.25")])
    assert digests(out) == before
    verified(out)


def test_killed_between_the_renames_of_an_overwrite(tmp_path, recipe):
    """A run killed after moving the previous model aside and before moving the new one in: the next run puts
    the previous model back (and removes the stale partial folder and lock) before anything else."""
    out = tmp_path / "out"
    merge([recipe, *options(out)])
    before = digests(out)
    out.rename(tmp_path / ".out.fluxrecipe-previous")
    (tmp_path / ".out.fluxrecipe-partial").mkdir()
    (tmp_path / ".out.fluxrecipe-partial" / FIRST).write_bytes(b"half a shard")
    (tmp_path / ".out.fluxrecipe-lock").touch()
    with pytest.raises(OutputError, match="already exists"):  # the restored model is not replaced without overwrite=true
        merge([recipe, *options(out)])
    assert digests(out) == before
    verified(out)


def test_another_run_writing_the_same_output(tmp_path, recipe):
    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.fluxrecipe-lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(OutputError, match="another fluxrecipe run is writing this output right now"):
            merge([recipe, *options(out)])
        assert not out.exists() and not (tmp_path / ".out.fluxrecipe-partial").exists()
    finally:
        os.close(fd)


def test_free_space_is_checked_before_the_first_byte(tmp_path, monkeypatch, recipe):
    import shutil

    seen = []

    def nearly_full(path):
        seen.append(sorted(os.listdir(path)))
        return SimpleNamespace(total=10**12, used=10**12 - 1000, free=1000)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=rf"{tmp_path}: not enough free space: the output needs \d+\.\d\d MB, 1\.00 KB are free"):
        merge([recipe, *options(out)])
    assert seen == [[]]  # asked once, with the temporary folder still empty: not a byte was written
    assert_no_output(out)


def test_interrupted_between_the_renames_of_an_overwrite(tmp_path, monkeypatch, recipe):
    """Ctrl-C after the previous model was moved aside and before the new one is moved in: the previous
    model is put back at once, not only by the next run."""
    import pathlib

    out = tmp_path / "out"
    merge([recipe, *options(out)])
    before = digests(out)
    rename = pathlib.Path.rename

    def interrupted(self, target):
        if self.name.endswith(".fluxrecipe-partial"):
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge([recipe, *options(out, "overwrite=true", "recipe.rules.0.op=lerp:0.25")])
    assert digests(out) == before and leftovers(out) == ["out"]
