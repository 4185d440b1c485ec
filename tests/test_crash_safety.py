"""Issue 9: an export interrupted by SIGINT / SIGTERM leaves nothing; one killed outright (SIGKILL) leaves a
build directory that the next export removes, and says so; nothing that is not ours is ever removed."""

from __future__ import annotations

import json
import os
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
    old_engine = tmp_path / f".engine.old-{_dead_pid()}"
    old_engine.mkdir()
    (old_engine / MANIFEST).write_text("{}")
    removed = {p for p, _ in remove_stale_builds(out)}
    assert removed == {dead, old_engine}
    assert live.is_dir() and foreign.is_dir() and other_host.is_dir()


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
