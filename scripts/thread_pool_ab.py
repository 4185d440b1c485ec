#!/usr/bin/env python
"""ONNX Runtime's thread pools: `star-run` with one shared pool (the commands' default) against a pool per session
(`STAR_ORT_THREAD_POOL=per-session`, what earlier releases did), as alternating processes.

The mode is fixed by a process's first session (runtime/threads.py), so the two cannot alternate within one process:
each round runs `star-run --json` once per mode, the order alternating between rounds, on the same engine, image and
prompt, greedy. Reported per mode: decode ms/step and prefill s (median, min-max over the rounds), peak RSS
(the child's own `ru_maxrss`); and per round the shared / per-session ratio of each, summarised. The token ids of both
modes must be equal (the pool changes the schedule, not the arithmetic); the script says so when they are not.

    python scripts/thread_pool_ab.py --engine ENGINE [--rounds 6] [--tokens 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import emit, summary
from star_export.runtime.threads import THREAD_POOL_ENV

MODES = ("per-session", "shared")


def star_run(engine: str, image: str, tokens: int, mode: str) -> dict:
    """One `star-run --json` in a process of its own with the given pool mode: its timings, tokens and peak RSS."""
    code = "import sys; from star_export.cli import run_main; sys.exit(run_main(sys.argv[1:]))"
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([sys.executable, "-c", code, engine, "--image", image, "--prompt", "Describe the picture in detail.",
                                  "--max-new-tokens", str(tokens), "--json", "--quiet"],
                                 stdout=stdout, stderr=stderr, text=True, env=os.environ | {THREAD_POOL_ENV: mode})
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if child.returncode:
            raise SystemExit(f"star-run ({THREAD_POOL_ENV}={mode}) exited {child.returncode}: {stderr.read()[-2000:]}")
        out = json.loads(stdout.read())
    timings = out["timings"]
    return {"decode_ms_per_step": timings["decode_s"] / timings["decode_steps"] * 1e3, "prefill_s": timings["prefill_s"],
            "vision_s": timings["vision_s"], "token_ids": out["token_ids"], "peak_rss_gib": usage.ru_maxrss / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "star_export" / "assets" / "example.png"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    runs = {mode: [] for mode in MODES}
    for r in range(a.rounds):
        for mode in MODES[:: 1 if r % 2 == 0 else -1]:
            runs[mode].append(star_run(a.engine, a.image, a.tokens, mode))
            print(f"round {r + 1}/{a.rounds} {mode}: {runs[mode][-1]['decode_ms_per_step']:.2f} ms/step", file=sys.stderr)
    result = {"engine": a.engine, "rounds": a.rounds, "tokens": a.tokens, "cpu_count": os.cpu_count()}
    for mode in MODES:
        result[mode] = {k: summary([run[k] for run in runs[mode]]) for k in ("decode_ms_per_step", "prefill_s", "vision_s", "peak_rss_gib")}
    for k in ("decode_ms_per_step", "prefill_s"):
        result[f"shared_over_per_session_{k}"] = summary([s[k] / q[k] for s, q in zip(runs["shared"], runs["per-session"])])
    result["same_tokens"] = all(s["token_ids"] == q["token_ids"] for s, q in zip(runs["shared"], runs["per-session"]))
    if not result["same_tokens"]:
        print("warning: the two modes generated different tokens", file=sys.stderr)
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
