#!/usr/bin/env python
"""Interleaved benchmark: HF transformers `generate` (unpruned), the eager STAR reference, and STAR engines at several
keeps and weight schemes, on one random model at real LLaVA-1.5-7B widths with reduced depth, in one process.

Every configuration runs once per round (A B C ... A B C ..., after one warm-up round), so load drift on a shared
machine hits all of them alike; each figure is the median with min-max over the rounds, and every speedup is taken
within a round and then summarised. Writes `<out>/bench.md`, `bench.csv`, `bench.json` and PNG plots.

    python scripts/bench.py --model DIR [--rounds 3] [--tokens 8] [--out docs/benchmarks] [--sweeps]

`--model`: a local HF LLaVA directory (`python -m star_export.checkpoints`, or testing.save_random_llava); its pivot layer
is STAR's default for its depth. Engines: one float32 export whose decoder segments are shared by every keep (they
do not depend on keep; vision and pivot graphs are per keep), plus int8 / int4 weight-only engines at --keep.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from star_export.config import StarSchedule  # noqa: E402
from star_export.flops import plan  # noqa: E402
from star_export.manifest import tool_versions  # noqa: E402
from star_export.models import load_model  # noqa: E402
from star_export.runtime.generate import Sampling, StarPipeline  # noqa: E402
from star_export.runtime.inputs import prepare_inputs, synthetic_image  # noqa: E402
from star_export.runtime.sessions import cpu_arena  # noqa: E402
from star_export.runtime.threads import claim_process, thread_pool  # noqa: E402

KEEPS = (576, 288, 115, 58, 29)
FIGURES = ("ttft_ms", "vision_ms", "prefill_ms", "decode_ms", "tokens_per_s", "peak_rss_gib")
SENTENCE = "Describe the objects, their colours and positions, and anything unusual in this picture. "


# ---------------------------------------------------------------- measuring one call
def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the next read is this call's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


@dataclass
class Config:
    name: str
    batch: int
    run: Callable[[dict, int], dict]  # (inputs, new tokens) -> timings
    keep: int = 576
    kind: str = "engine"
    results: list[dict] = field(default_factory=list)
    rss: bool = True  # read the process's peak RSS per run (False on a GPU, where host memory says nothing of the run)

    def once(self, inputs: dict, tokens: int) -> dict:
        if self.rss:
            _reset_peak_rss()
        r = self.run(inputs, tokens)
        if self.rss:
            r["peak_rss_gib"] = _peak_rss_gib()
        r["tokens_per_s"] = self.batch * 1e3 / r["decode_ms"]
        return r


def pipeline_run(pipe: StarPipeline) -> Callable[[dict, int], dict]:
    def run(inputs, tokens):
        g = pipe.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], Sampling(max_new_tokens=tokens, stop_at_eos=False))
        t = g.timings
        return {"vision_ms": t["vision_s"] * 1e3, "prefill_ms": t["prefill_s"] * 1e3, "ttft_ms": (t["vision_s"] + t["prefill_s"]) * 1e3,
                "decode_ms": t["decode_s"] / t["decode_steps"] * 1e3, "kv_bytes": g.kv_bytes_after_prefill}

    return run


def hf_run(model, device: str = "cpu") -> Callable[[dict, int], dict]:
    """HF `generate`, greedy, exactly `tokens` new tokens, with HF's default attention (sdpa; the model is kept on eager
    for the STAR reference, which reads CLIP's attention probabilities); a logits processor stamps every step's logits
    (on a GPU once the step's logits are computed)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.times.append(time.perf_counter())
            return scores

    def run(inputs, tokens):
        stamp = Stamp()
        feed = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
        model.set_attn_implementation("sdpa")
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                model.generate(**feed, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, logits_processor=LogitsProcessorList([stamp]))
        finally:
            model.set_attn_implementation("eager")
        t = stamp.times
        return {"vision_ms": float("nan"), "prefill_ms": float("nan"), "ttft_ms": (t[0] - t0) * 1e3,
                "decode_ms": (t[-1] - t[0]) / (len(t) - 1) * 1e3, "kv_bytes": None}

    return run


def cpu_model() -> str:
    """The CPU's model name and the vector ISAs that decide which kernels ONNX Runtime and torch run (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({' '.join(isa) or 'no AVX2'})"


def matmul_model(m: int, weight_kn: np.ndarray) -> bytes:
    """One float32 MatMul `A [m, K] @ W [K, N] -> Y`, W an initializer (serialized ONNX)."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight_kn.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "matmul", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], [numpy_helper.from_array(weight_kn, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def gemm_rates(threads: int, rounds: int = 5, m: int = 622, k: int = 4096, n: int = 11008) -> dict:
    """GFLOP/s (2 per multiply-add) of one prefill-sized product, the MLP's up projection at keep 576, per kernel, best
    of `rounds` interleaved calls: torch float32 (what HF runs), ONNX Runtime's float32 MatMul, and MatMulNBits int4
    with float compute (accuracy_level 0) and with the default accuracy_level 4. Bounds what a prefill can gain from
    kernels alone."""
    import onnxruntime as ort

    from star_export.config import WeightScheme
    from star_export.validate.quantized import matmulnbits_model
    from star_export.runtime.sessions import session_options

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    models = {"ORT float32 MatMul": matmul_model(m, np.ascontiguousarray(w.T))}
    for level in (0, 4):
        models[f"ORT int4 MatMulNBits accuracy_level {level}"] = matmulnbits_model(WeightScheme("int4", accuracy_level=level), "float32", k, n, w)
    runs = {name: (lambda s: lambda: s.run(None, {"A": x}))(ort.InferenceSession(b, session_options(threads), providers=["CPUExecutionProvider"]))
            for name, b in models.items()}
    tw, tx = torch.from_numpy(w), torch.from_numpy(x)
    runs = {"torch float32 matmul": lambda: tx @ tw.T} | runs
    best = {name: float("inf") for name in runs}
    for _ in range(rounds + 1):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    return {"shape": [m, k, n], "gflops": {name: round(2 * m * k * n / t / 1e9, 1) for name, t in best.items()}}


# ---------------------------------------------------------------- building the configurations
def _graphs(paths: dict, threads: int):
    from star_export.runtime.sessions import OrtGraph

    return {name: OrtGraph(p, threads=threads) for name, p in paths.items()}


def build_pipes(a, loaded, layout, work: Path) -> tuple[dict, dict]:
    """Float32 pipelines per keep: one pair of decoder segments shared by all, vision and pivot graphs per keep.
    Graphs already exported under `work` (an earlier run with the same --work-dir) are reused."""
    from star_export.export.onnx_export import export_onnx

    def exported(schedule, where: Path, graphs: list[str]) -> dict:
        if all((where / f"{g}.onnx").exists() for g in graphs):
            return {g: where / f"{g}.onnx" for g in graphs}
        return {n: v.path for n, v in export_onnx(loaded, schedule, where, graphs=graphs).items()}

    schedules = {k: StarSchedule.from_spec(loaded.spec, keep=k, defaults=loaded.defaults) for k in KEEPS}  # keep 576: stage 1 keeps 576 too
    embed = loaded.model.get_input_embeddings().weight.detach().float().numpy()
    segments = _graphs(exported(schedules[576], work / "segments", ["segment0", "segment1"]), a.threads)
    pipes = {}
    for k in KEEPS:
        own = exported(schedules[k], work / f"keep{k}", ["vision", "pivot"])
        pipes[k] = StarPipeline(_graphs(own, a.threads) | segments, embed, schedules[k], layout)
    return schedules, pipes


def build_configs(a, loaded, layout, work: Path) -> tuple[list[Config], dict]:
    from star_export.build import export_engine
    from star_export.config import WeightScheme
    from star_export.validate.reference import reference_pipeline
    from star_export.runtime.engine import Engine

    t = time.perf_counter()
    schedules, pipes = build_pipes(a, loaded, layout, work)
    quantized = {}
    for entry in a.weights:
        kind, _, level = entry.partition("-acc")
        scheme = WeightScheme(kind, **({"accuracy_level": int(level)} if level else {}))
        out = work / f"{kind}-acc{scheme.accuracy_level}-keep{a.keep}"
        if not out.exists():
            export_engine(model=a.model, keep=a.keep, out=out, weights=scheme, validate=False, show_progress=False)
        quantized[entry] = Engine.from_dir(out, provider="cpu")
    print(f"exported engines in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)

    configs = []
    for batch in a.batches:
        configs.append(Config("HF generate", batch, hf_run(loaded.model), kind="hf"))
        if batch == 1 and not a.no_eager:
            configs.append(Config(f"eager STAR keep {a.keep}", batch, pipeline_run(reference_pipeline(loaded, schedules[a.keep])), keep=a.keep, kind="eager"))
        for k in KEEPS if batch == 1 else (576, a.keep):
            configs.append(Config(f"engine fp32 keep {k}", batch, pipeline_run(pipes[k]), keep=k))
        for kind, engine in quantized.items():
            configs.append(Config(f"engine {kind} keep {a.keep}", batch, pipeline_run(engine.pipeline), keep=a.keep, kind=kind))
    return configs, {"schedules": schedules, "pipes": pipes}


# ---------------------------------------------------------------- rounds
def prompt_of(tokenizer, text_tokens: int) -> str:
    """A prompt of about `text_tokens` tokens of text (the chat template adds a few)."""
    words = (SENTENCE * (text_tokens // 8 + 2)).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix within the count
        mid = (lo + hi + 1) // 2
        if len(tokenizer(" ".join(words[:mid]))["input_ids"]) <= text_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def inputs_for(processor, batch: int, prompt: str) -> dict:
    inp = prepare_inputs(processor, [synthetic_image(i) for i in range(batch)], [prompt] * batch)
    return {k: np.ascontiguousarray(v) for k, v in inp.items()}


def interleave(configs: list[Config], inputs: Callable[[Config], dict], rounds: int, tokens: int, label: str) -> None:
    for r in range(rounds + 1):  # round 0 is the warm-up, not kept
        for c in configs:
            res = c.once(inputs(c), tokens)
            if r:
                c.results.append(res)
        print(f"{label}: round {r}/{rounds} done", file=sys.stderr, flush=True)


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def emit(result: dict, path: str | None) -> int:
    """A measurement script's ending: its result as JSON on stdout and, when `path` is given, in that file; exit 0."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
    return 0


def per_round(a: Config, b: Config, figure: str) -> dict:
    """b's figure / a's figure in each round: how many times faster `a` is."""
    return summary([rb[figure] / ra[figure] for ra, rb in zip(a.results, b.results)])


def gflop(g: float) -> str:
    """Whole GFLOP at real widths; three significant digits for a small model's prefill (well under one GFLOP)."""
    return f"{g:.0f}" if g >= 100 else f"{g:.3g}"


def fmt(s: dict, digits: int = 1) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF LLaVA directory")
    p.add_argument("--keep", type=int, default=58)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=8, help="new tokens per call (decode ms/token averages tokens - 1 steps)")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--weights", nargs="*", default=["int8", "int4"],
                   help="weight-only engines at --keep, KIND or KIND-accN for MatMulNBits accuracy_level N (default: the "
                        "exporter's, 4); empty: none")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--sweeps", action="store_true", help="instead of the main table: TTFT vs text tokens and vs batch, decode ms/token vs "
                   "generated length (float32 engines at keep 576 and --keep; writes sweeps.md / .json / .png)")
    p.add_argument("--decode-ab", action="store_true", help="instead of the main table: decode ms/step at keep 576 and --keep, "
                   "alternated step by step, per --batches (writes decode_ab.md / .json)")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--work-dir", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    claim_process()  # as the star-* commands: ONNX Runtime's shared pool, its size fixed by the first session (runtime/threads.py)
    thread_pool(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="star-bench-"))

    from star_export.graphs.stages import decoder_layout

    loaded = load_model(a.model).cast("float32")
    loaded.model.eval()
    layout = decoder_layout(loaded)
    meta = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.platform()}",
        "threads": a.threads, "rounds": a.rounds, "new_tokens": a.tokens, "cpu_arena": cpu_arena(),
        "model": {"path": a.model, "text_layers": loaded.spec.text_layers, "vision_layers": loaded.spec.vision_layers,
                  "hidden": loaded.spec.hidden_size},
        "versions": tool_versions() | {"numpy": np.__version__},
    }
    tok = loaded.processor.tokenizer
    if a.decode_ab:
        schedules, pipes = build_pipes(a, loaded, layout, work)
        write_decode_ab(out, meta, run_decode_ab(a, loaded.processor, pipes, tok), a.keep)
        print((out / "decode_ab.md").read_text())
        return 0
    if a.sweeps:  # float32 engines only, the torch model freed: batch 8 at keep 576 needs the memory
        schedules, pipes = build_pipes(a, loaded, layout, work)
        processor = loaded.processor
        del loaded
        import gc

        gc.collect()
        meta["model"]["pivot_layer"] = schedules[a.keep].pivot_layer
        sweeps = run_sweeps(a, processor, pipes, tok)
        write_sweeps(out, meta, sweeps)
        print((out / "sweeps.md").read_text())
        return 0
    meta["gemm"] = gemm_rates(a.threads)
    configs, built = build_configs(a, loaded, layout, work)
    prompt = prompt_of(tok, a.text_tokens)
    cached = {b: inputs_for(loaded.processor, b, prompt) for b in a.batches}
    text_tokens = int(cached[1]["attention_mask"][0].sum()) - loaded.spec.num_vision_tokens if 1 in cached else a.text_tokens
    interleave(configs, lambda c: cached[c.batch], a.rounds, a.tokens, "main")
    meta["text_tokens"] = text_tokens
    meta["model"]["pivot_layer"] = built["schedules"][a.keep].pivot_layer
    rows = table_rows(configs, loaded.spec, built["schedules"], text_tokens, a.keep)
    write_outputs(out, meta, rows, configs, a.keep)
    print((out / "bench.md").read_text())
    return 0


