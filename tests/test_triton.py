"""The Triton model repository. The structure is checked with Triton's own model-config protobuf
(tritonclient) in every run; the slow test starts a real `tritonserver` (the binary bundled in nvidia-pytriton, run
by scripts/triton_local.py in .venv-triton) and queries it with tritonclient over HTTP and gRPC."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import QUESTIONS
from helpers import script
from star_export.runtime.generate import Sampling
from star_export.runtime.inputs import synthetic_image

ROOT = Path(__file__).resolve().parents[1]


def _config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_parses_with_tritons_schema(tiny_engine, tmp_path):
    from star_export.errors import UserError
    from star_export.serve.triton_repo import write_repository

    repo = tmp_path / "repo"
    stream_dir, unary_dir = write_repository(tiny_engine, repo, model_name="llava_star", kind="cpu")
    limits = json.loads((tiny_engine / "star.json").read_text())["limits"]
    stream, unary = _config(stream_dir / "config.pbtxt"), _config(unary_dir / "config.pbtxt")
    assert (stream.name, unary.name) == ("llava_star_stream", "llava_star")
    for cfg in (stream, unary):
        assert cfg.backend == "python" and cfg.max_batch_size == limits["max_batch_size"]
        assert 0 < max(cfg.dynamic_batching.preferred_batch_size) <= cfg.max_batch_size
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        assert [o.name for o in cfg.output] == ["text_output", "output_ids", "stage1_indices", "stage2_indices"]
        assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    assert stream.model_transaction_policy.decoupled and not unary.model_transaction_policy.decoupled
    assert [i.name for i in stream.input] == ["text_input", "image_bytes_input", "max_tokens", "temperature", "top_p", "random_seed", "stream"]
    assert [i.name for i in unary.input] == [i.name for i in stream.input][:-1]
    assert stream.parameters["engine_dir"].string_value == str(Path(tiny_engine).resolve())
    assert unary.parameters["target"].string_value == "llava_star_stream"
    assert "TritonPythonModel" in (stream_dir / "1" / "model.py").read_text() and "UnaryModel" in (unary_dir / "1" / "model.py").read_text()
    with pytest.raises(UserError, match="--force"):
        write_repository(tiny_engine, repo, model_name="llava_star")
    copied, _ = write_repository(tiny_engine, repo, model_name="llava_star", kind="gpu", copy_engine=True, force=True)
    cfg = _config(copied / "config.pbtxt")
    assert cfg.parameters["engine_dir"].string_value == "1/engine" and (copied / "1" / "engine" / "star.json").is_file()
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    (repo / "other_stream").mkdir()
    with pytest.raises(UserError, match="not a Triton model folder"):
        write_repository(tiny_engine, repo, model_name="other", force=True)
    assert not any(p.name.startswith(".") for p in repo.iterdir()), "a staging folder was left behind"


# ------------------------------------------------------------------ a real Triton server (slow)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """tiny-llava engine + repository written by `star-export --triton-repo`, served by a real tritonserver."""
    from star_export.cli import export_main

    triton_local = script("triton_local")
    triton_local.setup()

    root = tmp_path_factory.mktemp("triton")
    engine, repo = root / "engine", root / "repo"
    assert export_main(["--out", str(engine), "--no-validate", "--quiet", "--max-batch-size", "8", "--max-new-tokens", "16",
                        "--triton-repo", str(repo), "--triton-kind", "cpu"]) == 0
    from star_export.serve import bind

    ports = [bind("127.0.0.1", 0) for _ in range(3)]
    numbers = [s.getsockname()[1] for s in ports]
    for s in ports:
        s.close()
    proc = triton_local.start(repo, *numbers, root / "triton.log")
    try:
        yield {"engine": engine, "http": numbers[0], "grpc": numbers[1], "metrics": numbers[2], "log": root / "triton.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _png(image) -> np.ndarray:
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)[None]


def _inputs(module, question, image_bytes, max_tokens=12, stream=None):
    items = [("text_input", np.array([[question]], dtype=object), "BYTES"), ("max_tokens", np.array([[max_tokens]], np.int32), "INT32")]
    if image_bytes is not None:
        items.append(("image_bytes_input", image_bytes, "UINT8"))
    if stream is not None:
        items.append(("stream", np.array([[stream]], bool), "BOOL"))
    out = []
    for name, value, dtype in items:
        t = module.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        out.append(t)
    return out


def _star_run(engine, image, question, tmp_path, n=12):
    """`star-run --json`, as a user runs it (its own process)."""
    path = tmp_path / "q.png"
    image.save(path)
    code = subprocess.run([sys.executable, "-c", "import sys; from star_export.cli import run_main; sys.exit(run_main())", str(engine), "--image", str(path),
                           "--prompt", question, "--max-new-tokens", str(n), "--json", "--quiet"], capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr
    return json.loads(code.stdout)


@pytest.mark.slow
def test_http_and_grpc_answers_equal_star_run(triton, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    image, question = synthetic_image(0), QUESTIONS[0]
    want = _star_run(triton["engine"], image, question, tmp_path)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{triton['http']}").infer("star_llava", _inputs(httpclient, question, _png(image)))
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{triton['grpc']}").infer("star_llava", _inputs(grpcclient, question, _png(image)))
    for r in (http, grpc):
        assert r.as_numpy("output_ids")[0].tolist() == want["token_ids"]
        assert r.as_numpy("text_output")[0][0].decode() == want["text"]
        assert r.as_numpy("stage1_indices")[0].tolist() == want["stage1_indices"]
        assert r.as_numpy("stage2_indices")[0].tolist() == want["stage2_indices"]


@pytest.mark.slow
def test_grpc_streaming_equals_star_run(triton, tmp_path):
    import queue

    import tritonclient.grpc as grpcclient

    image, question = synthetic_image(1), QUESTIONS[1]
    want = _star_run(triton["engine"], image, question, tmp_path)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton['grpc']}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("star_llava_stream", _inputs(grpcclient, question, _png(image), stream=True), enable_empty_final_response=True)
    pieces, ids, kept = [], [], None
    while True:
        result, error = results.get(timeout=120)
        assert error is None, error
        response = result.get_response()
        if result.as_numpy("text_output") is not None:
            pieces.append(result.as_numpy("text_output")[0][0].decode())
            ids += result.as_numpy("output_ids")[0].tolist()
            if result.as_numpy("stage2_indices")[0].size:
                kept = result.as_numpy("stage1_indices")[0].tolist(), result.as_numpy("stage2_indices")[0].tolist()
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    assert len(pieces) > 2, "the answer did not stream"
    assert "".join(pieces) == want["text"] and ids == want["token_ids"]
    assert kept == (want["stage1_indices"], want["stage2_indices"])


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_each_equals_batch1(triton):
    import tritonclient.http as httpclient

    from star_export.runtime.engine import Engine

    engine = Engine(triton["engine"], provider="cpu")
    cases = [(synthetic_image(i % 4), QUESTIONS[i % 3] + " " * (i // 3)) for i in range(8)]

    def counts():
        text = urllib.request.urlopen(f"http://127.0.0.1:{triton['metrics']}/metrics", timeout=10).read().decode()
        value = lambda name: float(re.search(rf'^{name}{{model="star_llava",version="1"}} (\S+)$', text, re.M).group(1))  # noqa: E731
        return value("nv_inference_count"), value("nv_inference_exec_count")

    before = counts()
    got: dict[int, list[int]] = {}
    ready = threading.Barrier(len(cases))
    requests = [(httpclient.InferenceServerClient(f"127.0.0.1:{triton['http']}"), _inputs(httpclient, q, _png(im))) for im, q in cases]

    def one(i):  # the 8 requests leave together
        client, inputs = requests[i]
        ready.wait()
        got[i] = client.infer("star_llava", inputs).as_numpy("output_ids")[0].tolist()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = counts()
    for i, (image, question) in enumerate(cases):
        assert got[i] == engine.generate([image], [question], Sampling(max_new_tokens=12)).token_ids[0], f"request {i}"
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 8 and executions < inferences, f"Triton ran {inferences} requests in {executions} executions: no batch > 1"


@pytest.mark.slow
def test_bad_requests_get_errors_and_the_server_keeps_serving(triton):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{triton['http']}")
    good = lambda: client.infer("star_llava", _inputs(httpclient, "What is in the image?", _png(synthetic_image(2)), 4)).as_numpy("output_ids")[0].tolist()  # noqa: E731
    want = good()
    bad = {
        "no image": (_inputs(httpclient, "What is in the image?", None), "exactly one image"),
        "non-image bytes": (_inputs(httpclient, "What is in the image?", np.frombuffer(b"not an image at all" * 8, np.uint8)[None]), "could not be decoded"),
        "max_tokens over the limit": (_inputs(httpclient, "What is in the image?", _png(synthetic_image(2)), 17), "limit of 16"),
        "two <image> tags": (_inputs(httpclient, "<image> <image>", _png(synthetic_image(2))), "image"),
    }
    for name, (inputs, message) in bad.items():
        with pytest.raises(InferenceServerException, match=message):
            client.infer("star_llava", inputs)
    assert good() == want
