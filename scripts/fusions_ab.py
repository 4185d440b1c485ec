#!/usr/bin/env python
"""Whole decode steps of an engine against a copy whose segment graphs carry ONNX Runtime's transformer fusions.

Issue 13 lists ORT's transformer fusions among the ways to a cheaper decode step. ONNX Runtime fuses some patterns by
itself when it creates a session, but not the ones the exporter writes for LLaMA's RMSNorm (Pow, ReduceMean, Add, Sqrt,
Reciprocal, Mul) and rotary embedding (Slice, Neg, Concat, Mul, Add): its profiler still lists those kernels in every
layer. onnxscript's `optimize_for_ort` rewrites them into `SimplifiedLayerNormalization`,
`SkipSimplifiedLayerNormalization` (with the residual add before it); its rotary rule matches the engine's RoPE but a
later stage (`cos_sin_cache`) does not, so the rotary ops stay (onnxscript 0.7.2). The engine's attention (two parts over
a cache buffer it only reads) is not a pattern it knows; `gqa_step_ab.py` measures GroupQueryAttention.
- The copy: a whole engine directory (`--work`, replaced), its segment graphs rewritten, every other file linked (or
  copied) from the engine, its star.json's file table rewritten and `tensorrt_parsable` false (the fused ops are ONNX
  Runtime's). So `star-run` and `decode_split.py` run on it too: the per-step split after the fusions.
- The run: `gqa_step_ab.alternate`: one prefill by the engine, its state copied; decode steps alternate between the
  engine and the copy (ABBA), each timed; per step, the logits' largest difference relative to their largest
  magnitude. The fusions change float32 rounding only (1e-6 of the logits' scale with float compute); with int8 compute
  (`accuracy_level` 4) those differences flip activations across quantization steps, as in `gqa_step_ab.py` (~2e-2).
- `--fused-first` creates the copy's sessions before the engine's (the first created can run slower): run it both ways.

    python scripts/fusions_ab.py --engine ENGINE --work DIR [--batch 1] [--steps 40] [--fused-first] [--json out.json]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from bench import emit, summary
from gqa_step_ab import SEGMENTS, alternate, step_ab_parser
from star_export.export.decode_graphs import ort_fusions


def fuse(engine: Path, out: Path) -> dict[str, dict[str, int]]:
    """Write the fused copy of `engine` into `out`; returns, per segment, the ops the rewrite introduced, counted in the
    graph it wrote."""
    from star_export.manifest import MANIFEST, file_table

    manifest = json.loads((engine / MANIFEST).read_text())
    files = {manifest["graphs"][s]["file"]: s for s in SEGMENTS}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    counts, rewritten = {}, {MANIFEST, *files, *(f"{f}.data" for f in files)}
    for path in engine.rglob("*"):
        relative = path.relative_to(engine)
        if path.is_dir() or relative.as_posix() in rewritten:
            continue
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, out / relative)
        except OSError:  # another file system
            shutil.copyfile(path, out / relative)
    for file, segment in files.items():
        counts[segment] = ort_fusions(engine / file, out / file)
    manifest |= {"tensorrt_parsable": False, "fusions": counts, "files": file_table(out)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return counts


def fused_segments(out: Path) -> dict:
    """The copy's segment graphs, the only ones the A/B runs (not the whole copy: its vision graph would be loaded, and
    every file hashed, for nothing)."""
    from star_export.manifest import MANIFEST
    from star_export.runtime.sessions import OrtGraph

    files = json.loads((out / MANIFEST).read_text())["graphs"]
    return {s: OrtGraph(out / files[s]["file"]) for s in SEGMENTS}


def main(argv=None) -> int:
    a = step_ab_parser(__doc__, "fused", "an engine directory", "where to write the fused copy, a whole engine directory (replaced)").parse_args(argv)
    counts = fuse(Path(a.engine), Path(a.work))
    engine, base_ms, fused_ms, differences = alternate(a.engine, lambda: fused_segments(Path(a.work)), a.fused_first, a.batch, a.steps)
    result = {"engine": a.engine, "copy": a.work, "batch": a.batch, "steps": a.steps, "fused_first": a.fused_first, "fusions": counts,
              "weights": engine.manifest.get("weights"), "step_ms": {"engine": summary(base_ms), "fused": summary(fused_ms)},
              "engine_over_fused": summary([b / f for b, f in zip(base_ms, fused_ms)]), "logits_relative_difference": summary(differences)}
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
