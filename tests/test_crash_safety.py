"""Builds (export/workdir.py, build.py): an export interrupted by SIGINT / SIGTERM leaves nothing; one killed outright (SIGKILL) leaves a
build directory that the next export removes, and says so; nothing that is not ours is ever removed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from star_export.export.workdir import make_build_dir, remove_stale_builds
from star_export.manifest import BUILD_MARKER, MANIFEST

STAR_EXPORT = str(Path(sys.executable).parent / "star-export")


def _default_signals():
    """A terminal's child: SIGINT handled (a test runner's worker may ignore it, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(out: Path) -> subprocess.Popen:
    args = [STAR_EXPORT, "--model", "tiny-llava", "--out", str(out), "--no-validate"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def _wait_for_graphs(out: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The build directory, once the exporter has written its first graph into it (mid-export)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for build in out.parent.glob(f".{out.name}.tmp-*"):
            if (build / BUILD_MARKER).is_file() and list(build.glob("*.onnx")):
                return build
        assert proc.poll() is None, f"export ended early: {proc.communicate()}"
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("no build directory appeared")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_export_leaves_nothing(sig, code, tmp_path):
    out = tmp_path / "engine"
    proc = _start(out)
    _wait_for_graphs(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "nothing half-written was left" in err
    assert list(tmp_path.iterdir()) == []


def test_killed_export_is_cleaned_by_the_next(tmp_path):
    out = tmp_path / "engine"
    proc = _start(out)
    build = _wait_for_graphs(out, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert build.is_dir(), "SIGKILL cannot clean up: the build directory stays"
    again = subprocess.run([STAR_EXPORT, "--model", "tiny-llava", "--out", str(out), "--no-validate"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "Warning" not in again.stderr and "torchvision" not in again.stderr, "library noise is hidden by default"
    assert f"removed {build}" in again.stderr and f"process {proc.pid}, which no longer runs" in again.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["engine"] and (out / MANIFEST).is_file()
    assert not (out / BUILD_MARKER).exists()


def test_only_dead_owners_builds_are_removed(tmp_path):
    out = tmp_path / "engine"
    live = make_build_dir(out)  # ours, this process is alive
    dead = make_build_dir(out)
    (dead / BUILD_MARKER).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    foreign = tmp_path / ".engine.tmp-user"  # looks like ours, but has no marker: never touched
    foreign.mkdir()
    other_host = make_build_dir(out)
    (other_host / BUILD_MARKER).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere"}))
    old_engine = tmp_path / f".engine.old-{_dead_pid()}"  # the engine a dead --force rebuild was replacing
    old_engine.mkdir()
    (old_engine / MANIFEST).write_text("{}")
    out.mkdir()
    (out / MANIFEST).write_text("{}")  # ... and the rebuild had put its new engine in place: the old one goes
    removed = {p for p, _ in remove_stale_builds(out)}
    assert removed == {dead, old_engine}
    assert live.is_dir() and foreign.is_dir() and other_host.is_dir()


def test_an_engine_is_never_deleted_while_out_holds_none(tmp_path):
    """A rebuild killed between its two renames (where the file system cannot exchange two directories) leaves --out
    missing and the previous engine in `.NAME.old-PID`: the next export puts it back instead of deleting it."""
    out = tmp_path / "engine"
    old_engine = tmp_path / f".engine.old-{_dead_pid()}"
    old_engine.mkdir()
    (old_engine / MANIFEST).write_text('{"engine": "previous"}')
    assert remove_stale_builds(out) == []
    assert json.loads((out / MANIFEST).read_text()) == {"engine": "previous"} and not old_engine.exists()


def _can_exchange(where: Path) -> bool:
    from star_export.export.workdir import _exchange

    a, b = where / "a", where / "b"
    a.mkdir(), b.mkdir()
    try:
        return _exchange(a, b)
    finally:
        a.rmdir(), b.rmdir()


def _fake_engine(path: Path, tag: str) -> Path:
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps({"engine": tag}))
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_killed_between_the_swaps_steps_keeps_an_engine(exchange, tmp_path):
    """SIGKILL inside replace_dir, after its first rename: --out still holds a complete engine (the new one after an
    atomic exchange), or the next export restores the previous one; either way no engine is lost."""
    if exchange and not _can_exchange(tmp_path):
        pytest.skip("this file system has no atomic directory exchange (renameat2); the two-renames case covers it")
    out = _fake_engine(tmp_path / "engine", "previous")
    build = make_build_dir(out)
    (build / MANIFEST).write_text(json.dumps({"engine": "new"}))
    script = f"""
import os, signal
from pathlib import Path
from star_export.export import workdir
if not {exchange}:
    workdir._exchange = lambda a, b: False
real = Path.rename
def rename_then_die(self, target):
    real(self, target)
    os.kill(os.getpid(), signal.SIGKILL)
Path.rename = rename_then_die
workdir.replace_dir(Path({str(build)!r}), Path({str(out)!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    remove_stale_builds(out)  # what the next export does first (the build marker names this test's live pid)
    tag = json.loads((out / MANIFEST).read_text())["engine"]
    assert tag == ("new" if exchange else "previous")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "engine"]
    assert all(".tmp-" in n or ".old-" in n for n in leftovers), leftovers


def test_a_second_export_into_the_same_out_is_exit_2(tmp_path):
    out = tmp_path / "engine"
    first = _start(out)
    _wait_for_graphs(out, first)
    second = subprocess.run([STAR_EXPORT, "--model", "tiny-llava", "--out", str(out), "--no-validate"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 2 and "another star-export is writing --out" in second.stderr, second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"] and (out / MANIFEST).is_file()


def test_force_through_a_symlink_replaces_its_target_and_keeps_the_link(tiny_engine, tmp_path):
    from star_export.cli import export_main

    target = tmp_path / "store" / "engine"
    target.parent.mkdir()
    shutil.copytree(tiny_engine, target)
    link = tmp_path / "current"
    link.symlink_to(target)
    assert export_main(["--out", str(link), "--force", "--no-validate", "--quiet", "--max-new-tokens", "4"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads((target / MANIFEST).read_text())["limits"]["max_new_tokens"] == 4
    assert sorted(p.name for p in target.parent.iterdir()) == ["engine"]


def test_a_full_disk_is_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Up front (too little free space for the planned engine) and mid-write (ENOSPC from any writer)."""
    import errno

    from star_export.cli import export_main
    from star_export import build
    from star_export.export import workdir

    out = tmp_path / "engine"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(workdir.shutil, "disk_usage", lambda p: usage._replace(free=1024))
    assert export_main(["--out", str(out), "--no-validate", "--quiet"]) == 2
    assert "no space left for the engine" in capsys.readouterr().err
    monkeypatch.undo()

    failures = (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "embed_tokens.npy"),  # what Python's writers raise
                Exception(f"{os.strerror(errno.ENOSPC)} (os error {errno.ENOSPC})"))  # what the Rust tokenizers raise
    for failure in failures:
        def full(loaded, schedule, directory, failure=failure, **kwargs):  # the engine's first write fails: the disk is full
            (directory / "vision.onnx").write_bytes(b"partial")
            raise failure
        monkeypatch.setattr(build, "write_engine", full)
        assert export_main(["--out", str(out), "--no-validate", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "no space left on the device" in err and "take about" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_short_write_on_a_full_file_system_counts_as_full(tmp_path, monkeypatch):
    """torch.onnx's writer reports a short write as an OSError without errno: full only when the disk is."""
    from star_export.export import workdir

    short = RuntimeError("export failed")
    short.__cause__ = OSError("35392 requested and 12288 written")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(workdir.shutil, "disk_usage", lambda p: usage._replace(free=workdir.FULL_BELOW * 100))
    assert not workdir.disk_full(short, tmp_path) and not workdir.disk_full(ValueError("a bug"), tmp_path)
    monkeypatch.setattr(workdir.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    assert workdir.disk_full(short, tmp_path) and not workdir.disk_full(ValueError("a bug"), tmp_path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_force_replaces_an_engine_or_an_empty_directory(tmp_path, capsys):
    from star_export.export.workdir import OutDirError, check_out_dir

    empty, engine, user = tmp_path / "empty", tmp_path / "engine", tmp_path / "user"
    for d in (empty, engine, user):
        d.mkdir()
    (engine / MANIFEST).write_text("{}")
    (user / "thesis.tex").write_text("years of work")
    check_out_dir(empty, force=True)
    check_out_dir(engine, force=True)
    with pytest.raises(OutDirError, match="not an engine directory"):
        check_out_dir(user, force=True)
    assert (user / "thesis.tex").read_text() == "years of work"
    assert os.listdir(empty) == []