def table_rows(configs, spec, schedules, text_tokens, keep) -> list[dict]:
    hf = {c.batch: c for c in configs if c.kind == "hf"}
    base = {c.batch: c for c in configs if c.kind == "engine" and c.keep == 576}
    rows = []
    for c in configs:
        p = plan(spec, schedules[c.keep], text_tokens)
        star = c.kind != "hf" and c.keep < 576
        row = {"config": c.name, "batch": c.batch, **{f: summary([r[f] for r in c.results]) for f in FIGURES}}
        row["flops_g"] = (p.flops["star"] if star else p.flops["baseline"]) * c.batch / 1e9
        planned = p.kv_cache_bytes_per_sequence["float32"]["star" if star else "baseline"] * c.batch
        measured = c.results[0]["kv_bytes"]
        row["kv_mib"] = planned / 2**20
        row["kv_equals_plan"] = None if measured is None else measured == planned
        row["ttft_vs_hf"] = per_round(c, hf[c.batch], "ttft_ms") if c.batch in hf else None
        row["decode_vs_hf"] = per_round(c, hf[c.batch], "decode_ms") if c.batch in hf else None
        if c.kind == "engine" and c.batch in base:
            row["prefill_vs_576"] = per_round(c, base[c.batch], "prefill_ms")
            row["flops_ideal_vs_576"] = p.flops["baseline"] / p.flops["star" if star else "baseline"]  # baseline: unpruned, any schedule
            row["decode_vs_576"] = per_round(c, base[c.batch], "decode_ms")
        rows.append(row)
    return rows


