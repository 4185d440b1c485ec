"""star-serve, started on loopback and driven with the official `openai` client (raw HTTP only where a
client cannot send the request: malformed JSON, oversized bodies, wrong methods).

Answers are compared with `star-run` / `Engine.generate` for the same inputs; the in-flight merge is proven twice:
deterministically (the scheduler driven step by step, requests joining a running batch of other lengths) and over
HTTP (concurrent clients arriving at different times)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import struct
import threading
import time
import zlib

import openai
import pytest

from conftest import QUESTIONS
from star_export.runtime.generate import Sampling
from star_export.runtime.inputs import synthetic_image

API_KEY = "sk-test-key"
MODEL = "tiny-llava"
MAX_IMAGE_BYTES = 300_000


@pytest.fixture(scope="module")
def serve_engine(tmp_path_factory):
    from star_export.cli import export_main

    out = tmp_path_factory.mktemp("serve") / "tiny"
    assert export_main(["--out", str(out), "--no-validate", "--quiet", "--max-batch-size", "4", "--max-new-tokens", "24", "--max-input-len", "700"]) == 0
    return out


@pytest.fixture(scope="module")
def engine(serve_engine):
    from star_export.runtime.engine import Engine

    return Engine(serve_engine, provider="cpu")


@contextlib.contextmanager
def running(engine, **settings):
    """A star-serve app on a free loopback port, in a thread, configured as star-serve configures it; yields (port, app)."""
    import uvicorn

    from star_export.serve import bind, server_config
    from star_export.serve.app import ServeSettings, create_app

    app = create_app(engine, ServeSettings(model_name=MODEL, **({"max_image_bytes": MAX_IMAGE_BYTES} | settings)))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, app.state.settings.max_connections or 256))  # star-serve's own protocol and limits
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    try:
        yield sock.getsockname()[1], app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(engine):
    with running(engine, api_key=API_KEY) as (port, app):
        yield port, app


def client(port, key=API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)


def data_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def messages(question, url, text_first=True):
    parts = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts if text_first else parts[::-1]}]


def batch1(engine, image, question, n):
    return engine.generate([image], [question], Sampling(max_new_tokens=n)).token_ids[0]


def ask(port, image, question, n=24, **kw):
    return client(port).chat.completions.create(model=MODEL, messages=messages(question, data_url(image)), temperature=0, max_tokens=n, **kw)


# ------------------------------------------------------------------ answers


def test_non_streaming_answer_equals_star_run(server, serve_engine, tmp_path, capsys):
    from star_export.cli import run_main

    port, _ = server
    image = synthetic_image(0)
    image.save(tmp_path / "a.png")
    assert run_main([str(serve_engine), "--image", str(tmp_path / "a.png"), "--prompt", QUESTIONS[0], "--max-new-tokens", "12", "--json", "--quiet"]) == 0
    star_run = json.loads(capsys.readouterr().out)
    r = ask(port, image, QUESTIONS[0], n=12)
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == star_run["token_ids"]
    assert choice.message.content == star_run["text"] and choice.message.role == "assistant"
    assert choice.finish_reason == ("stop" if len(star_run["token_ids"]) < 12 else "length")
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    u = r.usage
    assert u.completion_tokens == len(star_run["token_ids"]) and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens > 576  # the image counted unpruned, as the model sees it before stage 1
    star = u.model_extra["star"]
    assert star["visual_tokens"] == {"input": 576, "stage1": 490, "kept": 58}
    assert {"vision_s", "prefill_s", "decode_s", "queue_s"} <= set(star["timings"])


def test_streaming_answer_equals_non_streaming(server, engine):
    port, _ = server
    image = synthetic_image(1)
    want = ask(port, image, QUESTIONS[1], n=16)
    stream = ask(port, image, QUESTIONS[1], n=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content)
    ids = [i for c in content for i in c.choices[0].model_extra.get("token_ids") or []]
    finish = [c.choices[0].finish_reason for c in content if c.choices[0].finish_reason]
    assert text == want.choices[0].message.content and ids == want.choices[0].model_extra["token_ids"]
    assert finish == [want.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)  # the usage chunk comes last
    assert ids == batch1(engine, image, QUESTIONS[1], 16)


def test_image_part_order_does_not_change_the_prompt(server):
    port, _ = server
    url = data_url(synthetic_image(2))
    c = client(port)
    a, b = (c.chat.completions.create(model=MODEL, messages=messages(QUESTIONS[2], url, order), temperature=0, max_tokens=6) for order in (True, False))
    assert a.choices[0].model_extra["token_ids"] == b.choices[0].model_extra["token_ids"]
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_stop_strings_cut_the_text(server):
    port, _ = server
    full = ask(port, synthetic_image(3), QUESTIONS[0], n=24).choices[0].message.content
    cut = full[len(full) // 3 : len(full) // 3 + 2]
    assert cut.strip()
    r = ask(port, synthetic_image(3), QUESTIONS[0], n=24, stop=[cut])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.find(cut)]
    s = "".join(c.choices[0].delta.content or "" for c in ask(port, synthetic_image(3), QUESTIONS[0], n=24, stop=cut, stream=True) if c.choices)
    assert s == full[: full.find(cut)]


def test_sampling_is_seeded(server):
    port, _ = server
    c = client(port)
    url = data_url(synthetic_image(0))
    runs = [c.chat.completions.create(model=MODEL, messages=messages(QUESTIONS[0], url), temperature=0.9, top_p=0.9, seed=s, max_tokens=12)
            for s in (5, 5, 6)]
    ids = [r.choices[0].model_extra["token_ids"] for r in runs]
    assert ids[0] == ids[1] and ids[0] != ids[2]


# ------------------------------------------------------------------ continuous batching


def test_rows_joining_a_running_batch_equal_their_batch1_runs(engine):
    """The scheduler driven by hand: A runs alone, B (another prompt length) joins after 3 steps, C and D after 5,
    A leaves first; every row's tokens equal its batch-1 greedy run."""
    from star_export.serve.metrics import Metrics
    from star_export.serve.scheduler import Job, Scheduler

    sched = Scheduler(engine, max_queue=8, metrics=Metrics())
    cases = [(synthetic_image(i), q, n) for i, (q, n) in enumerate(zip(QUESTIONS + ["Is there a cat?"], (6, 20, 14, 18)))]
    done: dict[int, list[int]] = {}
    jobs = []
    for i, (image, q, n) in enumerate(cases):
        inputs = engine.prepare([image], [q])
        emit = (lambda i: lambda ev: done.__setitem__(i, ev.token_ids) if ev.kind == "done" else None)(i)
        jobs.append(Job(inputs=inputs, sampling=Sampling(max_new_tokens=n, stop_at_eos=False), stop=(), timeout_s=600, emit=emit))
    lengths = set()
    sched._admit(jobs[0])
    for step in range(40):
        if step == 3:
            sched._admit(jobs[1])
        if step == 5:
            sched._admit(jobs[2]), sched._admit(jobs[3])
        if sched.rows:
            lengths.add((len(sched.rows), sched.state.cache0.length))
            sched._step()
    assert sorted(done) == [0, 1, 2, 3]
    assert max(b for b, _ in lengths) == 4  # at step 5 A (6 tokens) is still in, with B, C and D
    for i, (image, q, n) in enumerate(cases):
        want = engine.generate([image], [q], Sampling(max_new_tokens=n, stop_at_eos=False)).token_ids[0]
        assert done[i] == want, f"row {i}"


