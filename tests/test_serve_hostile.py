"""star-serve under hostile requests, on a real uvicorn on loopback with star-serve's own protocol and limits
(test_serve.running). Nothing a client sends is a 5xx; slow, idle, departing and excess connections are closed or
answered 4xx / 499 and counted in /metrics; images are bounded from their headers; and the server goes on answering
the same greedy text."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from star_export.runtime.inputs import synthetic_image
from test_serve import API_KEY, MODEL, _assert_openai_error, _b64, _good, _post, _with_url, ask, data_url, messages, running


@pytest.fixture(scope="module")
def engine(tiny_engine):
    from star_export.runtime.engine import Engine

    return Engine(tiny_engine, provider="cpu")


def _png(width: int, height: int, color_type: int = 2, depth: int = 8) -> bytes:
    """A PNG header declaring width x height pixels of this colour type and depth, with no pixel data."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _metric(port: int, name: str, **labels) -> float:
    _, _, text = _post(port, b"", {}, "/metrics", "GET")
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}(?:\{{{re.escape(want)}\}})? (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text.decode(), re.M)
    return float(found.group(1)) if found else 0.0


def _server_errors(port: int) -> float:
    _, _, text = _post(port, b"", {}, "/metrics", "GET")
    return sum(float(v) for v in re.findall(r'^star_requests_total\{status="5\d\d"\} (\S+)$', text.decode(), re.M))


def _nested(depth: int) -> bytes:
    return b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE = {
    # name: (status, code or None, body)
    "JSON nested 100,000 deep": (400, None, _nested(100_000)),
    "JSON nested 40 deep": (400, None, _nested(40)),
    "a lone surrogate in the text": (400, None, _good().replace(b"What is in", b"What \\ud800 is in")),
    "text far over the prompt limit": (400, "context_length_exceeded", _good(messages=messages("cat " * 150_000, data_url(synthetic_image(0))))),
    "a 5000 x 1 PNG (processor resize 1.7 G pixels)": (400, "invalid_image", _with_url(_b64(_encoded(Image.new("RGB", (5000, 1)))))),
    "a 1 x 12000 PNG": (400, "invalid_image", _with_url(_b64(_encoded(Image.new("L", (1, 12000)))))),
    "an 8000 x 8000 RGBA PNG header (over the image memory)": (400, "image_too_large", _with_url(_b64(_png(8000, 8000, color_type=6)))),
    "a 30000 x 30000 16-bit PNG header": (400, "invalid_image", _with_url(_b64(_png(30000, 30000, color_type=0, depth=16)))),
    "an integer of 5,000 digits": (400, "invalid_json", _good().replace(b'"max_tokens": 4', b'"max_tokens": ' + b"9" * 5000)),
    "a 1 MB model name": (404, "model_not_found", _good(model="m" * 1_000_000)),
    "a 1 MB unknown parameter": (400, None, _good(**{"k" * 1_000_000: 1})),
    "a 1 MB media type": (400, "invalid_image", _with_url("data:image/" + "x" * 1_000_000 + ";base64,AAAA")),
    "a GIF header of 65535 x 65535": (400, "invalid_image", _with_url(_b64(b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;"))),
}


def test_hostile_bodies_are_4xx_and_the_answer_is_unchanged(engine):
    with running(engine, api_key=API_KEY, max_image_memory=320 << 20) as (port, app):  # star-serve's floor (the default here follows RSS)
        want = ask(port, synthetic_image(0), "What is in the image?", n=4).choices[0].model_extra["token_ids"]
        for name, (status, code, body) in HOSTILE.items():
            got, _, payload = _post(port, body, {})
            _assert_openai_error(got, payload, status, code)
            assert len(payload) < 2048, f"{name}: a {len(payload):,}-byte error repeats what the client sent"
        assert ask(port, synthetic_image(0), "What is in the image?", n=4).choices[0].model_extra["token_ids"] == want
        assert _server_errors(port) == 0 and app.state.image_memory.used == 0


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the server closed the connection within `seconds`, what it sent before)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
        return True, got
    except (socket.timeout, TimeoutError):
        return False, got
    except ConnectionResetError:
        return True, got


def test_idle_and_half_sent_headers_are_closed(engine):
    with running(engine, header_timeout=0.5) as (port, _):
        idle = _connect(port)
        slow = _connect(port)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # ... and the rest never comes
        assert _closed_within(idle, 10)[0] and _closed_within(slow, 10)[0]
        assert _metric(port, "star_connections_closed_total", reason="header_timeout") == 2
        kept = _connect(port)  # a kept-alive connection after its response gets the same time for its next headers
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, got = _closed_within(kept, 10)
        assert closed and got.startswith(b"HTTP/1.1 200")


def test_a_body_sent_too_slowly_is_408(engine):
    with running(engine, body_timeout=0.5) as (port, _):
        sock = _connect(port)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        closed, got = _closed_within(sock, 10)
        assert closed and got.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in got
        assert _server_errors(port) == 0


def test_a_client_leaving_mid_upload_is_499(engine):
    with running(engine) as (port, _):
        sock = _connect(port)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b" " * 5000)
        time.sleep(0.2)
        sock.close()
        for _ in range(100):
            if _metric(port, "star_requests_total", status="499") == 1:
                break
            time.sleep(0.05)
        assert _metric(port, "star_requests_total", status="499") == 1 and _server_errors(port) == 0


def test_a_non_streaming_client_leaving_cancels_its_job(engine, monkeypatch):
    """The decode steps are slowed so that the job is certainly running when its client leaves."""
    with running(engine) as (port, app):
        pipeline = app.state.scheduler.pipeline
        real = pipeline.step
        monkeypatch.setattr(pipeline, "step", lambda state, tokens: (time.sleep(0.25), real(state, tokens))[1])
        body = _good(max_tokens=8)
        sock = _connect(port)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        for _ in range(200):
            if app.state.scheduler.rows:
                break
            time.sleep(0.02)
        assert app.state.scheduler.rows, "the job never started"
        sock.close()
        for _ in range(100):
            if not app.state.scheduler.rows:
                break
            time.sleep(0.05)
        assert not app.state.scheduler.rows, "the job ran on after its client left"
        assert _metric(port, "star_generation_tokens_total") < 8
        assert _metric(port, "star_requests_total", status="499") == 1 and _server_errors(port) == 0


def test_connections_over_the_cap_are_429(engine):
    with running(engine, max_connections=3) as (port, _):
        held = [_connect(port) for _ in range(3)]
        time.sleep(0.2)
        extra = _connect(port)
        closed, got = _closed_within(extra, 10)
        assert closed and got.startswith(b"HTTP/1.1 429") and b'"too_many_connections"' in got
        for s in held:  # (the metrics request needs a connection of its own)
            s.close()
        time.sleep(0.2)
        assert _metric(port, "star_connections_closed_total", reason="connection_limit") == 1
        assert ask(port, synthetic_image(0), "What is in the image?", n=2).choices[0].finish_reason in ("stop", "length")


def test_concurrent_large_images_share_one_memory_budget(engine):
    """Eight clients at once, each with a 16-bit 2000 x 2000 PNG (a 61 MiB decode share) against a 128 MiB budget:
    every answer is 200 or 429 (never a 5xx), at most two decode at a time, and the budget is whole afterwards."""
    gradient = (np.add.outer(np.arange(2000), np.arange(2000)) * 16 % 65536).astype(np.uint16)
    body = _with_url(_b64(_encoded(Image.fromarray(gradient))))
    with running(engine, max_image_bytes=len(body), max_image_memory=128 << 20) as (port, app):
        peak, statuses, stop = [0], [], threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], app.state.image_memory.used)
                time.sleep(0.001)

        def post():
            statuses.append(_post(port, body, {})[0])

        watcher = threading.Thread(target=watch)
        watcher.start()
        clients = [threading.Thread(target=post) for _ in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=300)
        stop.set()
        watcher.join()
        assert all(s in (200, 429) for s in statuses) and statuses.count(200) >= 1, statuses
        assert 0 < peak[0] <= 128 << 20 and app.state.image_memory.used == 0


