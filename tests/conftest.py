"""Session-scoped fixtures: tiny-llava, and a random model unlike it saved to disk and loaded by path."""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test processes call the commands' mains in process, and also run libraries that create ONNX Runtime sessions of
# their own (onnx-graphsurgeon's constant folding): a pool per session, as a library user gets (runtime/threads.py).
# The shared pool, the commands' default, is tested in processes of its own (tests/test_sessions.py).
os.environ.setdefault("STAR_ORT_THREAD_POOL", "per-session")
# `auto` would pick OpenVINO in bfloat16 on a CPU with bfloat16 units and ONNX Runtime elsewhere: the suite pins ONNX
# Runtime's CPU provider so that it tests the same thing on every CPU; OpenVINO is tested where asked for
# (tests/test_openvino.py).
os.environ.setdefault("STAR_PROVIDER", "cpu")
# OpenVINO's compiled graphs go to a cache of this run's own, not the user's ~/.cache (runtime/openvino.py).
if "STAR_OPENVINO_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["STAR_OPENVINO_CACHE"] = tempfile.mkdtemp(prefix="star-openvino-cache-")
    atexit.register(shutil.rmtree, os.environ["STAR_OPENVINO_CACHE"], True)

import pytest
import torch

from star_export.models import load_model
from star_export.runtime.inputs import synthetic_image
from star_export.testing import OTHER_SPEC, save_random_llava

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

QUESTIONS = [
    "What is in the image?",
    "How many cats are sitting on the wooden table in this bright kitchen?",
    "Describe the picture.",
]


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-llava")


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory):
    return save_random_llava(OTHER_SPEC, tmp_path_factory.mktemp("other-llava"), seed=7)


@pytest.fixture(scope="session")
def other(other_dir):
    return load_model(str(other_dir))


@pytest.fixture(scope="session", params=["tiny", "other"])
def any_model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def images():
    return [synthetic_image(i) for i in range(4)]


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """A tiny-llava engine with small limits (no self-check): for tests about input, not parity."""
    from star_export.cli import export_main

    out = tmp_path_factory.mktemp("tiny-engine") / "tiny"
    assert export_main(["--out", str(out), "--no-validate", "--quiet", "--max-batch-size", "2", "--max-input-len", "620", "--max-new-tokens", "8"]) == 0
    return out


@pytest.fixture(scope="session")
def decode_engine(tmp_path_factory):
    """`tiny_engine` with ONNX Runtime decode graphs (`--decode-graphs on`: float32, so both decode paths compute in
    float and agree to float32 rounding), room for 80 new tokens (past kvcache.GROWTH)."""
    from star_export.cli import export_main

    out = tmp_path_factory.mktemp("decode-engine") / "tiny"
    assert export_main(["--out", str(out), "--no-validate", "--quiet", "--decode-graphs", "on", "--max-batch-size", "2", "--max-input-len", "620",
                        "--max-new-tokens", "80"]) == 0
    return out