def test_requests_prefilled_together_equal_their_batch1_runs(engine):
    """Four requests of different prompt lengths and token counts admitted at one step boundary: prefilled as one
    left-padded batch (budget large enough), each row's tokens equal its batch-1 greedy run; a request that cannot be
    prefilled (no image tokens) in the same group fails alone, the others still run."""
    from star_export.serve.metrics import Metrics
    from star_export.serve.scheduler import Job, Scheduler

    sched = Scheduler(engine, max_queue=8, metrics=Metrics(), prefill_tokens=1 << 20)
    cases = [(synthetic_image(i), q, n) for i, (q, n) in enumerate(zip(QUESTIONS + ["Is there a cat?"], (6, 20, 14, 18)))]
    events: dict[int, list] = {}
    jobs = []
    for i, (image, q, n) in enumerate(cases):
        inputs = engine.prepare([image], [q])
        jobs.append(Job(inputs=inputs, sampling=Sampling(max_new_tokens=n, stop_at_eos=False), stop=(), timeout_s=600,
                        emit=(lambda i: lambda ev: events.setdefault(i, []).append(ev))(i)))
    sched._admit_all(jobs)
    assert len(sched.rows) == 4 and {j.star["prefill_batch"] for j in jobs} == {4}
    while sched.rows:
        sched._step()
    for i, (image, q, n) in enumerate(cases):
        want = engine.generate([image], [q], Sampling(max_new_tokens=n, stop_at_eos=False)).token_ids[0]
        assert events[i][-1].kind == "done" and events[i][-1].token_ids == want, f"row {i}"

    good = engine.prepare([synthetic_image(0)], [QUESTIONS[0]])
    bad = {k: v.copy() for k, v in good.items()}
    bad["input_ids"][bad["input_ids"] == engine.layout.image_token_id] = engine.layout.pad_token_id
    events.clear()
    pair = [Job(inputs=x, sampling=Sampling(max_new_tokens=3, stop_at_eos=False), stop=(), timeout_s=600,
                emit=(lambda i: lambda ev: events.setdefault(i, []).append(ev))(i)) for i, x in enumerate((bad, good))]
    sched._admit_all(pair)
    assert [e.kind for e in events[0]] == ["error"] and len(sched.rows) == 1
    while sched.rows:
        sched._step()
    assert events[1][-1].kind == "done" and events[1][-1].star["prefill_batch"] == 1


