#!/usr/bin/env python
"""GPU benchmark: HF transformers `generate` (unpruned, sdpa, on the GPU) against STAR engines on ONNX Runtime's CUDA
provider, on one random model at real LLaVA-1.5-7B widths with reduced depth, interleaved as scripts/bench.py does
(A B C ... per round after a warm-up round; medians with min-max; every ratio taken within a round).

    python scripts/gpu_bench.py [--model DIR] [--dtype float16] [--keeps 576 58] [--batches 1 4 8] [--out DIR]

One command for a short GPU lease (issue 36): builds a random checkpoint at real 7B widths and full depth (32 decoder, 24
CLIP layers; `--text-layers` / `--vision-layers` lower it where the lease is too short: say so with the figures), exports
float16 engines at keep 576 and 58, runs HF `generate` (sdpa, unpruned) and the engines interleaved at batch 1, 4 and 8
(TTFT, prefill, decode ms/token, each decode step against the weight-read bound: the decoder's weight bytes over a
measured device-to-device copy bandwidth), then a star-serve load test of the keep-58 engine (16 streaming clients, 60 s;
`--no-serve` skips it). Phase times go to stderr. Full-depth export time on a GPU box was never measured here.

Needs torch with CUDA and onnxruntime-gpu (in place of onnxruntime). `--model`: a local HF LLaVA directory
(`python -m star_export.checkpoints`, or testing.save_random_llava); without one, a real-width model of `--text-layers`
is written to the work directory. `--kv-via-host` also runs each engine with its new keys and values copied through the host, as before
they were written into torch tensors on the GPU, and reports the device-side copy's gain per round. Writes
`<out>/gpu_bench.md` and `gpu_bench.json`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import Config, emit, fmt, hf_run, inputs_for, interleave, per_round, pipeline_run, prompt_of, summary  # scripts/bench.py

from star_export.flops import plan
from star_export.manifest import tool_versions

FIGURES = ("ttft_ms", "vision_ms", "prefill_ms", "decode_ms", "tokens_per_s")
HOST_KV = " (KV via host)"
KV_FIGURES = ("ttft_ms", "prefill_ms", "decode_ms")  # the device-side KV copy against the copy through the host


def kv_via_host(engine):
    """The engine with its graphs' new keys and values returned as ONNX Runtime values (copied to the host and back
    into the torch cache), as before they were written into torch tensors on the GPU (runtime/sessions.py)."""
    for graph in engine.graphs.values():
        assert hasattr(graph, "_torch_outputs"), "runtime/sessions.py no longer has OrtGraph._torch_outputs: update kv_via_host"
        graph._torch_outputs = {}
    return engine


def build(a, work: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from star_export.build import export_engine
    from star_export.runtime.engine import Engine

    model_dir = a.model
    if model_dir is None:
        from star_export.testing import real_width_spec, save_random_llava

        spec = real_width_spec(vision_layers=a.vision_layers, text_layers=a.text_layers)
        model_dir = str(save_random_llava(spec, work / "model"))
    t = time.perf_counter()
    engines, host_kv = {}, {}
    for keep in a.keeps:
        out = work / f"{a.dtype}-keep{keep}"
        if not out.exists():
            export_engine(model=model_dir, keep=keep, out=out, dtype=a.dtype, validate=False, show_progress=False,
                          max_batch_size=max(*a.batches, a.serve_clients), max_new_tokens=max(a.tokens, 64))
        engines[keep] = Engine.from_dir(out, provider="cuda")
        assert engines[keep].provider == "CUDAExecutionProvider", engines[keep].provider
        if a.kv_via_host:
            host_kv[keep] = kv_via_host(Engine.from_dir(out, provider="cuda"))
    print(f"exported and loaded engines in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    hf = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, a.dtype), attn_implementation="sdpa").to("cuda").eval()
    return model_dir, engines, host_kv, hf, AutoProcessor.from_pretrained(model_dir)


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device memory bandwidth in bytes/s, from a device-to-device copy (each byte read once and written once)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3)


def decoder_weight_bytes(engine) -> int:
    """Bytes a decode step reads at least: the segment graphs' weight files (decoder layers, final norm, lm_head)."""
    d = engine.directory
    return sum(p.stat().st_size for seg in ("segment0", "segment1") for p in d.glob(f"{seg}.onnx*"))


