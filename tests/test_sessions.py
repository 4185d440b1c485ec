"""ONNX Runtime's thread pools (runtime/sessions.py, issue 13): one shared pool per process unless
$STAR_ORT_THREAD_POOL says per-session. The mode is fixed by a process's first session, so each case runs in its own
interpreter."""

import os
import subprocess
import sys

import pytest

PROBE = """
import numpy as np, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
from star_export.runtime.sessions import session_options, thread_pool
opts = session_options()
print(thread_pool(), opts.use_per_session_threads)
w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
print(session.run(None, {"A": np.arange(4, dtype=np.float32)[None]})[0].tolist())
import warnings
with warnings.catch_warnings(record=True) as caught:  # a size asked for after the shared pool exists: said, not taken
    warnings.simplefilter("always")
    session_options(3)
print("warned", len(caught))
try:  # a session of the process's own, with ONNX Runtime's default options
    ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    print("own session: created")
except Exception as e:
    print("own session: refused", "use_per_session_threads must be false" in str(e))
"""


def _probe(mode):
    env = {k: v for k, v in os.environ.items() if k != "STAR_ORT_THREAD_POOL"} | ({"STAR_ORT_THREAD_POOL": mode} if mode is not None else {})
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("mode, shared", [(None, True), ("shared", True), ("per-session", False)])
def test_sessions_share_one_thread_pool_unless_asked_not_to(mode, shared):
    done = _probe(mode)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ("shared False" if shared else "per-session True"), lines
    assert lines[1] == "[[0.0, 1.0, 2.0, 3.0]]"
    assert lines[2] == ("warned 1" if shared else "warned 0"), lines
    # what the README says of a process with sessions of its own: refused with ONNX Runtime's message in shared mode
    assert lines[-1] == ("own session: refused True" if shared else "own session: created"), lines  # (ORT prints its own banner first)


def test_an_unknown_thread_pool_mode_is_a_clear_error(tiny_engine, tmp_path):
    from star_export.runtime.inputs import synthetic_image

    image = tmp_path / "a.png"
    synthetic_image(0).save(image)
    env = os.environ | {"STAR_ORT_THREAD_POOL": "global"}
    done = subprocess.run([sys.executable, "-c", "import sys; from star_export.cli import run_main; sys.exit(run_main(sys.argv[1:]))", str(tiny_engine), "--image", str(image), "--prompt", "Describe."],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "STAR_ORT_THREAD_POOL='global': allowed shared, per-session" in done.stderr
    assert "Traceback" not in done.stderr
