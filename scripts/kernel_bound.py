#!/usr/bin/env python
"""What bounds an int4 engine's decode step, prefill and memory on this CPU: the weight products of the two runtimes the
engine can run on, measured on the engine's own op and scheme (`MatMulNBits`, int4, blocks of 128 along K, symmetric,
int8 compute) at LLaVA-1.5-7B's layer shapes, and the machine's memory read rate.

A graph of LAYERS decoder-layer MLP and projection products (q, k, v, o: hidden x hidden; gate, up: hidden x
intermediate; down: intermediate x hidden; chained as in a layer, random weights) is run, each runtime in a fresh
process, rounds interleaved:
- ONNX Runtime's CPU provider (the engine's session options);
- OpenVINO with the engine's compile properties (int8 activations per weight block: runtime/openvino.graph_config);
- OpenVINO without them (bfloat16 compute where the CPU has it, float32 elsewhere).
For each: one row per call (a decode step: ms, and the weights' bytes read per second), PROMPT rows per call (a
prefill: ms and GFLOP/s), and what the process holds after compiling and after the first calls, in copies of the
weights ((anonymous + file-backed resident memory gained) / the weights' bytes). The floor: a THREADS-thread read of a
1 GiB array (torch `sum`), GB/s.

    python scripts/kernel_bound.py [--layers 4] [--rounds 3] [--threads 2] [--out docs/benchmarks/cpu]

With `--engine DIR` (an int4 / int8 engine), also where the engine's own calls spend their time, per graph, in each
way it can run on this CPU (`auto`: OpenVINO with the ONNX Runtime decode graphs; OpenVINO alone, its segment graphs
decoding; ONNX Runtime alone): the first call of each graph (the prefill) and the mean of the later ones (decode steps),
one generation of TOKENS tokens after a warm-up generation, a fresh process per way and round.

Results: OUT/kernels.md and OUT/kernels.json, with `lscpu`'s model and flags. Compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peers import lscpu  # the same CPU record as the peers run

RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16")
FULL_DEPTH = 32  # LLaVA-1.5-7B's decoder layers
VOCAB = 32064  # llava-hf/llava-1.5-7b-hf's lm_head rows


def layer_shapes(hidden: int, intermediate: int) -> list[tuple[str, int, int]]:
    """(name, K, N) of one decoder layer's weight products."""
    return [
        ("q", hidden, hidden),
        ("k", hidden, hidden),
        ("v", hidden, hidden),
        ("o", hidden, hidden),
        ("gate", hidden, intermediate),
        ("up", hidden, intermediate),
        ("down", intermediate, hidden),
    ]


def int4_bytes(k: int, n: int, block: int) -> int:
    """MatMulNBits' stored bytes: packed 4-bit values plus one float32 scale per block (symmetric: no zero points)."""
    return k * n // 2 + (k // block) * n * 4