def rows_of(configs: list[Config], engines: dict, text_tokens: int, bound_ms: dict | None = None) -> list[dict]:
    hf = {c.batch: c for c in configs if c.kind == "hf"}
    base = {c.batch: c for c in configs if c.kind == "engine" and c.keep == 576}
    rows = []
    for c in configs:
        row = {"config": c.name, "batch": c.batch, **{f: summary([r[f] for r in c.results]) for f in FIGURES}}
        row["ttft_vs_hf"] = per_round(c, hf[c.batch], "ttft_ms") if c.kind != "hf" else None
        row["decode_vs_hf"] = per_round(c, hf[c.batch], "decode_ms") if c.kind != "hf" else None
        if c.kind == HOST_KV:  # the same engine with its KV outputs bound to torch tensors on the GPU
            device_kv = next(d for d in configs if d.kind == "engine" and d.batch == c.batch and d.keep == c.keep)
            row["device_kv_vs_host"] = {f: per_round(device_kv, c, f) for f in KV_FIGURES}
        if c.kind == "engine" and c.batch in base and c.keep != 576:
            p = plan(engines[c.keep].spec, engines[c.keep].schedule, text_tokens)
            row["prefill_vs_576"] = per_round(c, base[c.batch], "prefill_ms")
            row["flops_ideal_vs_576"] = p.flops["baseline"] / p.flops["star"]
            row["decode_vs_576"] = per_round(c, base[c.batch], "decode_ms")
        if c.kind == "engine" and bound_ms:
            row["decode_bound_ms"] = bound_ms[c.keep]
            row["decode_vs_bound"] = row["decode_ms"]["median"] / bound_ms[c.keep]
        rows.append(row)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# GPU benchmark ({meta['date']})", "", f"`{meta['command']}`", "", f"{meta['gpu']}; {meta['machine']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
             f"Model: {meta['model']}; {meta['text_tokens']} text tokens; {meta['new_tokens']} new tokens per call; {meta['rounds']} rounds "
             "after a warm-up; median (min–max); ratios per round: how many times faster than the reference named.", "",
             "| config | batch | TTFT ms | vision ms | prefill ms | decode ms/token | tokens/s | TTFT vs HF | decode vs HF | prefill vs 576 (ideal) | decode vs 576 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal = f" ({r['flops_ideal_vs_576']:.2f})" if r.get("flops_ideal_vs_576") else ""
        cells = [fmt(r[f], 2 if f == "decode_ms" else 1) for f in FIGURES]
        ratios = [fmt(r[k], 2) if r.get(k) else "-" for k in ("ttft_vs_hf", "decode_vs_hf")]
        vs576 = [fmt(r["prefill_vs_576"], 2) + ideal if r.get("prefill_vs_576") else "-", fmt(r["decode_vs_576"], 2) if r.get("decode_vs_576") else "-"]
        lines.append("| " + " | ".join([r["config"], str(r["batch"]), *cells, *ratios, *vs576]) + " |")
    host = [r for r in rows if r.get("device_kv_vs_host")]
    if host:
        lines += ["", "KV outputs written into torch tensors on the GPU, against the same engine's KV copied through the host "
                  "(how many times faster, per round):", "", "| config | batch | TTFT | prefill | decode |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join([r["config"].replace(HOST_KV, ""), str(r["batch"]), *(fmt(r["device_kv_vs_host"][f], 2) for f in KV_FIGURES)]) + " |"
                  for r in host]
    return "\n".join(lines) + "\n"