def test_prefill_groups_keep_to_the_token_budget():
    from star_export.serve.scheduler import default_prefill_tokens, prefill_groups

    assert prefill_groups([100, 120, 90, 300], 0) == [[0], [1], [2], [3]]
    assert prefill_groups([100, 120, 90, 300], 360) == [[0, 1, 2], [3]]  # 3 x 120 = 360; then 4 x 300 > 360
    assert prefill_groups([500], 100) == [[0]]  # alone whatever its size
    assert prefill_groups([], 4096) == []
    assert default_prefill_tokens("CPUExecutionProvider") == 0 and default_prefill_tokens("CUDAExecutionProvider") > 0


def test_concurrent_clients_arriving_at_different_times(server, engine):
    port, app = server
    before = app.state.metrics.batch_size.collect()[0].samples
    cases = [(synthetic_image(i % 4), QUESTIONS[i % 3] + " " * (i // 3), 8 + 2 * i) for i in range(8)]
    got: dict[int, list[int]] = {}

    def one(i):
        time.sleep(0.01 * i)
        image, q, n = cases[i]
        got[i] = ask(port, image, q, n=n).choices[0].model_extra["token_ids"]

    refused = []

    def bad(k):  # malformed requests racing the good ones must not disturb them
        time.sleep(0.005 * k)
        name = list(BAD)[k * 5 % len(BAD)]
        status, code, body, headers = BAD[name]
        refused.append(_post(port, body, headers)[0] == status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))] + [threading.Thread(target=bad, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refused == [True] * 6
    for i, (image, q, n) in enumerate(cases):
        assert got[i] == batch1(engine, image, q, n), f"request {i}"
    after = app.state.metrics.batch_size.collect()[0].samples
    count = lambda samples, le: next(s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == le)  # noqa: E731
    steps = count(after, "+Inf") - count(before, "+Inf")
    single = count(after, "1.0") - count(before, "1.0")
    assert steps > single, "no decode step ran more than one row: the requests never shared a batch"


def test_queue_full_is_429_with_retry_after(engine):
    from star_export.serve.metrics import Metrics
    from star_export.serve.scheduler import QueueFull, Scheduler

    sched = Scheduler(engine, max_queue=2, metrics=Metrics())  # not started: nothing leaves the queue
    for _ in range(2):
        sched.submit(object())
    with pytest.raises(QueueFull):
        sched.submit(object())
    with running(engine) as (port, app):
        app.state.scheduler.max_queue = 0
        with pytest.raises(openai.RateLimitError) as e:
            client(port).with_options(max_retries=0).chat.completions.create(model=MODEL, messages=messages("hi", data_url(synthetic_image(0))), max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "queue_full"


def test_request_timeout_is_408(engine):
    with running(engine, request_timeout=1e-6) as (port, _):
        with pytest.raises(openai.APIStatusError) as e:
            client(port).chat.completions.create(model=MODEL, messages=messages("hi", data_url(synthetic_image(0))), max_tokens=2)
        assert e.value.status_code == 408 and e.value.body["code"] == "request_timeout"


# ------------------------------------------------------------------ bad requests


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _b64(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _good(**over):
    body = {"model": MODEL, "messages": messages("What is in the image?", data_url(synthetic_image(0))), "max_tokens": 4, "temperature": 0}
    return json.dumps(body | over).encode()


def _with_url(url):
    return _good(messages=messages("What is in the image?", url))


def _png_bytes():
    buf = io.BytesIO()
    synthetic_image(0).save(buf, "PNG")
    return buf.getvalue()


BAD = {
    # name: (status, code or None, body bytes or callable, headers)
    "malformed JSON": (400, "invalid_json", b'{"model": "tiny-llava", "messages": [', {}),
    "JSON not an object": (400, "invalid_json", b"[1, 2]", {}),
    "no messages": (400, "missing_required_parameter", json.dumps({"model": MODEL}).encode(), {}),
    "empty messages": (400, "invalid_value", _good(messages=[]), {}),
    "no image": (400, "invalid_image_count", _good(messages=[{"role": "user", "content": "What is in the image?"}]), {}),
    "two images": (400, "invalid_image_count", _good(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(synthetic_image(0))}},
        {"type": "image_url", "image_url": {"url": data_url(synthetic_image(1))}}, {"type": "text", "text": "Compare."}]}]), {}),
    "image in an assistant message": (400, None, _good(messages=[{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                                                                 {"role": "user", "content": "Hi"}]), {}),
    "two <image> tags in the text": (400, None, _good(messages=messages("<image> and <image>", data_url(synthetic_image(0)))), {}),
    "non-image bytes": (400, "invalid_image", _with_url(_b64(b"this is not a picture at all" * 10)), {}),
    "truncated PNG": (400, "invalid_image", _with_url(_b64(_png_bytes()[:300])), {}),
    "non-image media type": (400, "invalid_image", _with_url(_b64(b"hello", "text/plain")), {}),
    "data URL not base64": (400, "invalid_image_url", _with_url("data:image/png,rawbytes"), {}),
    "malformed base64": (400, "invalid_image_url", _with_url("data:image/png;base64,@@@not*base64@@@"), {}),
    "huge pixel count": (400, "invalid_image", _with_url(_b64(_png_header(100_000, 100_000))), {}),
    "image over --max-image-bytes": (400, "image_too_large", _with_url(_b64(b"\0" * (MAX_IMAGE_BYTES + 10))), {}),
    "oversized body": (413, "body_too_large", _good(user="x" * (MAX_IMAGE_BYTES * 4 // 3 + (1 << 20) + 100)), {}),
    "remote URL": (400, "remote_image_refused", _with_url("http://127.0.0.1:1/cat.png"), {}),
    "file URL": (400, "invalid_image_url", _with_url("file:///etc/passwd"), {}),
    "bare path": (400, "invalid_image_url", _with_url("/etc/passwd"), {}),
    "unknown model": (404, "model_not_found", _good(model="gpt-4o"), {}),
    "n=2": (400, "unsupported_value", _good(n=2), {}),
    "negative max_tokens": (400, "invalid_value", _good(max_tokens=-3), {}),
    "max_tokens a string": (400, "invalid_value", _good(max_tokens="5"), {}),
    "max_tokens over the engine limit": (400, "max_tokens_exceeded", _good(max_tokens=25), {}),
    "max_tokens and max_completion_tokens differ": (400, None, _good(max_tokens=3, max_completion_tokens=4), {}),
    "prompt over the limit": (400, "context_length_exceeded", _good(messages=messages("cat " * 200, data_url(synthetic_image(0)))), {}),
    "temperature 3": (400, "invalid_value", _good(temperature=3), {}),
    "top_p 0": (400, "invalid_value", _good(top_p=0), {}),
    "negative seed": (400, "invalid_value", _good(seed=-1), {}),
    "unknown parameter": (400, None, _good(frobnicate=True), {}),
    "logprobs asked": (400, "unsupported_parameter", _good(logprobs=True), {}),
    "five stop strings": (400, None, _good(stop=["a", "b", "c", "d", "e"]), {}),
    "empty stop string": (400, None, _good(stop=""), {}),
    "tool role": (400, "invalid_value", _good(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), {}),
    "audio content part": (400, "invalid_value", _good(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]), {}),
    "stream_options without stream": (400, None, _good(stream_options={"include_usage": True}), {}),
    "conversation ends with the assistant": (400, None, _good(messages=messages("Hi", data_url(synthetic_image(0))) + [{"role": "assistant", "content": "Hello"}]), {}),
    "wrong API key": (401, "invalid_api_key", _good(), {"Authorization": "Bearer sk-wrong"}),
    "no API key": (401, "invalid_api_key", _good(), {"Authorization": ""}),
}


def _post(port, body: bytes, headers: dict, path="/v1/chat/completions", method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"} | headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def _assert_openai_error(status, payload, want_status, want_code):
    assert status == want_status, payload[:300]
    err = json.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if want_code is not None:
        assert err["code"] == want_code, err


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, engine):
    port, _ = server
    assert len(BAD) >= 25
    want = ask(port, synthetic_image(0), "What is in the image?", n=4).choices[0].model_extra["token_ids"]
    for name, (status, code, body, headers) in BAD.items():
        got_status, _, payload = _post(port, body, headers)
        _assert_openai_error(got_status, payload, status, code)
    for method, path, status in (("GET", "/v1/chat/completions", 405), ("POST", "/v1/nothing", 404), ("GET", "/v1/models", 200)):
        got_status, _, payload = _post(port, b"", {}, path, method)
        if status != 200:
            _assert_openai_error(got_status, payload, status, None)
        else:
            assert got_status == 200
    assert ask(port, synthetic_image(0), "What is in the image?", n=4).choices[0].model_extra["token_ids"] == want
    assert want == batch1(engine, synthetic_image(0), "What is in the image?", 4)


def test_openai_client_sees_typed_errors(server):
    port, _ = server
    url = data_url(synthetic_image(0))
    with pytest.raises(openai.AuthenticationError):
        client(port, key="wrong").chat.completions.create(model=MODEL, messages=messages("hi", url))
    with pytest.raises(openai.NotFoundError):
        client(port).chat.completions.create(model="gpt-4o", messages=messages("hi", url))
    with pytest.raises(openai.BadRequestError) as e:
        client(port).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "no image"}])
    assert "exactly one image" in e.value.message