def write_graph(path: Path, layers: int, hidden: int, intermediate: int, block: int) -> int:
    """The chained products as an ONNX graph with external data; returns the weights' bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, total = [], [], 0

    def product(name, x, k, n):
        nonlocal total
        blocks = k // block
        packed = rng.integers(0, 256, size=(n, blocks, block // 2), dtype=np.uint8)
        scales = np.full(n * blocks, 1.0 / (4.6 * np.sqrt(k)), np.float32)  # outputs about as large as inputs
        inits.extend([numpy_helper.from_array(packed, f"{name}.w"), numpy_helper.from_array(scales, f"{name}.s")])
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, f"{name}.w", f"{name}.s"],
                [name],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
                accuracy_level=4,
            )
        )
        total += int4_bytes(k, n, block)
        return name

    x = "x"
    for i in range(layers):
        q, k, v = (product(f"l{i}.{p}", x, hidden, hidden) for p in "qkv")
        nodes += [helper.make_node("Add", [q, k], [f"l{i}.qk"]), helper.make_node("Add", [f"l{i}.qk", v], [f"l{i}.a"])]
        o = product(f"l{i}.o", f"l{i}.a", hidden, hidden)
        gate, up = product(f"l{i}.gate", o, hidden, intermediate), product(f"l{i}.up", o, hidden, intermediate)
        nodes.append(helper.make_node("Mul", [gate, up], [f"l{i}.g"]))
        x = product(f"l{i}.down", f"l{i}.g", intermediate, hidden)
    graph = helper.make_graph(
        nodes,
        "weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "M", hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "M", hidden])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return total


# ------------------------------------------------------------------ one measurement (in its own process)
def resident() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of this process, bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))


def runner(runtime: str, graph: Path, threads: int):
    if runtime == "onnxruntime":
        import onnxruntime as ort

        from star_export.runtime.sessions import session_options
        from star_export.runtime.threads import claim_process

        claim_process()  # the engine's commands run on one shared pool
        session = ort.InferenceSession(str(graph), session_options(threads), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"x": x}), "CPUExecutionProvider"
    from star_export.config import WeightScheme
    from star_export.runtime.openvino import core, graph_config

    config = (
        graph_config(WeightScheme(kind="int4")) if runtime == "openvino" else {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    )
    compiled = core().compile_model(
        str(graph), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, **config}
    )
    request = compiled.create_infer_request()
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return lambda x: request.infer({"x": x}), f"OpenVINO {precision} {config}"


def timed(call, x, repeats: int) -> list[float]:
    call(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    return times


def measure_one(runtime: str, graph: Path, hidden: int, prompt: int, threads: int) -> dict:
    import numpy as np

    if runtime == "floor":
        import torch

        torch.set_num_threads(threads)
        array = torch.ones(2**28)  # 1 GiB of float32
        seconds = timed(lambda _: float(array.sum()), None, 10)
        return {"gb_per_s": array.numel() * 4 / statistics.median(seconds) / 1e9}
    if runtime == "onnxruntime":  # the runtime's libraries loaded before the baseline: what follows is the graph's
        import onnxruntime

        onnxruntime.get_available_providers()
    else:
        from star_export.runtime.openvino import core

        core().get_property("CPU", "FULL_DEVICE_NAME")
    before = resident()
    call, where = runner(runtime, graph, threads)
    compiled = resident()
    rng = np.random.default_rng(1)
    one = timed(call, rng.standard_normal((1, 1, hidden), dtype=np.float32), 20)
    many = timed(call, rng.standard_normal((1, prompt, hidden), dtype=np.float32), 3)
    after = resident()
    return {
        "runs_on": where,
        "one_row_s": one,
        "prompt_s": many,
        "held_compiled": [c - b for c, b in zip(compiled, before)],
        "held_after": [a - b for a, b in zip(after, before)],
    }


ENGINE_WAYS = {  # name -> (provider, decode graphs)
    "auto": ("auto", True),
    "openvino-segments": ("openvino", False),
    "onnxruntime": ("cpu", True),
}
QUESTION = "Describe the objects, their colours and positions, and anything unusual in this picture."


def measure_engine(way: str, engine_dir: str, tokens: int) -> dict:
    """One generation on `engine_dir` run the `way` named, each graph's calls timed."""
    from PIL import Image, ImageOps

    from star_export.config import RuntimeOptions
    from star_export.runtime.engine import Engine
    from star_export.runtime.generate import Sampling
    from star_export.runtime.threads import claim_process

    claim_process()
    provider, decode_graphs = ENGINE_WAYS[way]
    engine = Engine(engine_dir, RuntimeOptions(provider=provider, decode_graphs=decode_graphs), verify=False)
    calls: dict[str, list[float]] = {}
    for name, graph in engine.graphs.items():

        def timed_run(feed, run=graph.run, name=name):
            t0 = time.perf_counter()
            out = run(feed)
            calls.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        graph.run = timed_run
    image = Image.open(Path(__file__).resolve().parents[1] / "star_export/assets/example.png").convert("RGB")
    engine.generate([ImageOps.mirror(image)], [QUESTION], Sampling(max_new_tokens=4, stop_at_eos=False))
    calls.clear()
    result = engine.generate([image], [QUESTION], Sampling(max_new_tokens=tokens, stop_at_eos=False))
    return {
        "runs_on": engine.provider,
        # a decode graph's every call is a step; another graph's first call is the prefill
        "graphs": {
            name: {"first_s": None, "later_s": c} if name.startswith("decode") else {"first_s": c[0], "later_s": c[1:]}
            for name, c in calls.items()
        },
        "timings": {k: v for k, v in result.timings.items() if isinstance(v, (int, float))},
    }