def run_sweeps(a, processor, pipes, tok) -> dict:
    """TTFT vs text tokens and vs batch (keep 576 and --keep, interleaved per point), decode ms/token per step over a
    long generation."""
    sweeps = {}
    points = [20, 100, 300, 600, 1000]
    configs = [Config(f"keep {k} @ {n}", 1, pipeline_run(pipes[k]), keep=k) for n in points for k in (576, a.keep)]
    prompts = {n: inputs_for(processor, 1, prompt_of(tok, n)) for n in points}
    interleave(configs, lambda c: prompts[int(c.name.split("@ ")[1])], max(2, a.rounds - 1), 2, "sweep text")
    sweeps["text_tokens"] = [{"keep": c.keep, "text_tokens": int(c.name.split("@ ")[1]), "ttft_ms": summary([r["ttft_ms"] for r in c.results])} for c in configs]
    batches = [1, 2, 4, 8]
    prompt = prompt_of(tok, a.text_tokens)
    feeds = {b: inputs_for(processor, b, prompt) for b in batches}
    configs = [Config(f"keep {k} batch {b}", b, pipeline_run(pipes[k]), keep=k) for b in batches for k in (576, a.keep)]
    interleave(configs, lambda c: feeds[c.batch], max(2, a.rounds - 1), 2, "sweep batch")
    sweeps["batch"] = [{"keep": c.keep, "batch": c.batch, "ttft_ms": summary([r["ttft_ms"] for r in c.results]),
                        "decode_ms": summary([r["decode_ms"] for r in c.results])} for c in configs]
    steps = {}
    for k in (576, a.keep):  # one long generation each, per-step times
        pipe, times = pipes[k], []
        state, _ = pipe.prefill(feeds[1]["pixel_values"], feeds[1]["input_ids"], feeds[1]["attention_mask"], reserve=256)
        tokens = state.logits.argmax(-1)
        for _ in range(256):
            t = time.perf_counter()
            state = pipe.step(state, tokens)
            times.append((time.perf_counter() - t) * 1e3)
            tokens = state.logits.argmax(-1)
        steps[k] = times
    sweeps["decode_steps"] = steps
    return sweeps