# ------------------------------------------------------------------ property: random bodies and image headers

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
_header = st.builds(lambda w, h, ct, depth, tail: _png(w, h, ct, depth)[: 8 + 25] + tail,
                    st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.sampled_from([0, 2, 3, 4, 6]), st.sampled_from([1, 8, 16]),
                    st.binary(max_size=64))
_image_bytes = _header | st.binary(max_size=200) | st.builds(lambda prefix, tail: prefix + tail,
                                                            st.sampled_from([b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8 ", b"II*\0"]),
                                                            st.binary(max_size=120))


def _body(kind, value, image):
    if kind == "json":
        return json.dumps(value).encode()
    if kind == "messages":
        return _good(messages=value)
    if kind == "image":
        return _with_url("data:image/png;base64," + base64.b64encode(image).decode())
    return _good(**value) if isinstance(value, dict) else _good(user=value)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["json", "messages", "image", "fields"]), value=_json, image=_image_bytes)
def test_random_bodies_and_image_headers_are_never_5xx(server_for_property, kind, value, image):
    port = server_for_property
    status, _, _ = _post(port, _body(kind, value, image), {})
    assert 200 <= status < 500, (kind, value, image[:60])


@pytest.fixture(scope="module")
def server_for_property(engine):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with running(engine, api_key=API_KEY) as (port, app):
        yield port
        assert _server_errors(port) == 0 and app.state.image_memory.used == 0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 1024, f"the process's peak memory grew by {grown_mib:.0f} MiB"
