"""Where an engine is built: a temporary sibling of `--out`, recognisable and owned, renamed into place at the end.

    parent/
      .NAME.tmp-XXXXXXXX/     a build in progress; its marker file names the owning process (pid, host)
      .NAME.old-PID/          the engine being replaced, for the instant of the swap
      NAME/                   the engine (star.json)

Ctrl-C, SIGTERM or any error removes the build directory at once. A build killed outright (SIGKILL, a crash,
power loss) leaves it behind: the next export into the same parent removes the ones whose owner is gone, and
says so. Nothing without our marker (or, for `.old-`, without a star.json) is ever removed, and `--force`
replaces only an engine directory or an empty one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from ..manifest import BUILD_MARKER, MANIFEST


class OutDirError(UserError, ValueError):
    pass


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {str(out)!r} exists and is not a directory: choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutDirError(f"--out {str(out)!r} exists and is not empty: pass --force to replace it, or choose another path")
        if not (out / MANIFEST).is_file():
            raise OutDirError(
                f"--out {str(out)!r} is not an engine directory (no {MANIFEST}) and not empty: --force only replaces "
                "engines written by star-export; move its contents away, or choose another path"
            )
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OutDirError(f"the parent of --out, {str(parent)!r}, does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.is_dir() and not os.access(out, os.W_OK)):
        raise OutDirError(f"--out {str(out)!r} is not writable: choose a directory you can write to")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(directory: Path) -> int | None:
    """The pid that owns a build directory of ours on this host, or None when it is not ours to judge."""
    if ".old-" in directory.name:
        pid = directory.name.rsplit("-", 1)[1]
        return int(pid) if pid.isdigit() and (directory / MANIFEST).is_file() else None
    try:
        marker = json.loads((directory / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int):
        return None
    return marker["pid"]


def remove_stale_builds(out: Path) -> list[tuple[Path, int]]:
    """Remove build directories next to `out` left by processes that no longer run. Returns (path, pid) of each."""
    parent = out.resolve().parent
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if not entry.is_dir() or not entry.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")):
            continue
        pid = _owner(entry)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append((entry, pid))
    return removed


def make_build_dir(out: Path) -> Path:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    except OSError as e:  # e.g. a read-only or virtual file system, where os.access says yes to root
        raise OutDirError(f"--out {str(out)!r} is not writable ({e.strerror}): choose a directory you can write to") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the engine gets the usual directory mode
    (tmp / BUILD_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished build into place; a previous engine at `out` goes only once the new one is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    (out / BUILD_MARKER).unlink(missing_ok=True)