def alternate_steps(pipes: dict, states: dict, steps: int) -> tuple[dict, dict]:
    """`steps` greedy decode steps of each pipeline from its state, alternating A B B A A B ... (pipelines in dict
    order). Returns per pipeline the step times (ms) and the tokens fed. `states` is updated in place."""
    times, tokens = ({k: [] for k in pipes} for _ in range(2))
    order = list(pipes)
    for i in range(steps):
        for k in order if i % 2 == 0 else order[::-1]:
            token = states[k].logits.argmax(-1)
            t = time.perf_counter()
            states[k] = pipes[k].step(states[k], token)
            times[k].append((time.perf_counter() - t) * 1e3)
            tokens[k].append(token)
    return times, tokens


def run_decode_ab(a, processor, pipes, tok, steps: int = 48) -> dict:
    """Decode ms/step at keep 576 and at --keep, alternated step by step (A B B A A B ...) from one prefill each, per
    batch: the finest interleaving, for the one ratio that per-call rounds blur (their decode runs are 7 steps
    between prefills of seconds, and single calls here fall into a fast or a slow mode ~25 % apart)."""
    prompt = prompt_of(tok, a.text_tokens)
    result = {}
    for b in a.batches:
        feed = inputs_for(processor, b, prompt)
        keeps = (576, a.keep)
        states = {k: pipes[k].prefill(feed["pixel_values"], feed["input_ids"], feed["attention_mask"], reserve=steps)[0] for k in keeps}
        times, _ = alternate_steps({k: pipes[k] for k in keeps}, states, steps)
        ratios = [x / y for x, y in zip(times[576][1:], times[a.keep][1:])]  # the first step of each left out
        result[b] = {"steps": steps - 1, "keep576_ms": summary(times[576][1:]), "keep_ms": summary(times[a.keep][1:]),
                     "ratio_576_over_keep": summary(ratios)}
    return result


