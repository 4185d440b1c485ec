#!/usr/bin/env python
"""Load test of star-serve: N concurrent OpenAI clients for T seconds against a server this script starts.

    python scripts/loadtest.py                       # tiny-llava engine (exported here), 32 clients, 60 s, then 1 vs 16
    python scripts/loadtest.py --engine DIR --clients 8 --seconds 30 --json out.json

Every client loops streaming chat completions (temperature 0, varied prompts and images) and records latency, time to
first token and tokens. Reported: errors, p50/p99 latency and TTFT, requests/s and tokens/s, the server's RSS before
and after (from /proc), the mean running batch size (the server's own per-step histogram), and a throughput
comparison of 1 vs 16 concurrent clients measured in alternating rounds of one run (timings on shared machines are
noisy: compare only within a run). The clients run on the same machine as the server and take CPU from it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["What is in the image?", "How many cats are sitting on the wooden table in this bright kitchen?", "Describe the picture.",
             "What colour is the largest rectangle, and where is it?"]


def start_server(engine: Path) -> tuple[subprocess.Popen, int]:
    exe = [sys.executable, "-c", "import sys; from star_export.cli import serve_main; sys.exit(serve_main())"]
    proc = subprocess.Popen(exe + [str(engine), "--port", "0", "--max-queue", "1024"], stderr=subprocess.PIPE, text=True)
    line = ""
    while "serving" not in line:
        line = proc.stderr.readline()
        if not line:
            sys.exit(f"star-serve exited: {proc.wait()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
    return proc, int(re.search(r"\(port (\d+)\)", line).group(1))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def batch_histogram(port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return value("star_decode_batch_size_sum"), value("star_decode_batch_size_count")


def make_requests():
    from star_export.runtime.inputs import synthetic_image

    urls = []
    for i in range(4):
        buf = io.BytesIO()
        synthetic_image(i).save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[i % 4]}}, {"type": "text", "text": QUESTIONS[(i // 4) % 4]}]}]
            for i in range(16)]


def phase(port: int, model: str, clients: int, seconds: float, max_tokens: int, requests: list) -> dict:
    import openai

    records, errors, lock = [], [], threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        i = k
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            ttft, tokens = None, 0
            try:
                for chunk in c.chat.completions.create(model=model, messages=requests[i % len(requests)], temperature=0, max_tokens=max_tokens,
                                                       stream=True, stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].delta.content and ttft is None:
                        ttft = time.monotonic() - t0
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
                with lock:
                    records.append((time.monotonic() - t0, ttft if ttft is not None else time.monotonic() - t0, tokens))
            except Exception as e:  # counted, not raised: the load goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")
            i += clients

    before = batch_histogram(port)
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    after = batch_histogram(port)
    lat = sorted(r[0] for r in records)
    ttft = sorted(r[1] for r in records)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    steps = after[1] - before[1]
    return {
        "clients": clients, "seconds": round(elapsed, 1), "requests": len(records), "errors": len(errors), "error_samples": errors[:3],
        "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99), "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
        "requests_per_s": len(records) / elapsed, "tokens_per_s": sum(r[2] for r in records) / elapsed,
        "mean_batch_size": (after[0] - before[0]) / steps if steps else float("nan"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, default=None, help="engine directory (default: export tiny-llava here, max batch 16)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--compare", default="1,16", help="client counts compared for throughput")
    p.add_argument("--compare-seconds", type=float, default=15, help="per round; rounds alternate between the counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    tmp = None
    if args.engine is None:
        from star_export.cli import export_main

        tmp = tempfile.TemporaryDirectory()
        args.engine = Path(tmp.name) / "tiny"
        if export_main(["--out", str(args.engine), "--no-validate", "--quiet", "--max-batch-size", "16", "--max-new-tokens", "64"]) != 0:
            return 1
    from star_export.manifest import EngineManifest
    from star_export.serve import default_model_name

    model = default_model_name(EngineManifest.read(args.engine, verify=False))
    requests = make_requests()
    proc, port = start_server(args.engine)
    try:
        phase(port, model, args.clients, 10, args.max_tokens, requests)  # warm-up at full load: sessions, arenas at the largest batch
        rss_before = rss_mib(proc.pid)
        samples, sampling = [], threading.Event()

        def sample():  # the server's RSS every 5 s of the load: growth shows as a trend, not one end point
            while not sampling.wait(5):
                samples.append(round(rss_mib(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = phase(port, model, args.clients, args.seconds, args.max_tokens, requests)
        sampling.set()
        rss_after = rss_mib(proc.pid)
        counts = [int(c) for c in args.compare.split(",")]
        rounds = {c: [] for c in counts}
        for _ in range(args.rounds):
            for c in counts:
                rounds[c].append(phase(port, model, c, args.compare_seconds, args.max_tokens, requests))
        rss_end = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result = {"engine": str(args.engine), "model": model, "max_tokens": args.max_tokens, "cpus": os.cpu_count(), "load": load,
              "server_rss_mib": {"before": rss_before, "after": rss_after, "end": rss_end, "every_5s": samples}, "compare": rounds}
    print(f"## {args.clients} clients x {args.seconds:.0f} s, max_tokens {args.max_tokens} ({model}, {os.cpu_count()} CPUs)\n")
    print(f"server RSS (MiB): {rss_before:.0f} after a 10 s warm-up at {args.clients} clients, {rss_after:.0f} after the load, {rss_end:.0f} at the end; every 5 s of the load: {samples}\n")
    print("| requests | errors | latency p50 / p99 (s) | TTFT p50 / p99 (s) | requests/s | tokens/s | mean batch | server RSS before -> after (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {load['requests']} | {load['errors']} | {load['latency_p50_s']:.3f} / {load['latency_p99_s']:.3f} | {load['ttft_p50_s']:.3f} / "
          f"{load['ttft_p99_s']:.3f} | {load['requests_per_s']:.1f} | {load['tokens_per_s']:.0f} | {load['mean_batch_size']:.2f} | {rss_before:.0f} -> {rss_after:.0f} |")
    print(f"\n## throughput by concurrency ({args.rounds} alternating rounds of {args.compare_seconds:.0f} s; median (min-max))\n")
    print("| clients | tokens/s | requests/s | mean batch | errors | vs first |")
    print("|---|---|---|---|---|---|")
    med = lambda c, k: statistics.median(r[k] for r in rounds[c])  # noqa: E731
    for c in counts:
        tok = [r["tokens_per_s"] for r in rounds[c]]
        print(f"| {c} | {med(c, 'tokens_per_s'):.0f} ({min(tok):.0f}-{max(tok):.0f}) | {med(c, 'requests_per_s'):.1f} | {med(c, 'mean_batch_size'):.2f} | "
              f"{sum(r['errors'] for r in rounds[c])} | {med(c, 'tokens_per_s') / med(counts[0], 'tokens_per_s'):.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    errors = load["errors"] + sum(r["errors"] for rs in rounds.values() for r in rs)
    if errors:
        print(f"\n{errors} errors, e.g. {load['error_samples'] or next(r['error_samples'] for rs in rounds.values() for r in rs if r['errors'])}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
