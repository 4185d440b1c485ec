#!/usr/bin/env python
"""Hostile load on star-serve (docs/serving/hostile.md): C clients each looping over hostile requests for T seconds,
while one normal client asks every second; the server is a star-serve process this script starts.

    python scripts/hostile_load.py                          # tiny-llava engine (exported here), 16 clients, 60 s
    python scripts/hostile_load.py --engine DIR --json docs/serving/hostile-load.json

Reported, and checked (exit 1 if any fails): every normal request answered within 2 s; the server's RSS (from /proc,
sampled every 50 ms) under 2x its idle RSS (measured after one warm-up request); no 5xx answer to anyone; the greedy
answer after the storm equals the one before. The hostile kinds (each client starts at its own kind and cycles):
JSON nested 100,000 deep, a lone surrogate, a body of text just under the body limit, a 5000 x 1 PNG, a 1 x 12000
PNG, a 16-bit 8000 x 8000 PNG (accepted: a 64-megapixel decode), 8000 x 8000 JPEGs EXIF-rotated, CMYK and
progressive and an 8000 x 8000 WebP (over the default image memory of a small engine's server), a decompression-bomb
header, an oversized body, a client leaving mid-upload, a non-streaming client leaving, a streaming client leaving
after its first chunk; and, held open beside them (one of each per client at a time): idle sockets, headers sent a
byte every 2 s, a body sent a byte every 2 s, and bursts of 64 connections.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtest import rss_mib, start_server  # noqa: E402  (scripts/loadtest.py)

MODEL = "tiny-llava"
SLOW = {"idle-socket", "slow-headers", "slow-body", "connection-burst"}  # kinds that wait on the server's timeouts
NORMAL_QUESTION = "What is in the image?"


def _png_header(width: int, height: int, color_type: int = 2, depth: int = 8) -> bytes:
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _encoded(im, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _body(url: str, question: str = NORMAL_QUESTION, **over) -> bytes:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0} | over).encode()


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def make_payloads(body_limit: int) -> tuple[bytes, dict[str, bytes]]:
    """The normal request's body, and each hostile kind's body (the socket-level kinds need none)."""
    import numpy as np
    from PIL import Image

    from star_export.runtime.inputs import synthetic_image

    normal = _body(_data_url(_encoded(synthetic_image(0))))
    gradient = (np.add.outer(np.arange(8000, dtype=np.uint32), np.arange(8000, dtype=np.uint32)) * 4 % 65536).astype(np.uint16)
    sixteen = _encoded(Image.fromarray(gradient), compress_level=9)
    del gradient
    big = Image.new("RGB", (8000, 8000), (40, 90, 160))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _encoded(big, "JPEG", quality=50, exif=exif)
    cmyk = _encoded(big.convert("CMYK"), "JPEG", quality=50)
    progressive = _encoded(big, "JPEG", quality=50, progressive=True, subsampling=0)
    webp = _encoded(big, "WEBP", quality=10)
    del big
    text_body = _body(_data_url(_encoded(synthetic_image(1))), "cat " * ((body_limit - 50_000) // 4))
    nested = b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return normal, {
        "nested-json": nested,
        "lone-surrogate": normal.replace(b"What is in", b"What \\ud800 is in"),
        "text-near-body-limit": text_body,
        "png-5000x1": _body(_data_url(_encoded(Image.new("RGB", (5000, 1))))),
        "png-1x12000": _body(_data_url(_encoded(Image.new("L", (1, 12000))))),
        "png-16bit-8000x8000": _body(_data_url(sixteen)),
        "jpeg-rotated-8000x8000": _body(_data_url(rotated, "image/jpeg")),
        "jpeg-cmyk-8000x8000": _body(_data_url(cmyk, "image/jpeg")),
        "jpeg-progressive-8000x8000": _body(_data_url(progressive, "image/jpeg")),
        "webp-8000x8000": _body(_data_url(webp, "image/webp")),
        "bomb-header": _body(_data_url(_png_header(100_000, 100_000))),
        "oversized-body": b'{"model": "' + MODEL.encode() + b'", "user": "' + b"x" * (body_limit + 1000) + b'"}',
    }


class Server:
    def __init__(self, port: int):
        self.port = port

    def post(self, body: bytes, timeout: float = 120) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def sock(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=120)


def _head(length: int) -> bytes:
    return f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()


def _read_status(sock: socket.socket) -> int | str:
    """The status of the server's answer on `sock`, or "closed" when it closed the connection without one."""
    try:
        data = sock.recv(64)
    except OSError:
        return "closed"
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else "closed"