def machine_line(meta: dict) -> str:
    """A run's machine, threads, CPU arena and versions, as the Markdown reports head them."""
    return (f"{meta['machine']}; {meta['threads']} threads; ONNX Runtime CPU arena {meta['cpu_arena']}; "
            + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))


def write_decode_ab(out: Path, meta: dict, ab: dict, keep: int) -> None:
    (out / "decode_ab.json").write_text(json.dumps({"meta": meta, "batches": ab}, indent=1))
    lines = [f"# Decode keep 576 vs keep {keep}, step-interleaved: {meta['date']}", "", f"`{meta['command']}`", "",
             f"{meta['machine']}; {meta['threads']} threads", "",
             f"| batch | steps | keep 576 ms/step | keep {keep} ms/step | keep 576 / keep {keep} per step pair |", "|---|---|---|---|---|"]
    for b, r in ab.items():
        lines.append(f"| {b} | {r['steps']} | {fmt(r['keep576_ms'])} | {fmt(r['keep_ms'])} | {fmt(r['ratio_576_over_keep'], 3)} |")
    (out / "decode_ab.md").write_text("\n".join(lines) + "\n")


def write_outputs(out: Path, meta: dict, rows: list[dict], configs, keep: int) -> None:
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                 "raw": {f"{c.name} / batch {c.batch}": c.results for c in configs}}, indent=1, default=str) + "\n")
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "batch"] + [f"{f}_{s}" for f in FIGURES for s in ("median", "min", "max")] + ["flops_g", "kv_mib", "kv_equals_plan"])
        for r in rows:
            w.writerow([r["config"], r["batch"]] + [r[f][s] for f in FIGURES for s in ("median", "min", "max")] + [round(r['flops_g'], 4), f"{r['kv_mib']:.1f}", r["kv_equals_plan"]])
    lines = [f"# Benchmark: {meta['date']}", "", f"`{meta['command']}`", "",
             machine_line(meta), "",
             f"Model `{meta['model']['path']}`: hidden {meta['model']['hidden']}, {meta['model']['text_layers']} decoder layers (pivot {meta['model']['pivot_layer']}), "
             f"{meta['model']['vision_layers']} CLIP layers; {meta['text_tokens']} text tokens; {meta['new_tokens']} new tokens per call; "
             f"median (min–max) over {meta['rounds']} interleaved rounds after a warm-up; ratios are taken per round.", "",
             f"Kernel rates, one {' x '.join(map(str, meta['gemm']['shape']))} product (M x K x N), best of 5: "
             + ", ".join(f"{k} {v} GFLOP/s" for k, v in meta["gemm"]["gflops"].items()), "",
             "| config | batch | TTFT ms | vision ms | prefill ms | decode ms/token | tokens/s | peak RSS GiB | GFLOP | KV MiB (= plan) | TTFT vs HF | decode vs HF | prefill vs 576 (FLOPs ideal) | decode vs 576 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = lambda k: f"{fmt(r[k], 2)}×" if r.get(k) else "-"  # noqa: E731
        ideal = f"{fmt(r['prefill_vs_576'], 2)}× ({r['flops_ideal_vs_576']:.2f}×)" if r.get("prefill_vs_576") else "-"
        kv = f"{r['kv_mib']:.1f} ({'yes' if r['kv_equals_plan'] else 'no' if r['kv_equals_plan'] is not None else 'n/a'})"
        lines.append(f"| {r['config']} | {r['batch']} | {fmt(r['ttft_ms'], 0)} | {fmt(r['vision_ms'], 0)} | {fmt(r['prefill_ms'], 0)} | {fmt(r['decode_ms'])} | "
                     f"{fmt(r['tokens_per_s'])} | {fmt(r['peak_rss_gib'], 2)} | {gflop(r['flops_g'])} | {kv} | {vs('ttft_vs_hf')} | {vs('decode_vs_hf')} | {ideal} | {vs('decode_vs_576')} |")
    try:
        plots = ", ".join(f"`{p.name}`" for p in plot(out, rows, keep))
    except ImportError:  # the tables are written either way
        plots = "none (matplotlib missing: pip install 'star-export[bench]')"
    lines += ["", "Peak RSS is the process's (every model of the run resident) during that call. Plots: " + plots]
    (out / "bench.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, rows: list[dict], keep: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fp32 = sorted([r for r in rows if r["config"].startswith("engine fp32") and r["batch"] == 1], key=lambda r: r["flops_g"])
    hf = next((r for r in rows if r["config"] == "HF generate" and r["batch"] == 1), None)
    if fp32:
        kept = [int(r["config"].split()[-1]) for r in fp32]
        base = next(r for r in fp32 if r["config"].endswith(" 576"))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, figure, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "decode_ms", "decode ms/token")):
            med = [r[figure]["median"] for r in fp32]
            err = [[m - r[figure]["min"] for m, r in zip(med, fp32)], [r[figure]["max"] - m for m, r in zip(med, fp32)]]
            ax.errorbar(kept, med, yerr=err, marker="o", label="engine fp32 (median, min–max)")
            if figure == "ttft_ms":
                vision = base["vision_ms"]["median"]
                ideal = [vision + base["prefill_ms"]["median"] * r["flops_g"] / base["flops_g"] for r in fp32]
                ax.plot(kept, ideal, "--", label="FLOPs ideal (vision + prefill × FLOPs ratio)")
            if hf:
                ax.axhline(hf[figure]["median"], color="gray", linestyle=":", label="HF generate, unpruned")
            ax.set_xlabel("visual tokens kept (stage 2)")
            ax.set_ylabel("ms")
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out / "keep.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    bars = [r for r in rows if r["batch"] == 1 and (r["config"] in ("HF generate",) or r["config"].endswith(f"keep {keep}") or r["config"].endswith("keep 576"))]
    if bars:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, figure, title in ((axes[0], "ttft_ms", "time to first token, ms"), (axes[1], "decode_ms", "decode ms/token")):
            ax.barh([r["config"] for r in bars], [r[figure]["median"] for r in bars])
            ax.set_title(title)
        fig.tight_layout()
        files.append(out / "vs_hf.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def write_sweeps(out: Path, meta: dict, sweeps: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "sweeps.json").write_text(json.dumps({"meta": meta, "sweeps": sweeps}, indent=1, default=str) + "\n")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k in sorted({p["keep"] for p in sweeps["text_tokens"]}, reverse=True):
        pts = [p for p in sweeps["text_tokens"] if p["keep"] == k]
        axes[0].plot([p["text_tokens"] for p in pts], [p["ttft_ms"]["median"] for p in pts], marker="o", label=f"keep {k}")
        pts = [p for p in sweeps["batch"] if p["keep"] == k]
        axes[1].plot([p["batch"] for p in pts], [p["ttft_ms"]["median"] for p in pts], marker="o", label=f"keep {k}")
    axes[0].set(xlabel="text tokens in the prompt", ylabel="TTFT ms", title="TTFT vs prompt text")
    axes[1].set(xlabel="batch", ylabel="TTFT ms", title="TTFT vs batch")
    for k, times in sweeps["decode_steps"].items():
        axes[2].plot(range(1, len(times) + 1), times, label=f"keep {k}", lw=0.8)
    axes[2].set(xlabel="generated tokens", ylabel="ms per step", title="decode step vs generated length")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweeps.png", dpi=110)
    plt.close(fig)
    steps = sweeps["decode_steps"]
    lines = [f"# Scaling sweeps: {meta['date']}", "", f"`{meta['command']}`", "",
             machine_line(meta), "",
             f"Model `{meta['model']['path']}`: hidden {meta['model']['hidden']}, {meta['model']['text_layers']} decoder layers (pivot "
             f"{meta['model']['pivot_layer']}), float32 engines; median (min–max) over interleaved rounds after a warm-up. Plot: `sweeps.png`.", "",
             "| text tokens | " + " | ".join(f"TTFT ms keep {k}" for k in sorted({p['keep'] for p in sweeps['text_tokens']}, reverse=True)) + " |", "|---|---|---|"]
    for n in sorted({p["text_tokens"] for p in sweeps["text_tokens"]}):
        pts = sorted([p for p in sweeps["text_tokens"] if p["text_tokens"] == n], key=lambda p: -p["keep"])
        lines.append(f"| {n} | " + " | ".join(fmt(p["ttft_ms"], 0) for p in pts) + " |")
    lines += ["", "| batch | keep | TTFT ms | decode ms/step |", "|---|---|---|---|"]
    for p in sweeps["batch"]:
        lines.append(f"| {p['batch']} | {p['keep']} | {fmt(p['ttft_ms'], 0)} | {fmt(p['decode_ms'])} |")
    lines += ["", "| keep | decode ms/step, steps 1-32 | steps 97-128 | steps 225-256 |", "|---|---|---|---|"]
    for k, t in steps.items():
        lines.append(f"| {k} | " + " | ".join(fmt(summary(t[a:b])) for a, b in ((0, 32), (96, 128), (224, 256))) + " |")
    (out / "sweeps.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
