"""How an engine's ONNX Runtime sessions run (config.RuntimeOptions, runtime/threads.py, runtime/sessions.py): a thread
pool per session for a library user, one shared pool where star-export owns the process (its commands, the Triton
model), `--thread-pool` / $STAR_ORT_THREAD_POOL over both; one CPU arena for the process unless `--cpu-arena` /
$STAR_ORT_CPU_ARENA says otherwise. The pool mode is fixed by a process's first session, so each case that depends on
it runs in an interpreter of its own."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import sys, warnings
import numpy as np, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
from star_export.runtime.sessions import session_options
from star_export.runtime.threads import claim_process, current
if sys.argv[1] == "command":
    claim_process()  # what the star-* commands do first
opts = session_options()
print(current(), opts.use_per_session_threads)
w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
print(session.run(None, {"A": np.arange(4, dtype=np.float32)[None]})[0].tolist())
with warnings.catch_warnings(record=True) as caught:  # a size asked for after the shared pool exists: said, not taken
    warnings.simplefilter("always")
    session_options(3)
print("warned", len(caught))
try:  # a session of another library, with ONNX Runtime's default options
    ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    print("own session: created")
except Exception as e:
    print("own session: refused", "use_per_session_threads must be false" in str(e))
"""


def _env(mode):
    return {k: v for k, v in os.environ.items() if k != "STAR_ORT_THREAD_POOL"} | ({"STAR_ORT_THREAD_POOL": mode} if mode is not None else {})


@pytest.mark.parametrize("mode, caller, shared", [
    (None, "library", False),      # a program that imports Engine: its other ONNX Runtime sessions keep working
    (None, "command", True),       # a star-* command or the Triton model
    ("per-session", "command", False),
    ("shared", "library", True),
])
def test_the_thread_pool_mode(mode, caller, shared):
    done = subprocess.run([sys.executable, "-c", PROBE, caller], capture_output=True, text=True, env=_env(mode), timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ("shared False" if shared else "per-session True"), lines
    assert lines[1] == "[[0.0, 1.0, 2.0, 3.0]]"
    assert lines[2] == ("warned 1" if shared else "warned 0"), lines
    # what threads.py and the README say of other libraries' sessions (ORT prints its own banner first)
    assert lines[-1] == ("own session: refused True" if shared else "own session: created"), lines


def _star_run(engine, image, mode, *flags, **env):
    code = "import sys; from star_export.cli import run_main; sys.exit(run_main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, str(engine), "--image", str(image), "--prompt", "Describe.", "--max-new-tokens", "6",
                           "--json", "--quiet", *flags], capture_output=True, text=True, env=_env(mode) | env, timeout=600)


def test_star_run_shares_one_pool_and_generates_the_same_tokens(decode_engine, tmp_path):
    from star_export.runtime.inputs import synthetic_image

    image = tmp_path / "a.png"
    synthetic_image(0).save(image)
    runs = {}
    for mode in (None, "per-session"):
        done = _star_run(decode_engine, image, mode)
        assert done.returncode == 0, done.stderr
        runs[mode] = json.loads(done.stdout)
    assert runs[None]["timings"]["thread_pool"] == "shared" and runs["per-session"]["timings"]["thread_pool"] == "per-session"
    assert runs[None]["timings"]["decode_graphs"] is True
    assert runs[None]["timings"]["cpu_arena"] == "shared"  # the default (conftest leaves $STAR_ORT_CPU_ARENA unset)
    assert runs[None]["token_ids"] == runs["per-session"]["token_ids"]

    done = _star_run(decode_engine, image, "global")
    assert done.returncode == 2, done.stderr
    assert "STAR_ORT_THREAD_POOL='global': allowed shared, per-session" in done.stderr
    assert "Traceback" not in done.stderr

    done = _star_run(decode_engine, image, None, STAR_ORT_CPU_ARENA="yes")
    assert done.returncode == 2, done.stderr
    assert "STAR_ORT_CPU_ARENA='yes': allowed shared, session, off" in done.stderr
    assert "Traceback" not in done.stderr