def socket_kinds(server: Server, normal: bytes, stop: threading.Event) -> dict:
    """The hostile kinds that need a socket of their own; each returns the status seen ("closed": closed without an
    answer, "stopped": the run ended first)."""

    def idle():
        with server.sock() as s:
            return _read_status(s)  # the header timeout closes it

    def trickle(s: socket.socket, data: bytes) -> int | str | None:
        """Send `data` a byte every 2 s; the server's answer as soon as one comes (or "closed", "stopped"); None once
        all is sent unanswered."""
        s.settimeout(2)
        for i in range(len(data)):
            if stop.is_set():
                return "stopped"
            try:
                s.sendall(data[i:i + 1])
            except OSError:
                return _read_status(s)  # closed by a timeout, perhaps with an answer first
            try:
                answer = s.recv(64)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return "closed"  # reset by the server
            return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else "closed"
        s.settimeout(120)
        return None

    def slow_headers():
        with server.sock() as s:
            return trickle(s, _head(len(normal))) or _read_status(s)  # the header timeout closes it

    def slow_body():
        with server.sock() as s:
            s.sendall(_head(len(normal)))
            return trickle(s, normal) or _read_status(s)  # the body timeout answers 408

    def leave_mid_upload():
        with server.sock() as s:
            s.sendall(_head(len(normal) * 10) + normal[: len(normal) // 2])
            time.sleep(0.2)
        return "left"  # the server's 499 is counted in its /metrics

    def leave_non_streaming():
        with server.sock() as s:
            s.sendall(_head(len(normal)) + normal)
            time.sleep(0.3)
        return "left"

    def leave_stream():
        body = normal.replace(b'"temperature": 0', b'"temperature": 0, "stream": true')
        with server.sock() as s:
            s.sendall(_head(len(body)) + body)
            return _read_status(s)  # the first bytes of the stream; then the client leaves

    def connection_burst():
        socks = []
        try:
            for _ in range(64):
                socks.append(server.sock())
            time.sleep(3)
        finally:
            for s in socks:
                s.close()
        return f"held {len(socks)}"

    return {"idle-socket": idle, "slow-headers": slow_headers, "slow-body": slow_body, "leave-mid-upload": leave_mid_upload,
            "leave-non-streaming": leave_non_streaming, "leave-stream": leave_stream, "connection-burst": connection_burst}


def greedy(server: Server, normal: bytes) -> list[int]:
    status, payload = server.post(normal)
    assert status == 200, payload[:300]
    return json.loads(payload)["choices"][0]["token_ids"]


def server_counts(port: int) -> dict[str, float]:
    """The server's own counts from /metrics: requests by status, connections closed by reason."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    found = re.findall(r'^(star_requests_total|star_connections_closed_total)\{(\w+)="(\w+)"\} (\S+)$', text, re.M)
    return {f"{name}{{{label}={value}}}": float(count) for name, label, value, count in found}


def lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", type=Path, help="engine directory (default: export tiny-llava into a temporary directory)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    import tempfile

    tmp = tempfile.TemporaryDirectory()
    engine = args.engine
    if engine is None:
        from star_export.cli import export_main

        engine = Path(tmp.name) / "engine"
        assert export_main(["--out", str(engine), "--no-validate", "--quiet", "--max-batch-size", "4", "--max-new-tokens", "24", "--max-input-len", "700"]) == 0
    from star_export.serve.app import ServeSettings

    normal, payloads = make_payloads(ServeSettings(model_name=MODEL).max_body_bytes)
    proc, port = start_server(engine)
    server = Server(port)
    stop = threading.Event()
    try:
        before = greedy(server, normal)
        time.sleep(1)
        idle = rss_mib(proc.pid)
        peak = [idle]

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(proc.pid))
                time.sleep(0.05)

        kinds = {name: (lambda body=body: server.post(body)[0]) for name, body in payloads.items()}
        kinds |= socket_kinds(server, normal, stop)
        names = sorted(kinds)
        seen: dict[str, Counter] = {name: Counter() for name in names}

        def record(name: str):
            try:
                status = kinds[name]()
            except Exception as e:  # a client-side error (reset, timeout) is an outcome to count, not a crash
                status = type(e).__name__
            seen[name][str(status)] += 1

        background: list[threading.Thread] = []

        def hostile(i: int):
            """Kind after kind from the i-th; a slow kind runs beside the others (one of each per client at a time),
            so that every client keeps sending while its slow connections wait for the server's timeouts."""
            k, slow = i, {}
            while not stop.is_set():
                name = names[k % len(names)]
                k += 1
                if name not in SLOW:
                    record(name)
                elif name not in slow or not slow[name].is_alive():
                    slow[name] = threading.Thread(target=record, args=(name,), daemon=True)
                    slow[name].start()
                    background.append(slow[name])

        latencies, normal_statuses = [], Counter()

        def normal_client():
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    status, payload = server.post(normal, timeout=30)
                except Exception as e:
                    status = type(e).__name__
                latencies.append(time.monotonic() - t0)
                normal_statuses[str(status)] += 1
                time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))

        threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=normal_client, daemon=True)]
        threads += [threading.Thread(target=hostile, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads + background:
            t.join(timeout=180)
        time.sleep(2)
        after = greedy(server, normal)
        served = server_counts(port)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        tmp.cleanup()

    five_xx = {name: n for name, c in seen.items() for s, n in c.items() if s.isdigit() and s.startswith("5")}
    five_xx |= {"normal": n for s, n in normal_statuses.items() if s.startswith("5")}
    five_xx |= {key: n for key, n in served.items() if key.startswith('star_requests_total{status=5')}  # as the server counted them
    slowest = max(latencies)
    result = {
        "clients": args.clients, "seconds": args.seconds, "idle_rss_mib": round(idle, 1), "peak_rss_mib": round(peak[0], 1),
        "peak_over_idle": round(peak[0] / idle, 3), "normal_requests": len(latencies), "normal_statuses": dict(normal_statuses),
        "normal_latency_s": {"median": round(sorted(latencies)[len(latencies) // 2], 3), "min": round(min(latencies), 3), "max": round(slowest, 3)},
        "hostile_outcomes": {name: dict(c) for name, c in seen.items()}, "responses_5xx": five_xx, "greedy_equal": before == after,
        "server_metrics": served,
        "lscpu": lscpu(),
    }
    checks = {"every normal request within 2 s": slowest < 2.0 and set(normal_statuses) == {"200"},
              "peak RSS under 2x idle": peak[0] < 2 * idle, "no 5xx": not five_xx, "greedy answer unchanged": before == after}
    result["checks"] = checks
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "lscpu"}, indent=2))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    failures = [name for name, ok in checks.items() if not ok]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