def engine_report(engine_dir: str, results: dict) -> list[str]:
    names = [n for n in ENGINE_WAYS if n in results]
    graphs = sorted({g for n in names for r in results[n] if "error" not in r for g in r["graphs"]})
    lines = [
        "",
        f"Engine `{engine_dir}`, per graph, ms: the first call (the prefill) / the mean of the later calls "
        "(decode steps; a decode graph's every call), medians over rounds; "
        "step: the decode graphs' or segment graphs' later calls summed.",
        "",
        f"| way | {' | '.join(graphs)} | step ms | runs on |",
        "|---|" + "---|" * (len(graphs) + 2),
    ]
    for name in names:
        ok = [r for r in results[name] if "error" not in r]
        if not ok:
            lines.append(f"| {name} | failed: {results[name][-1]['error'][:120]} |" + " |" * (len(graphs) + 1))
            continue
        cells, step = [], []
        for g in graphs:
            firsts = [r["graphs"][g]["first_s"] for r in ok if r["graphs"].get(g, {}).get("first_s") is not None]
            laters = [statistics.mean(r["graphs"][g]["later_s"]) for r in ok if r["graphs"].get(g, {}).get("later_s")]
            parts = [f"{statistics.median(firsts) * 1e3:.0f}"] if firsts else []
            parts += [f"{statistics.median(laters) * 1e3:.1f}"] if laters else []
            cells.append(" / ".join(parts) or "-")
            step += [statistics.median(laters)] if laters else []
        lines.append(f"| {name} | {' | '.join(cells)} | {sum(step) * 1e3:.1f} | {ok[0]['runs_on']} |")
    return lines