def test_a_client_leaving_mid_stream_frees_its_row(server):
    port, app = server
    stream = ask(port, synthetic_image(1), QUESTIONS[1], n=24, stream=True)
    next(iter(stream))
    stream.close()
    for _ in range(100):
        if not app.state.scheduler.rows and not app.state.scheduler.waiting:
            break
        time.sleep(0.05)
    assert not app.state.scheduler.rows
    assert ask(port, synthetic_image(0), QUESTIONS[0], n=4).choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------ the other routes


def test_models_health_metrics(server):
    port, _ = server
    models = client(port).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["star"]["limits"]["max_batch_size"] == 4
    status, _, body = _post(port, b"", {}, "/health", "GET")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, _ = _post(port, b"", {"Authorization": ""}, "/v1/models", "GET")
    assert status == 401
    # one request of each status here: under pytest-xdist this test may be the first of its worker's server
    assert ask(port, synthetic_image(0), QUESTIONS[0], n=2).choices[0].finish_reason in ("stop", "length")
    assert _post(port, b'{"model": "tiny-llava", "messages": [', {})[0] == 400
    status, headers, body = _post(port, b"", {"Authorization": ""}, "/metrics", "GET")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("star_requests_total", "star_time_to_first_token_seconds_bucket", "star_time_per_output_token_seconds_bucket",
                 "star_queue_depth", "star_running_batch_size", "star_generation_tokens_total", 'star_visual_tokens_total{stage="kept"}',
                 "star_decode_batch_size_bucket"):
        assert name in text, name
    assert 'star_requests_total{status="200"}' in text and 'star_requests_total{status="400"}' in text


