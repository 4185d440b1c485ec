#!/usr/bin/env python
"""One ONNX Runtime setting of star-export's, A against B, each the value of an environment variable.

Knobs: `thread-pool` ($STAR_ORT_THREAD_POOL: a pool per session against the commands' one shared pool,
runtime/threads.py; fixed by a process's first session) and `cpu-arena` ($STAR_ORT_CPU_ARENA: an arena per session
against one shared by the process, or `--values` any two of shared, session, off; runtime/sessions.py; read per
session). Two ways to compare:
- Processes (default): `star-run --json` once per value per round, the order alternating between rounds, on the same
  engine, image and prompt, greedy. Reported per value: decode ms/step, prefill s and vision s (median, min-max over the
  rounds), peak RSS (the child's own `ru_maxrss`); and per round the B / A ratio of each time, summarised. Each process
  runs one prefill, into fresh memory: what a first request costs, not a server's next one.
- `--in-process`, for a per-session knob: the engine loaded once per value in this process (in the order A B, or B A
  with `--b-first`: sessions created first in a process can run slower, gqa_step_ab.py), then per round one prefill
  each, order alternating, and `--steps` decode steps alternating step by step (A B B A ...); the first round is a
  warm-up, not kept. Repeated calls, as a server makes them. Reported: prefill s per value and the B / A ratio per round,
  decode ms per value and the B / A ratio per step pair.
The token ids of both values must be equal (neither knob changes the arithmetic); the script says so when they are not.

    python scripts/runtime_ab.py --knob thread-pool|cpu-arena --engine ENGINE [--values A B] [--rounds 6] [--tokens 40] [--json out.json]
    python scripts/runtime_ab.py --knob cpu-arena --engine ENGINE --in-process [--values A B] [--rounds 8] [--steps 16] [--b-first] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import alternate_steps, emit, summary
from star_export.runtime.sessions import CPU_ARENA_ENV, CPU_ARENAS
from star_export.runtime.threads import THREAD_POOL_ENV, THREAD_POOLS


@dataclass(frozen=True)
class Knob:
    variable: str
    allowed: tuple[str, ...]
    default_pair: tuple[str, str]
    per_session: bool  # read as each session is created (so two values can live in one process)


KNOBS = {
    "thread-pool": Knob(THREAD_POOL_ENV, THREAD_POOLS, ("per-session", "shared"), False),
    "cpu-arena": Knob(CPU_ARENA_ENV, tuple(CPU_ARENAS), ("session", "shared"), True),
}
TIMES = ("decode_ms_per_step", "prefill_s", "vision_s")
PROMPT = "Describe the picture in detail."


def star_run(engine: str, image: str, tokens: int, env: dict) -> dict:
    """One `star-run --json` in a process of its own with `env` added: its timings, tokens and peak RSS."""
    code = "import sys; from star_export.cli import run_main; sys.exit(run_main(sys.argv[1:]))"
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([sys.executable, "-c", code, engine, "--image", image, "--prompt", PROMPT,
                                  "--max-new-tokens", str(tokens), "--json", "--quiet"],
                                 stdout=stdout, stderr=stderr, text=True, env=os.environ | env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if child.returncode:
            raise SystemExit(f"star-run ({env}) exited {child.returncode}: {stderr.read()[-2000:]}")
        out = json.loads(stdout.read())
    timings = out["timings"]
    return {"decode_ms_per_step": timings["decode_s"] / timings["decode_steps"] * 1e3, "prefill_s": timings["prefill_s"],
            "vision_s": timings["vision_s"], "token_ids": out["token_ids"], "peak_rss_gib": usage.ru_maxrss / 2**20}


def processes_ab(a, knob: Knob, first: str, second: str) -> dict:
    runs = {first: [], second: []}
    for r in range(a.rounds):
        for value in (first, second)[:: 1 if r % 2 == 0 else -1]:
            runs[value].append(star_run(a.engine, a.image, a.tokens, {knob.variable: value}))
            print(f"round {r + 1}/{a.rounds} {knob.variable}={value}: {runs[value][-1]['decode_ms_per_step']:.2f} ms/step", file=sys.stderr)
    result = {value: {k: summary([run[k] for run in runs[value]]) for k in (*TIMES, "peak_rss_gib")} for value in (first, second)}
    for k in TIMES:
        result[f"{second}_over_{first}_{k}"] = summary([b[k] / a_[k] for a_, b in zip(runs[first], runs[second])])
    result["same_tokens"] = all(a_["token_ids"] == b["token_ids"] for a_, b in zip(runs[first], runs[second]))
    return result


def in_process_ab(a, knob: Knob, first: str, second: str) -> dict:
    """The engine loaded once per value in this process; per round a prefill each and `a.steps` decode steps
    alternating (greedy, batch 1); round 0 a warm-up."""
    from PIL import Image

    from star_export.runtime.engine import Engine
    from star_export.runtime.threads import claim_process

    claim_process()
    order = (second, first) if a.b_first else (first, second)
    engines = {}
    for value in order:
        os.environ[knob.variable] = value  # read as each session is created
        engines[value] = Engine.from_dir(a.engine, provider="cpu")
    feed = engines[first].prepare([Image.open(a.image).convert("RGB")], [PROMPT])
    prefill, steps, tokens = ({v: [] for v in order} for _ in range(3))
    for r in range(a.rounds + 1):
        states, kept = {}, r > 0
        for v in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            states[v], _ = engines[v].pipeline.prefill(feed["pixel_values"], feed["input_ids"], feed["attention_mask"], reserve=a.steps)
            if kept:
                prefill[v].append(time.perf_counter() - t)
        times, fed = alternate_steps({v: engines[v].pipeline for v in order}, states, a.steps)
        if kept:
            for v in order:
                steps[v] += times[v]
                tokens[v] += fed[v]
        print(f"round {r}/{a.rounds} done{'' if kept else ' (warm-up)'}", file=sys.stderr)
    return {"loaded_first": order[0], "rounds": a.rounds, "steps_per_round": a.steps,
            **{f"{v}_prefill_s": summary(prefill[v]) for v in (first, second)},
            f"{second}_over_{first}_prefill_per_round": summary([b / x for x, b in zip(prefill[first], prefill[second])]),
            **{f"{v}_decode_ms": summary(steps[v]) for v in (first, second)},
            f"{second}_over_{first}_decode_per_step_pair": summary([b / x for x, b in zip(steps[first], steps[second])]),
            "same_tokens": all((x == y).all() for x, y in zip(tokens[first], tokens[second]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--knob", choices=KNOBS, required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--values", nargs=2, metavar=("A", "B"), help="the two values compared (default: the knob's former default, then its default)")
    p.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "star_export" / "assets" / "example.png"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=40, help="processes: new tokens per star-run")
    p.add_argument("--in-process", action="store_true", help="both values in this process, calls alternating (per-session knobs)")
    p.add_argument("--steps", type=int, default=16, help="--in-process: decode steps per round")
    p.add_argument("--b-first", action="store_true", help="--in-process: load B's sessions first")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    knob = KNOBS[a.knob]
    first, second = a.values or knob.default_pair
    if {first, second} - set(knob.allowed) or first == second:
        p.error(f"--values: two different values of {knob.allowed}")
    if a.in_process and not knob.per_session:
        p.error(f"--in-process: {knob.variable} is fixed per process; only a knob read per session has two values in one")
    result = {"knob": a.knob, "variable": knob.variable, "values": [first, second], "engine": a.engine, "cpu_count": os.cpu_count()}
    result |= (in_process_ab if a.in_process else processes_ab)(a, knob, first, second)
    if not result["same_tokens"]:
        print(f"warning: {knob.variable}={first} and {second} generated different tokens", file=sys.stderr)
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