# ------------------------------------------------------------------ the run
def med(values: list[float], scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def report(meta: dict, results: dict) -> str:
    w, flops_row, prompt = meta["weight_bytes"], meta["flops_per_row"], meta["prompt"]
    step = meta["full_depth_step_bytes"]
    floor = [r["gb_per_s"] for r in results.get("floor", []) if "error" not in r]
    lines = [
        f"# Weight products of the engine's runtimes ({meta['date']})",
        "",
        f"`lscpu`: {meta['cpu']['model']} (family {meta['cpu']['family']}, model {meta['cpu']['model_number']}), "
        f"{meta['cpu']['cpus']} CPUs, {' '.join(meta['cpu']['isa'])}; "
        f"{meta['threads']} threads; {meta['rounds']} rounds, a fresh process per runtime and round.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    if floor:
        lines += [
            f"Memory read floor (torch `sum` of 1 GiB, {meta['threads']} threads): "
            f"{statistics.median(floor):.1f} GB/s ({min(floor):.1f}-{max(floor):.1f}); a full-depth 7B int4 "
            f"decode step's weight reads ({step / 1e9:.2f} GB: {FULL_DEPTH} layers and lm_head) take at least "
            f"{step / max(floor) / 1e6:.0f} ms.",
            "",
        ]
    if not any(name in results for name in RUNTIMES):
        return "\n".join(lines) + "\n"
    lines += [
        f"{meta['layers']} layers of MatMulNBits products (hidden {meta['hidden']}, intermediate "
        f"{meta['intermediate']}, int4, block {meta['block']}, symmetric, accuracy_level 4): "
        f"{w / 1e6:.0f} MB of weights, {flops_row / 1e9:.2f} GFLOP per row.",
        "",
        "| runtime | 1 row ms | weights read GB/s | full-depth step ms (scaled) | "
        f"{prompt} rows ms | GFLOP/s | held after compile (copies of the weights) | "
        "held after the calls, anon + file-backed (copies) | runs on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in (n for n in RUNTIMES if n in results):
        ok = [r for r in results[name] if "error" not in r]
        if not ok:
            lines.append(f"| {name} | failed: {results[name][-1]['error'][:120]} | | | | | | | |")
            continue
        one = [statistics.median(r["one_row_s"]) for r in ok]
        many = [statistics.median(r["prompt_s"]) for r in ok]
        held = [sum(r["held_after"]) / w for r in ok]
        anon, file = (statistics.median(r["held_after"][i] / w for r in ok) for i in (0, 1))
        lines.append(
            f"| {name} | {med(one, 1e3)} | {w / statistics.median(one) / 1e9:.1f} | "
            f"{step / w * statistics.median(one) * 1e3:.0f} | {med(many, 1e3)} | "
            f"{flops_row * prompt / statistics.median(many) / 1e9:.0f} | "
            f"{statistics.median(sum(r['held_compiled']) / w for r in ok):.2f} | "
            f"{statistics.median(held):.2f} ({anon:.2f} + {file:.2f}) | {ok[0]['runs_on']} |"
        )
    return "\n".join(lines) + "\n"


def child(argv: list[str], *extra: str) -> dict:
    """This script again in a fresh process, for one measurement: its JSON line, or {"error": its last stderr line}."""
    done = subprocess.run([sys.executable, __file__, *argv, *extra], capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def installed(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--prompt", type=int, default=636, help="rows of the prefill-sized call (the peers run's prompt)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help=f"of {', '.join(RUNTIMES)}, floor (default: all)")
    p.add_argument("--engine", default=None, help="an int4 / int8 engine directory: also time its graphs")
    p.add_argument("--ways", nargs="*", default=list(ENGINE_WAYS), help=f"with --engine: of {', '.join(ENGINE_WAYS)}")
    p.add_argument("--tokens", type=int, default=16, help="with --engine: new tokens per generation")
    p.add_argument("--out", default="docs/benchmarks/cpu")
    p.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # RUNTIME GRAPH: one measurement
    p.add_argument("--one-engine", default=None, help=argparse.SUPPRESS)  # WAY: one engine measurement
    a = p.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if a.rounds < 1:
        p.error("--rounds: at least 1")
    if a.one:
        print(json.dumps(measure_one(a.one[0], Path(a.one[1]), a.hidden, a.prompt, a.threads)))
        return 0
    if a.one_engine:
        print(json.dumps(measure_engine(a.one_engine, a.engine, a.tokens)))
        return 0
    unknown = set(a.ways) - set(ENGINE_WAYS) | set(a.only or ()) - {*RUNTIMES, "floor"}
    if unknown:
        p.error(f"unknown: {', '.join(sorted(unknown))}")
    names = a.only if a.only is not None else [*RUNTIMES, "floor"]
    ways = a.ways if a.engine else []
    shapes = layer_shapes(a.hidden, a.intermediate)
    results: dict[str, list] = {name: [] for name in names}
    engine_results: dict[str, list] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory(prefix="kernel-bound-") as work:
        graph = Path(work) / "weights.onnx"
        weight_bytes = write_graph(graph, a.layers, a.hidden, a.intermediate, a.block)
        for r in range(a.rounds):
            for name in names:
                results[name].append(child(argv, "--one", name, str(graph)))
                print(f"round {r} {name}: done", file=sys.stderr)
            for way in ways:
                engine_results[way].append(child(argv, "--one-engine", way))
                print(f"round {r} engine {way}: done", file=sys.stderr)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": lscpu(),
        "threads": a.threads,
        "rounds": a.rounds,
        "versions": {p: installed(p) for p in ("onnxruntime", "openvino", "torch")},
        "layers": a.layers,
        "hidden": a.hidden,
        "intermediate": a.intermediate,
        "block": a.block,
        "prompt": a.prompt,
        "weight_bytes": weight_bytes,
        "flops_per_row": 2 * a.layers * sum(k * n for _, k, n in shapes),
        "full_depth_step_bytes": FULL_DEPTH * sum(int4_bytes(k, n, a.block) for _, k, n in shapes)
        + int4_bytes(a.hidden, VOCAB, a.block),
        "engine": a.engine,
        "command": " ".join(["python scripts/kernel_bound.py", *argv]),
    }
    text = report(meta, results)
    if ways:
        text += "\n".join([*engine_report(a.engine, engine_results), ""])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.md").write_text(text)
    (out / "kernels.json").write_text(
        json.dumps({"meta": meta, "results": results, "engine": engine_results}, indent=1)
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
