#!/usr/bin/env python
"""Where a decode step's time goes, against what its weight reads alone would cost.

One engine (default: float32, keep 58, of a random model at real LLaVA-1.5-7B widths with reduced depth), one prompt,
then decode steps, each through both segments. Reports per step, as medians over the steps:
  - wall ms of `StarPipeline.step` (host work included),
  - from ONNX Runtime's profiler (separate, profiled steps): kernel ms by kind: weight matmuls (one operand an
    initializer, or MatMulNBits), attention (the other MatMuls, Softmax, GroupQueryAttention), KV-cache copies (Concat writing over 1 MiB), other kernels;
    the rest of the wall time is session overhead and host work,
  - the weight-read floor: the segments' weight bytes / the bandwidth of a float32 GEMV of 1 GiB in ONNX Runtime on the
    same threads (what "reading the weights once" achieves on this machine), measured right before each step, so that
    each step is compared with the bandwidth of its own moment (on shared machines it drifts: 15 to 49 GB/s within one
    run of this script on 2 cores, 2026-11-22); the step's overhead beyond it ((wall - floor) / floor) is taken per step, then summarised as
    median (min-max). Also reported: the overhead against the best bandwidth seen (what this script reported before it
    interleaved), and the weight kernels' own profiled time against the floor (what no graph change can remove).
  - the KV-cache reads: the bytes of both caches' buffers that each step's graphs read (the whole buffers: filled
    slots and the masked free ones), at the same moment's bandwidth, against the floor; with the weight kernels',
    the overhead that would remain if every other kernel, the attention arithmetic and the host cost nothing
    (`weight_kernels_and_kv_reads_over_floor`): a lower bound, for these kernels and this cache dtype, of what any
    change to the rest of the graph can reach. (GroupQueryAttention reads the filled slots and the new one only.)
An engine with ONNX Runtime decode graphs (star-export --decode-graphs, the default for int8 / int4 weights) is measured
both ways in the same run: its segment graphs (`segments`, as `star-run --no-decode-graphs` decodes) and its decode
graphs (`decode_graphs`, as `star-run` decodes): one prefill, its state copied, then decode steps of the two alternating
(ABBA), each after its own bandwidth measurement, both fed the same tokens; the per-step ratio and the logits' difference.
`--no-decode-graphs`: the segment graphs only.
`--versus ENGINE2`: a second engine of the same model (another `--block-size`, say), stepped in the same alternation
(its decode graphs, or its segments where it has none), each step after its own bandwidth measurement and against its
own floor (its own weight bytes); reported under `versus`, with the per-step ratio of its wall to this engine's.

    python scripts/decode_split.py [--engine DIR | --model DIR] [--steps 24] [--no-decode-graphs] [--versus DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from bench import emit, matmul_model, summary  # noqa: E402
from star_export.export.decode_graphs import decode_graph_names  # noqa: E402
from star_export.runtime.engine import Engine  # noqa: E402
from star_export.runtime.inputs import synthetic_image  # noqa: E402
from star_export.runtime.threads import claim_process, thread_pool  # noqa: E402

WEIGHT_OPS = {"MatMul", "FusedMatMul", "Gemm", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


class Gemv:
    """x(1, K) @ W(K, N) in ONNX Runtime, W float32 of `gib` GiB held as an initializer: timing one call gives the rate
    at which a decode step can read float32 weights here, at that moment."""

    def __init__(self, threads: int, gib: float = 1.0):
        import onnxruntime as ort

        from star_export.runtime.sessions import session_options

        k = 4096
        n = int(gib * 2**30 / 4 / k)
        model = matmul_model(1, np.random.default_rng(0).standard_normal((k, n), dtype=np.float32))
        self.session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])  # as the engine's
        del model
        self.x, self.nbytes = np.ones((1, k), np.float32), k * n * 4
        self.bandwidth()  # warm-up

    def bandwidth(self) -> float:
        """Bytes/s of one call, now."""
        t = time.perf_counter()
        self.session.run(None, {"A": self.x})
        return self.nbytes / (time.perf_counter() - t)


def kind_of(event: dict) -> str:
    args = event.get("args", {})
    op = args.get("op_name", "?")
    shapes = [list(s.values())[0] for s in args.get("input_type_shape", [])]
    if op == "MatMulNBits" or (op in WEIGHT_OPS and len(shapes) == 1):  # the profiler lists no initializer inputs
        return "weights"
    if op in WEIGHT_OPS or op in ("Softmax", "GroupQueryAttention"):
        return "attention"
    if op == "Concat":
        out = [list(s.values())[0] for s in args.get("output_type_shape", [])]
        if out and int(np.prod(out[0])) * 4 > 2**20:
            return "cache copy"
    return "other kernels"


def profiled_split(pipeline, paths: dict[str, Path], state, tokens, steps: int, work: Path) -> list[dict[str, float]]:
    """Kernel ms by kind for each of `steps` decode steps of `pipeline`, its segment graphs replaced by sessions of
    `paths` (their own files) created with ONNX Runtime's profiler on."""
    import onnxruntime as ort

    from star_export.runtime.sessions import session_options

    saved = dict(pipeline.graphs)
    sessions = {}
    for name, path in paths.items():
        opts = session_options()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(work / f"profile-{name}")
        graph = saved[name]
        g = type(graph).__new__(type(graph))  # the same graph class (its feeds and bindings), a profiled session
        g.__dict__.update(graph.__dict__)
        g.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        pipeline.graphs[name] = sessions[name] = g
    try:
        for _ in range(steps):
            state = pipeline.step(state, tokens)
    finally:
        pipeline.graphs.update(saved)
    runs: dict[str, list[list[dict]]] = {}
    for name, g in sessions.items():
        events = json.load(open(g.session.end_profiling()))
        calls = []
        for e in events:
            if e.get("cat") == "Session" and e["name"] == "model_run":
                calls.append([])
            elif e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and calls:
                calls[-1].append(e)
        runs[name] = calls[-steps:]
    split = []
    for i in range(steps):
        row: dict[str, float] = {}
        for name in sessions:
            for e in runs[name][i]:
                row[kind_of(e)] = row.get(kind_of(e), 0.0) + e["dur"] / 1e3
        split.append(row)
    return split


