"""Where an engine is built: a temporary sibling of `--out`, recognisable and owned, renamed into place at the end.

    parent/
      .NAME.tmp-XXXXXXXX/     a build in progress; its marker file names the owning process (pid, host)
      .NAME.old-PID/          the engine being replaced, for the instant of the swap
      NAME/                   the engine (star.json)

      .NAME.lock              held (flock) by the export writing NAME: a second export into NAME exits 2

Ctrl-C, SIGTERM or any error removes the build directory at once. A build killed outright (SIGKILL, a crash,
power loss) leaves it behind: the next export into the same parent removes the ones whose owner is gone, and
says so. Nothing without our marker (or, for `.old-`, without a star.json) is ever removed, and `--force`
replaces only an engine directory or an empty one. The swap of a `--force` rebuild is one atomic exchange of the
two directories (renameat2 RENAME_EXCHANGE), so `--out` always holds a complete engine; where the file system
cannot exchange, it falls back to two renames, and a kill between them leaves the previous engine in `.NAME.old-PID`,
which the next export puts back rather than deletes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError, causes, find_errno
from ..manifest import BUILD_MARKER, MANIFEST


class OutDirError(UserError, ValueError):
    pass


NAME_MAX = 255  # bytes in one path component (Linux file systems)
SUFFIX = len(".tmp-XXXXXXXX") + 1  # the longest name this module adds to --out's


def resolve_out(out: str | Path) -> Path:
    """--out as the absolute path the engine will be written to: a symlink is followed (the engine replaces what it
    points to, and the link stays); refused: the current directory or one above it, a name that is not UTF-8 or
    leaves no room for the build directory's suffix."""
    text = str(out)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OutDirError(
            f"--out {text.encode('utf-8', 'surrogateescape')!r} is not a valid UTF-8 path: choose a UTF-8 name"
        ) from None
    path = Path(os.path.realpath(text)) if os.path.islink(text) else Path(os.path.abspath(text))
    cwd = Path.cwd()
    if path == cwd or path in cwd.parents:
        raise OutDirError(
            f"--out {text!r} is the current directory (or holds it): give the engine a directory of its own, e.g. "
            "--out ./engine"
        )
    for part in path.parts[1:]:
        if len(part.encode()) > NAME_MAX:
            raise OutDirError(
                f"--out {text!r} has a path component of {len(part.encode())} bytes, over the file system's "
                f"{NAME_MAX}: use shorter names"
            )
    if len(path.name.encode()) + SUFFIX > NAME_MAX:
        raise OutDirError(
            f"--out's name {path.name[:40]!r}... is {len(path.name.encode())} bytes; the build directory beside it "
            f"needs at most {NAME_MAX - SUFFIX}: use a shorter name"
        )
    return path


@contextmanager
def out_lock(out: Path):
    """Hold `.NAME.lock` beside --out for the whole export; another export holding it is exit 2. The file is removed
    on release; an acquirer checks that the file it locked is still the one at the path (else it retries)."""
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutDirError(
                f"--out {str(out)!r} is not writable (its lock {path.name!r}: {e.strerror}): choose a directory you "
                "can write to"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutDirError(
                f"another star-export is writing --out {str(out)!r}{f' (process {holder})' if holder else ''}: wait "
                "for it to finish, or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it between our open and our lock: take the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def size_text(nbytes: float) -> str:
    """Bytes as a person reads them: '3.2 GiB', '2.1 MiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def check_disk(out: Path, need: int) -> None:
    """Refuse up front when the file system of --out has less free space than the engine needs."""
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise OutDirError(
            f"no space left for the engine on {str(out.parent)!r}: its weights alone take about {size_text(need)}, "
            f"{size_text(free)} is free: free some space, or choose another --out"
        )


FULL_BELOW = 1 << 20  # free bytes under which a failed write is taken for a full file system


def disk_full(exc: BaseException, where: Path) -> bool:
    """Whether `exc` is a write that failed for want of space: ENOSPC / EDQUOT anywhere in its chain of causes, or
    their text in a message (the Rust tokenizers raise "No space left on device (os error 28)" as a bare Exception),
    or an OSError of any kind (some writers report a short write without errno: "35392 requested and 12288 written")
    while the file system of `where` has less than FULL_BELOW bytes free."""
    if find_errno(exc, errno.ENOSPC, errno.EDQUOT) is not None:
        return True
    texts = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
    chain = list(causes(exc))
    if any(text in str(e) for e in chain for text in texts):
        return True
    try:
        return any(isinstance(e, OSError) for e in chain) and shutil.disk_usage(where).free < FULL_BELOW
    except OSError:
        return False


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {str(out)!r} exists and is not a directory: choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutDirError(
                f"--out {str(out)!r} exists and is not empty: pass --force to replace it, or choose another path"
            )
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
    if (
        not isinstance(marker, dict)
        or marker.get("host") != socket.gethostname()
        or not isinstance(marker.get("pid"), int)
    ):
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
            if ".old-" in entry.name and not (out / MANIFEST).is_file():
                if not out.exists():  # a swap cut between its two renames: the previous engine goes back
                    entry.rename(out)
                continue  # never delete a complete engine while --out holds none
            shutil.rmtree(entry, ignore_errors=True)
            removed.append((entry, pid))
    return removed


def make_build_dir(out: Path) -> Path:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    except OSError as e:  # e.g. a read-only or virtual file system, where os.access says yes to root
        raise OutDirError(
            f"--out {str(out)!r} is not writable ({e.strerror}): choose a directory you can write to"
        ) from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the engine gets the usual directory mode
    (tmp / BUILD_MARKER).write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    )
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished build into place; a previous engine at `out` goes only once the new one is there, and `out`
    is never without a complete engine (an atomic exchange, where the file system has one)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if _exchange(tmp, out):
            tmp.rename(old)  # the previous engine, recognisable as ours to remove if this process dies now
        else:
            out.rename(old)
            tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    (out / BUILD_MARKER).unlink(missing_ok=True)