def test_health_is_503_when_the_scheduler_is_not_running(engine):
    with running(engine) as (port, app):
        app.state.scheduler.failure = RuntimeError("planted")
        status, _, body = _post(port, b"", {}, "/health", "GET")
        _assert_openai_error(status, body, 503, None)


# ------------------------------------------------------------------ the command


def test_star_serve_command(serve_engine, tmp_path, capsys):
    """Starts only on a loadable engine, refuses a busy port (exit 2), serves over loopback, stops on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    from star_export.cli import serve_main
    from star_export.serve import bind

    exe = [sys.executable, "-c", "import sys; from star_export.cli import serve_main; sys.exit(serve_main())"]
    with pytest.raises(SystemExit) as e:
        serve_main(["--help"])
    assert e.value.code == 0
    assert serve_main([str(tmp_path / "missing")]) == 2
    assert "star-serve: error:" in capsys.readouterr().err
    busy = bind("127.0.0.1", 0)
    assert serve_main([str(serve_engine), "--port", str(busy.getsockname()[1])]) == 2
    busy.close()
    assert "choose another --port" in capsys.readouterr().err
    for argv in (["--port", "70000"], ["--request-timeout", "0"], ["--max-queue", "0"]):
        with pytest.raises(SystemExit) as e:
            serve_main([str(serve_engine), *argv])
        assert e.value.code == 2
    env = os.environ | {"STAR_API_KEY": API_KEY}
    proc = subprocess.Popen(exe + [str(serve_engine), "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "star-serve exited before serving"
        port = int(line.rsplit("(port ", 1)[1].rstrip(")\n"))
        r = client(port).chat.completions.create(model=MODEL, messages=messages("hi", data_url(synthetic_image(0))), temperature=0, max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            client(port, key="nope").models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode in (0, 143), proc.stderr.read()


def test_remote_images_only_when_allowed(engine, tmp_path):
    """--allow-remote-images fetches http(s) URLs (here a loopback file server); redirects to other schemes and
    oversized downloads are refused; without the flag the same URL is a 400."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    image = synthetic_image(2)
    image.save(tmp_path / "cat.png")
    (tmp_path / "big.png").write_bytes(b"\0" * (MAX_IMAGE_BYTES + 1))

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with running(engine, allow_remote_images=True) as (port, _):
            c = client(port)
            remote = c.chat.completions.create(model=MODEL, messages=messages(QUESTIONS[0], f"{base}/cat.png"), temperature=0, max_tokens=6)
            inline = c.chat.completions.create(model=MODEL, messages=messages(QUESTIONS[0], data_url(image)), temperature=0, max_tokens=6)
            assert remote.choices[0].model_extra["token_ids"] == inline.choices[0].model_extra["token_ids"]
            # (urllib refuses the redirect to file: itself; ours refuses ftp: too)
            for path, code in (("/redirect", "image_fetch_failed"), ("/big.png", "image_too_large"), ("/missing.png", "image_fetch_failed")):
                with pytest.raises(openai.BadRequestError) as e:
                    c.chat.completions.create(model=MODEL, messages=messages("hi", base + path), max_tokens=2)
                assert e.value.body["code"] == code, path
        with running(engine) as (port, _):
            with pytest.raises(openai.BadRequestError) as e:
                client(port).chat.completions.create(model=MODEL, messages=messages("hi", f"{base}/cat.png"), max_tokens=2)
            assert e.value.body["code"] == "remote_image_refused"
    finally:
        files.shutdown()