def test_cpu_arena_is_shared_by_default(monkeypatch):
    """$STAR_ORT_CPU_ARENA (runtime/sessions.py): one arena for the process by default (ONNX Runtime's environment
    allocator, which the session opts into), an arena per session or none when asked, read as each session's options are
    made; a transient session (LazyOrtGraph, freed after one run) keeps its own arena where the process's is shared; any
    other value is a user error naming the allowed ones."""
    from star_export.errors import UserError
    from star_export.runtime.sessions import session_options

    def env_allocator(opts):
        try:
            return opts.get_session_config_entry("session.use_env_allocators") == "1"
        except Exception:  # ONNX Runtime raises for a key never set
            return False

    monkeypatch.delenv("STAR_ORT_CPU_ARENA", raising=False)
    opts = session_options()
    assert opts.enable_cpu_mem_arena is True and env_allocator(opts)
    opts = session_options(transient=True)
    assert opts.enable_cpu_mem_arena is True and not env_allocator(opts)
    monkeypatch.setenv("STAR_ORT_CPU_ARENA", "session")
    opts = session_options()
    assert opts.enable_cpu_mem_arena is True and not env_allocator(opts)
    monkeypatch.setenv("STAR_ORT_CPU_ARENA", "off")
    for transient in (False, True):
        opts = session_options(transient=transient)
        assert opts.enable_cpu_mem_arena is False and not env_allocator(opts)
    monkeypatch.setenv("STAR_ORT_CPU_ARENA", "yes")
    with pytest.raises(UserError, match="STAR_ORT_CPU_ARENA='yes': allowed shared, session, off"):
        session_options()


def test_runtime_options_choose_the_arena_of_an_engines_sessions(tiny_engine):
    from star_export.config import RuntimeOptions
    from star_export.runtime.engine import Engine

    for arena, enabled in (("off", False), ("session", True)):
        engine = Engine(tiny_engine, RuntimeOptions(provider="cpu", cpu_arena=arena))
        held = {(g.cpu_arena, g.session.get_session_options().enable_cpu_mem_arena) for g in engine.graphs.values()}
        assert held == {(arena, enabled)}
        assert engine.options.cpu_arena == arena and engine.options.provider == "cpu"


def test_runtime_options_refuse_what_they_do_not_know(monkeypatch):
    from star_export.config import RuntimeOptions
    from star_export.errors import UserError
    from star_export.runtime import threads

    for field, value, allowed in (("cpu_arena", "yes", "shared, session, off"), ("thread_pool", "global", "shared, per-session"),
                                  ("provider", "tpu", "auto, cpu, cuda, tensorrt")):
        with pytest.raises(UserError, match=f"--{field.replace('_', '-')} '{value}': allowed {allowed}"):
            RuntimeOptions(**{field: value})
    # the pool is the process's, fixed by its first session: asking for the other one later is refused, not ignored
    monkeypatch.setattr(threads, "_mode", "per-session")
    with pytest.raises(UserError, match="already run on the 'per-session' thread pool"):
        threads.thread_pool(mode="shared")
    assert threads.thread_pool(mode="per-session") == "per-session" and threads.thread_pool() == "per-session"


def test_star_run_flags_choose_the_pool_and_the_arena_over_the_environment(decode_engine, tmp_path):
    from star_export.runtime.inputs import synthetic_image

    image = tmp_path / "a.png"
    synthetic_image(0).save(image)
    flagged = _star_run(decode_engine, image, "shared", "--thread-pool", "per-session", "--cpu-arena", "off",
                        STAR_ORT_CPU_ARENA="session")
    assert flagged.returncode == 0, flagged.stderr
    timings = json.loads(flagged.stdout)["timings"]
    assert (timings["thread_pool"], timings["cpu_arena"]) == ("per-session", "off")
    by_env = _star_run(decode_engine, image, None, STAR_ORT_CPU_ARENA="session")  # no flag: the environment's
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["timings"]["cpu_arena"] == "session"
    assert json.loads(by_env.stdout)["token_ids"] == json.loads(flagged.stdout)["token_ids"]
    wrong = _star_run(decode_engine, image, None, "--cpu-arena", "yes")
    assert wrong.returncode == 2 and "invalid choice: 'yes'" in wrong.stderr
