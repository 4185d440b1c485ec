"""User errors: the one place that says which failures are the user's to fix (exit 2) and in what words.

Every error the library raises for bad input derives from `UserError`; its message names the problem and the
fix. A few failures of the machine or of other libraries are also the user's to fix (a full disk, a file that
cannot be read); `user_error_from` words them. Anything else is a bug in star-export (exit 3).
"""

from __future__ import annotations

import errno

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UserError(Exception):
    """Bad input or environment; the message says what is wrong and how to fix it."""


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that cleanup runs."""


_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device{where}: free some space, or write elsewhere",
    errno.EDQUOT: "disk quota exceeded{where}: free some space, or write elsewhere",
    errno.EROFS: "read-only file system{where}: write elsewhere",
    errno.EACCES: "permission denied{where}: choose a path you can read and write",
    errno.EPERM: "operation not permitted{where}: choose a path you can read and write",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n`)",
    errno.ENAMETOOLONG: "a file name is too long{where}: use shorter names",
    errno.ELOOP: "too many levels of symbolic links{where}: point at the file itself",
}


# Optional packages, by top-level module, and the extra of pyproject.toml that installs them.
EXTRAS = {
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "tensorrt": "tensorrt",
    "sentencepiece": "checkpoint",
    "matplotlib": "bench",
    "openvino": "openvino",
}


def missing_extra(module: str, what: str) -> UserError:
    extra = EXTRAS[module]
    return UserError(
        f"{what} needs the Python package {module!r}, which is not installed: pip install 'star-export[{extra}]'"
    )


def require_extra(extra: str, what: str) -> None:
    """Exit-2 error naming the extra to install when any package of `extra` cannot be imported (checked up front, so
    that a command does not fail after minutes of work)."""
    import importlib

    for module in (m for m, e in EXTRAS.items() if e == extra):
        try:
            importlib.import_module(module)
        except ImportError:
            raise missing_extra(module, what) from None


def causes(exc: BaseException | None):
    """`exc` and its causes (or contexts), each once: a library may have wrapped the failure that matters."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def user_error_from(exc: BaseException) -> UserError | None:
    """The user's side of an exception, or None when it is not the user's to fix (a bug). A full disk or
    missing memory is found anywhere in the chain of causes (a library may have wrapped it)."""
    if isinstance(exc, UserError):
        return exc
    for exc in causes(exc):
        if isinstance(exc, MemoryError):
            return UserError("out of memory: close other programs, or use a smaller model / batch")
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRAS:
            return missing_extra(exc.name.split(".")[0], "this command")
        if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
            where = f" ({exc.filename})" if exc.filename else ""
            return UserError(_OS_ERRORS[exc.errno].format(where=where))
    return None


def find_errno(exc: BaseException, *codes: int) -> OSError | None:
    """The first OSError with one of `codes` in the chain of causes of `exc` (a library may have wrapped it)."""
    return next((e for e in causes(exc) if isinstance(e, OSError) and e.errno in codes), None)
