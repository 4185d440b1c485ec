#!/usr/bin/env python
"""Engine at keep=K vs the same engine at keep=576 (no pruning), in one process, on a random model at
real LLaVA-1.5-7B widths (CLIP 1024 / 16 heads; decoder 4096 / 11008 / 32 heads) with reduced depth.

Prints prefill ms (decoder: segment 0 + pivot + segment 1; vision separately), decode ms/token, KV bytes
after prefill, and the FLOPs-ideal prefill speedup (STAR.md §FLOPs) next to the measured one.

    python scripts/benchmark.py [--keep 58] [--text-layers 4] [--pivot-layer 1] [--vision-layers 3] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from star_export.config import ModelSpec, StarSchedule  # noqa: E402
from star_export.export.onnx_export import export_onnx  # noqa: E402
from star_export.flops import plan  # noqa: E402
from star_export.models import LoadedModel, build_random_llava  # noqa: E402
from star_export.reference import decoder_layout, reference_pipeline  # noqa: E402
from star_export.runtime.generate import Sampling, StarPipeline  # noqa: E402
from star_export.runtime.inputs import prepare_inputs, synthetic_image  # noqa: E402
from star_export.runtime.sessions import OrtGraph  # noqa: E402
from star_export.testing import real_width_spec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=int, default=58)
    ap.add_argument("--stage1-keep", type=int, default=490)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--pivot-layer", type=int, default=1)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--profile", action="store_true", help="write ONNX Runtime profiles of one prefill per engine and summarise them")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--no-eager", action="store_true", help="skip timing the eager PyTorch reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    spec = real_width_spec(vision_layers=args.vision_layers, text_layers=args.text_layers)
    t = time.perf_counter()
    model, processor = build_random_llava(spec, seed=0, text_init_std=0.02)
    loaded = LoadedModel(model, processor, ModelSpec.from_hf(model.config), {})
    print(f"built random model at real widths ({args.text_layers} decoder layers, {args.vision_layers} CLIP layers) in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    schedules = {
        "keep 576": StarSchedule.from_spec(loaded.spec, keep=576, stage1_keep=576, pivot_layer=args.pivot_layer),
        f"keep {args.keep}": StarSchedule.from_spec(loaded.spec, keep=args.keep, stage1_keep=args.stage1_keep, pivot_layer=args.pivot_layer),
    }
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="star-bench-"))
    t = time.perf_counter()
    shared = export_onnx(loaded, schedules["keep 576"], work / "shared", graphs=["segment0", "segment1"])
    graphs = {}
    for label, s in schedules.items():
        own = export_onnx(loaded, s, work / label.replace(" ", "-"), graphs=["vision", "pivot"])
        graphs[label] = {k: v.path for k, v in (shared | own).items()}
    print(f"exported to {work} in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    inputs = prepare_inputs(processor, [synthetic_image(0)], ["What is in the image? Answer with one word."])
    text_tokens = int(inputs["attention_mask"].sum()) - loaded.spec.num_vision_tokens
    embed = model.get_input_embeddings().weight.detach().numpy()
    rows = {}
    sampling = Sampling(max_new_tokens=args.new_tokens, stop_at_eos=False)

    def timed(pipe):
        runs = [pipe.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], sampling) for _ in range(args.repeats + 1)]
        return runs[1:]  # the first run is warm-up

    eager = {}
    for label, s in schedules.items():
        if not args.no_eager:
            runs = timed(reference_pipeline(loaded, s))
            eager[label] = {k: statistics.median(r.timings[k] for r in runs) * 1e3 for k in ("prefill_s", "vision_s")}
            eager[label]["decode_ms"] = statistics.median(r.timings["decode_s"] / r.timings["decode_steps"] for r in runs) * 1e3
        pipe = StarPipeline({k: OrtGraph(p, threads=args.threads) for k, p in graphs[label].items()}, embed, s, decoder_layout(loaded))
        runs = timed(pipe)
        p = plan(loaded.spec, s, text_tokens)
        rows[label] = {
            "vision_ms": statistics.median(r.timings["vision_s"] for r in runs) * 1e3,
            "prefill_ms": statistics.median(r.timings["prefill_s"] for r in runs) * 1e3,
            "decode_ms": statistics.median(r.timings["decode_s"] / r.timings["decode_steps"] for r in runs) * 1e3,
            "kv_bytes": runs[0].kv_bytes_after_prefill,
            "planned_kv": p.kv_cache_bytes_per_sequence["float32"]["star"],
            "flops": p.flops["star"],
            "seq": runs[0].seq_lens,
        }
        if args.profile:
            profile_prefill(graphs[label], pipe, inputs, label, work, args.threads)
        del pipe

    base, star = rows["keep 576"], rows[f"keep {args.keep}"]
    ideal = base["flops"] / star["flops"]
    measured = base["prefill_ms"] / star["prefill_ms"]
    print(f"\nreal LLaVA-1.5-7B widths, {args.text_layers} decoder layers (pivot {args.pivot_layer}), {args.vision_layers} CLIP layers, "
          f"{text_tokens} text tokens, fp32, ONNX Runtime CPU, {args.threads} threads, median of {args.repeats}")
    print(f"{'engine':<10} {'seg0/seg1 tokens':>16} {'vision ms':>10} {'prefill ms':>11} {'decode ms/tok':>14} {'KV bytes':>12} {'= plan':>7} {'decoder GFLOP':>14}")
    for label, r in rows.items():
        print(f"{label:<10} {r['seq']['segment0']:>7}/{r['seq']['segment1']:<8} {r['vision_ms']:>10.1f} {r['prefill_ms']:>11.1f} {r['decode_ms']:>14.1f} "
              f"{r['kv_bytes']:>12,d} {str(r['kv_bytes'] == r['planned_kv']):>7} {r['flops'] / 1e9:>14.1f}")
    print(f"prefill speedup: measured {measured:.2f}x, FLOPs-ideal {ideal:.2f}x, measured/ideal {measured / ideal:.2f} (target >= 0.9)")
    print(f"decode speedup: {base['decode_ms'] / star['decode_ms']:.2f}x;  KV bytes ratio {star['kv_bytes'] / base['kv_bytes']:.3f}")
    for label, e in eager.items():
        r = rows[label]
        print(f"eager PyTorch {label}: prefill {e['prefill_s']:.1f} ms, decode {e['decode_ms']:.1f} ms/tok -> "
              f"engine/eager time: prefill {r['prefill_ms'] / e['prefill_s']:.2f}, decode {r['decode_ms'] / e['decode_ms']:.2f}")
    if eager:
        print(f"eager prefill speedup from pruning: {eager['keep 576']['prefill_s'] / eager[f'keep {args.keep}']['prefill_s']:.2f}x")
    return 0


def profile_prefill(paths, pipe, inputs, label, work, threads):
    """One prefill with ONNX Runtime's profiler on; prints the top operators by time per graph."""
    import json

    import onnxruntime as ort

    profiled = {}
    for name, path in paths.items():
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(work / f"profile-{label.replace(' ', '-')}-{name}")
        opts.intra_op_num_threads = threads
        g = OrtGraph.__new__(OrtGraph)
        g._ort = ort
        g.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        g.provider, g.device = "CPUExecutionProvider", "cpu"
        g.input_names = [i.name for i in g.session.get_inputs()]
        g.output_names = [o.name for o in g.session.get_outputs()]
        profiled[name] = g
    saved = pipe.graphs
    pipe.graphs = profiled
    pipe.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], Sampling(max_new_tokens=1))
    pipe.graphs = saved
    for name, g in profiled.items():
        events = json.load(open(g.session.end_profiling()))
        per_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3
        top = sorted(per_op.items(), key=lambda kv: -kv[1])[:5]
        print(f"  profile {label} {name}: " + ", ".join(f"{op} {ms:.1f} ms" for op, ms in top), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
