"""ONNX Runtime's CPU thread pools: one mode per process, which ONNX Runtime fixes at the process's first session.

- "shared": one global pool for every session, its idle threads spinning. A decode step runs two sessions back to back
  (a prefill four); with a pool per session, the spinning threads of the graph that just finished took the cores the
  next one needed (measured on 2 cores: a 2-layer decode step 100 ms with spinning, 65 ms alone), so they had to sleep,
  and each parallel kernel then waited for its threads to wake. One pool needs neither. Measured (alternating
  processes, 2 cores, docs/performance.md): decode ms/step 0.92x (int4, 4
  layers), 0.94x (float32, 4 layers), 0.99x (int4, full size); prefill 1.01x, 0.87x, 0.90x; the same tokens and peak
  RSS.
- "per-session": a pool per session, idle threads sleeping.

Once the global pool exists, ONNX Runtime refuses every session created with `use_per_session_threads` left on ("...
must be false when using a global thread pool"), including those of other libraries in the process (polygraphy and
onnx-graphsurgeon's constant folding fail so). So the shared pool is the default only where star-export owns the
process: its commands and the Triton model call `claim_process()`. A program that imports `Engine` gets a pool per
session unless it sets $STAR_ORT_THREAD_POOL=shared itself.
"""

from __future__ import annotations

import os
import warnings

from ..config import THREAD_POOLS
from ..errors import UserError

THREAD_POOL_ENV = "STAR_ORT_THREAD_POOL"
_mode: str | None = None
_size: int | None = None  # the shared pool's size as asked for at the first call (None: ONNX Runtime's default)


def claim_process() -> None:
    """For an entry point that owns its process (a star-* command, the Triton model, a measurement script): the shared
    pool, unless $STAR_ORT_THREAD_POOL says otherwise. Call it before the first session; it imports nothing."""
    os.environ.setdefault(THREAD_POOL_ENV, "shared")


def thread_pool(threads: int | None = None, mode: str | None = None) -> str:
    """This process's mode: `mode` (RuntimeOptions.thread_pool), else $STAR_ORT_THREAD_POOL, else "per-session"; fixed
    by the first call, which comes before the process's first session (a later call asking for the other mode is a
    user error). `threads`: the shared pool's size, taken at that first call (default: ONNX Runtime's, one per
    physical core); a later call cannot change it, and warns when it asks for another."""
    global _mode, _size
    if _mode is not None and mode is not None and mode != _mode:
        raise UserError(
            f"--thread-pool {mode}: this process's ONNX Runtime sessions already run on the {_mode!r} thread pool, "
            "fixed by its first session; choose the mode before any session is created"
        )
    if _mode == "shared" and threads and threads != _size:
        warnings.warn(
            f"ONNX Runtime's shared thread pool has {_size or 'its default number of'} threads, fixed by this "
            f"process's first session; {threads} asked for later ({THREAD_POOL_ENV}=per-session gives each session its "
            "own)",
            RuntimeWarning,
            stacklevel=3,
        )
    if _mode is None:
        mode = mode or os.environ.get(THREAD_POOL_ENV) or "per-session"
        if mode not in THREAD_POOLS:
            raise UserError(f"{THREAD_POOL_ENV}={mode!r}: allowed {', '.join(THREAD_POOLS)}")
        if mode == "shared":
            import onnxruntime as ort

            ort.set_global_thread_pool_sizes(threads or 0, 1)
        _mode, _size = mode, threads
    return _mode


def current() -> str | None:
    """The mode, once a session fixed it (None before)."""
    return _mode