def test_a_failing_decode_step_fails_its_rows_and_the_server_goes_on(engine, monkeypatch):
    with running(engine) as (port, app):
        pipeline = app.state.scheduler.pipeline
        real = pipeline.step
        calls = []

        def planted(state, tokens):  # the first decode step fails
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("planted")
            return real(state, tokens)

        monkeypatch.setattr(pipeline, "step", planted)
        with pytest.raises(openai.InternalServerError, match="decoding failed"):
            ask(port, synthetic_image(0), QUESTIONS[0], n=6)
        status, _, _ = _post(port, b"", {}, "/health", "GET")
        assert status == 200
        r = ask(port, synthetic_image(0), QUESTIONS[0], n=6)
        assert r.choices[0].model_extra["token_ids"] == batch1(engine, synthetic_image(0), QUESTIONS[0], 6)


def test_star_serve_without_its_extra_names_it(serve_engine, monkeypatch, capsys):
    """A plain `pip install star-export` has no server packages: exit 2 naming the extra, before the engine loads."""
    import sys

    from star_export.cli import serve_main
    from star_export.errors import user_error_from

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ModuleNotFoundError
    assert serve_main([str(serve_engine), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'star-export[serve]'" in err and "'uvicorn'" in err and "loading" not in err
    assert user_error_from(RuntimeError("a bug")) is None
    missing = ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")
    assert "star-export[bench]" in str(user_error_from(missing))