def serve_load(engine_dir: Path, a, out: Path) -> str:
    """scripts/loadtest.py against star-serve on the CUDA provider: `--serve-clients` streaming clients for
    `--serve-seconds`; its table, as Markdown."""
    import os
    import subprocess

    script = Path(__file__).with_name("loadtest.py")
    cmd = [sys.executable, str(script), "--engine", str(engine_dir), "--clients", str(a.serve_clients), "--seconds",
           str(a.serve_seconds), "--compare", str(a.serve_clients), "--rounds", "1", "--compare-seconds", "10",
           "--json", str(out / "gpu_serve.json")]
    done = subprocess.run(cmd, env=os.environ | {"STAR_PROVIDER": "cuda"}, capture_output=True, text=True)
    if done.returncode != 0:
        return f"\nstar-serve load test failed (exit {done.returncode}):\n\n```\n{done.stderr[-3000:]}\n```\n"
    return f"\n## star-serve on the GPU (keep {min(a.keeps)}, scripts/loadtest.py)\n\n{done.stdout}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local HF LLaVA directory (default: a random real-width one, --text-layers deep)")
    p.add_argument("--text-layers", type=int, default=32)
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--serve-clients", type=int, default=16)
    p.add_argument("--serve-seconds", type=float, default=60)
    p.add_argument("--no-serve", action="store_true", help="skip the star-serve load test")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--keeps", type=int, nargs="+", default=[576, 58])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per call")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--out", default="docs/benchmarks/gpu")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--kv-via-host", action="store_true",
                   help="also run each engine with its new keys and values copied through the host (the A/B of the device-side KV copy)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench.py: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="star-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir, engines, host_kv, hf, processor = build(a, work)
    prompt = prompt_of(processor.tokenizer, a.text_tokens)
    cached = {b: inputs_for(processor, b, prompt) for b in a.batches}
    configs = []
    for b in a.batches:
        configs.append(Config(f"HF generate {a.dtype} (sdpa)", b, hf_run(hf, "cuda"), kind="hf", rss=False))
        configs += [Config(f"engine {a.dtype} keep {k}", b, pipeline_run(e.pipeline), keep=k, rss=False) for k, e in engines.items()]
        configs += [Config(f"engine {a.dtype} keep {k}{HOST_KV}", b, pipeline_run(e.pipeline), keep=k, kind=HOST_KV, rss=False) for k, e in host_kv.items()]
    interleave(configs, lambda c: cached[c.batch], a.rounds, a.tokens, "gpu")
    text_tokens = int(cached[a.batches[0]]["attention_mask"][0].sum()) - engines[a.keeps[0]].spec.num_vision_tokens
    meta = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "date": time.strftime("%Y-%m-%d %H:%M"),
        "gpu": f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})",
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}", "versions": tool_versions() | {"numpy": np.__version__},
        "model": model_dir, "text_tokens": text_tokens, "new_tokens": a.tokens, "rounds": a.rounds,
    }
    bandwidth = copy_bandwidth()
    bound_ms = {k: decoder_weight_bytes(e) / bandwidth * 1e3 for k, e in engines.items()}
    meta["copy_bandwidth_gb_s"] = bandwidth / 1e9
    rows = rows_of(configs, engines, text_tokens, bound_ms)
    md = markdown(meta, rows)
    md += f"\nDecode against the weight-read bound (device copy bandwidth {bandwidth / 1e9:.0f} GB/s):\n\n"
    md += "| config | batch | decode ms/token | bound ms | x bound |\n|---|---|---|---|---|\n"
    md += "".join(f"| {r['config']} | {r['batch']} | {r['decode_ms']['median']:.2f} | {r['decode_bound_ms']:.2f} | "
                  f"{r['decode_vs_bound']:.2f} |\n" for r in rows if r.get("decode_vs_bound"))
    print(f"benchmark done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if not a.no_serve:
        md += serve_load(engines[min(engines)].directory, a, out)
    (out / "gpu_bench.md").write_text(md)
    print((out / "gpu_bench.md").read_text(), file=sys.stderr)
    return emit({"meta": meta, "rows": rows, "runs": {c.name + f" batch {c.batch}": c.results for c in configs}}, str(out / "gpu_bench.json"))


if __name__ == "__main__":
    sys.exit(main())