def segment_bytes(engine_dir, paths: dict[str, Path]) -> int:
    """The bytes of an engine's segment graphs and their weights: what each decode step reads once."""
    return sum(f.stat().st_size for f in Path(engine_dir).iterdir() if any(f.name.startswith(x.stem) for x in paths.values()))


def kv_read_bytes(state, filled_only: bool) -> float:
    """Bytes of both caches that a step's graphs read: the whole buffers (the engine's attention reads the free slots
    too, masked), or, for GQA (`filled_only`), the filled slots and the new one."""
    return sum(b.nbytes * ((c.length + 1) / c.capacity if filled_only else 1) for c in (state.cache0, state.cache1) for b in c.buffers.values())


def figures(walls, rates, kv_reads, split, weight_bytes: int) -> dict:
    """One configuration's step figures (see the module's docstring) from its steps' wall ms, the bandwidth measured
    right before each, the cache bytes each read, and its profiled split."""
    floors = [weight_bytes / r * 1e3 for r in rates]
    overheads = [w / f - 1 for w, f in zip(walls, floors)]
    kv_over_floor = [kv / weight_bytes for kv in kv_reads]  # same bandwidth for both reads
    wall, floor_ms, best = statistics.median(walls), statistics.median(floors), max(rates)
    kinds = ("weights", "attention", "cache copy", "other kernels")
    kernel = {k: statistics.median(r.get(k, 0.0) for r in split) for k in kinds}
    kernels_over_floor = kernel["weights"] / floor_ms - 1
    return {
        "step_ms": summary(walls),
        "kernel_ms": kernel,
        "host_and_session_ms": wall - sum(kernel.values()),
        "weight_bytes": weight_bytes,
        "gemv_bandwidth_gb_s": summary([r / 1e9 for r in rates]),
        "weight_floor_ms": summary(floors),
        "overhead_beyond_weights": summary(overheads),
        "overhead_vs_best_bandwidth": wall / (weight_bytes / best * 1e3) - 1,
        "weight_kernels_over_floor": kernels_over_floor,
        "kv_read_bytes": summary(kv_reads),
        "kv_reads_over_floor": summary(kv_over_floor),
        "weight_kernels_and_kv_reads_over_floor": kernels_over_floor + statistics.median(kv_over_floor),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default=None, help="an engine directory (default: build one from --model)")
    p.add_argument("--model", default=None, help="local HF directory (default: random, real widths, --text-layers decoder layers)")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--keep", type=int, default=58)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-decode-graphs", action="store_true", help="measure the segment graphs only, where the engine also has decode graphs")
    p.add_argument("--versus", default=None, help="a second engine of the same model, measured in the same alternation")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    claim_process()  # as the star-* commands: ONNX Runtime's shared pool, its size fixed by the first session (runtime/threads.py)
    thread_pool(a.threads)
    work = Path(tempfile.mkdtemp(prefix="star-split-"))
    engine_dir = a.engine
    if engine_dir is None:
        from star_export.export.build import export_engine
        from star_export.testing import real_width_spec, save_random_llava

        model = a.model or str(save_random_llava(real_width_spec(text_layers=a.text_layers), work / "model", seed=0, text_init_std=0.02))
        engine_dir = work / "engine"
        export_engine(model=model, keep=a.keep, out=engine_dir, validate=False, show_progress=False)
    engine = Engine.from_dir(engine_dir, provider="cpu", **({"decode_graphs": False} if a.no_decode_graphs else {}))
    files = {g: Path(engine_dir) / entry["file"] for g, entry in engine.manifest["graphs"].items()}
    paths = {g: files[g] for g in ("segment0", "segment1")}
    weight_bytes = {"segments": segment_bytes(engine_dir, paths)}

    inputs = engine.prepare([synthetic_image(i) for i in range(a.batch)], ["Describe the picture in detail."] * a.batch)
    room = {"reserve": 3 * a.steps} if "reserve" in inspect.signature(engine.pipeline.prefill).parameters else {}  # older releases: none
    state, _ = engine.pipeline.prefill(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **room)
    tokens = state.logits.argmax(-1)
    decode_graphs = {g: engine.graphs[g] for g in decode_graph_names(engine.graphs)}
    segments = copy.copy(engine.pipeline)
    segments.graphs = {g: graph for g, graph in engine.graphs.items() if g not in decode_graphs}
    runs = {"segments": (segments, paths, state, False)}  # pipeline, the files its steps run, state, reads filled slots only
    if decode_graphs:  # their decode steps start from a copy of the same prefill
        runs["decode_graphs"] = (engine.pipeline, {g: files[g] for g in decode_graphs}, copy.deepcopy(state), True)
        weight_bytes["decode_graphs"] = weight_bytes["segments"]
    if a.versus:  # its own prefill of the same inputs, then its decode steps fed the same tokens
        other = Engine.from_dir(a.versus, provider="cpu")
        other_files = {g: Path(a.versus) / entry["file"] for g, entry in other.manifest["graphs"].items()}
        other_decode = decode_graph_names(other.graphs)
        other_state, _ = other.pipeline.prefill(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **room)
        runs["versus"] = (other.pipeline, {g: other_files[g] for g in other_decode or ("segment0", "segment1")}, other_state, bool(other_decode))
        weight_bytes["versus"] = segment_bytes(a.versus, {g: other_files[g] for g in ("segment0", "segment1")})
    gemv = Gemv(a.threads)
    measured = {name: ([], [], []) for name in runs}  # walls, rates, kv_reads
    differences = []
    states = {name: run[2] for name, run in runs.items()}
    for i in range(a.steps + 1):  # per configuration, the bandwidth of the moment, then the step; the order alternates
        for name in list(runs)[:: 1 if i % 2 == 0 else -1]:
            walls, rates, kv_reads = measured[name]
            rates.append(gemv.bandwidth())
            kv_reads.append(kv_read_bytes(states[name], runs[name][3]))
            t = time.perf_counter()
            states[name] = runs[name][0].step(states[name], tokens)
            walls.append((time.perf_counter() - t) * 1e3)
        if "decode_graphs" in states:  # both fed the same tokens: the same logits up to rounding
            base = states["segments"].logits
            differences.append(float(np.abs(states["decode_graphs"].logits - base).max() / np.abs(base).max()))
    measured = {name: [m[1:] for m in lists] for name, lists in measured.items()}  # without each one's first step
    per_config = {}
    for name, (pipeline, graph_paths, *_) in runs.items():
        split = profiled_split(pipeline, graph_paths, states[name], tokens, a.steps, work)
        per_config[name] = figures(*measured[name], split, weight_bytes[name])
    result = {"engine": str(engine_dir), "batch": a.batch, "steps": a.steps, "threads": a.threads} | per_config.pop("segments")
    if "decode_graphs" in per_config:
        segment_walls, decode_walls = measured["segments"][0], measured["decode_graphs"][0]
        result |= {"decode_graphs": per_config["decode_graphs"],
                   "segments_over_decode_graphs": summary([e / c for e, c in zip(segment_walls, decode_walls)]),
                   "logits_relative_difference": summary(differences)}
    if "versus" in per_config:
        mine = measured["decode_graphs" if "decode_graphs" in measured else "segments"][0]
        result |= {"versus": {"engine": a.versus} | per_config["versus"],
                   "versus_over_this": summary([v / m for v, m in zip(measured["versus"][0], mine)])}
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
