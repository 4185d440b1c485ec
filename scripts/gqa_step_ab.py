#!/usr/bin/env python
"""Whole decode steps of an engine against a copy whose attention is ONNX Runtime's `GroupQueryAttention`.

A measurement that chose the next step of issue 13: "what would an ORT-specific decode graph with GQA save per step",
which `attention_ab.py` estimates per layer. With `--pivot-too --fuse` the copy is what `star-export` now writes as an
engine's decode graphs (star_export/export/decode_graphs.py, whose rewrite this script runs); `decode_split.py`
measures those in the product's own path.
- The copy: in both segment graphs, every layer but the pivot (whose probabilities feed the stage-2 scores) has its
  attention block (found by `decode_graphs.attention_blocks`) replaced by one GQA node: RoPE inside, at the graph's
  `position_ids`; the layer's cache buffer shared as past and present (`present.{i}.*` bound to the buffer, the new key
  and value written at slot `length`); three new inputs (`gqa_seqlens_k`, `gqa_total`, `gqa_bias`: the filled slots'
  mask); the layer's `new_key_values.{i}.*` outputs dropped; then dead nodes removed. Weights are copied, not linked
  (ONNX Runtime refuses external data outside the model's folder).
- `--pivot-too`: the pivot layer too, and segment 0's stage-2 scores output dropped (only a prefill reads it): a
  decode-only copy with no attention block left. `--fuse`: then onnxscript's `optimize_for_ort` (as `fusions_ab.py`)
  over the copy.
- The run: one prefill by the engine, its state copied; then decode steps alternate between the engine and the copy
  (both greedy on the engine's first token; which goes first alternates per round), each timed.
- Sessions created first in a process can run slower (seen with two engines in one process, in either order), so
  `--gqa-first` creates the copy's sessions before the engine's: run it both ways.
- Per step, the logits' largest difference relative to their largest magnitude. For an engine with float compute it is
  float32 rounding (2.7e-6 on the real-width int4 engine with `accuracy_level` 0); with int8 compute (level 4) the two
  attentions' rounding differences flip activations across quantization steps, and the difference is that of the
  validator's flip cascades (~2e-2).

    python scripts/gqa_step_ab.py --engine ENGINE --work DIR [--batch 1] [--steps 40] [--gqa-first] [--pivot-too] [--fuse] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench import emit, summary
from star_export.export.decode_graphs import DECODE_GRAPHS, ort_fusions, rewrite_segment
from star_export.runtime.decode import DecodeGraph

SEGMENTS = tuple(DECODE_GRAPHS)  # the decoder segments


def rewrite(engine: Path, out: Path, pivot_too: bool = False) -> dict[str, list[int]]:
    """Write the GQA copy of `engine` into `out` (the product's `rewrite_segment` per segment, the weight files copied
    beside it); returns the layers rewritten per segment. `pivot_too`: the pivot layer too, and segment 0's stage-2
    scores dropped: the decode graphs `star-export` writes, before their fusions."""
    manifest = json.loads((engine / "star.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rewritten = {}
    for segment in SEGMENTS:
        path = engine / manifest["graphs"][segment]["file"]
        for data in engine.glob(f"{path.name}.data"):
            shutil.copyfile(data, out / data.name)
        rewritten[segment] = rewrite_segment(path, out / f"{segment}.onnx", manifest, "all" if pivot_too else "not-pivot")
    return rewritten


GqaGraph = DecodeGraph  # a rewritten segment, run by `StarPipeline.step` (which feeds `cache_length`)


def fuse_copy(out: Path) -> dict[str, dict[str, int]]:
    """`ort_fusions` over the copy's segments, written as `{segment}.fused.onnx`."""
    return {name: ort_fusions(out / f"{name}.onnx", out / f"{name}.fused.onnx") for name in SEGMENTS}


def copy_paths(out: Path, fused: bool = False) -> dict[str, Path]:
    """The copy's segment graphs (`--fuse`: the fused ones)."""
    return {name: out / f"{name}{'.fused' if fused else ''}.onnx" for name in SEGMENTS}


def gqa_segments(out: Path, fused: bool = False) -> dict:
    return {name: GqaGraph(path) for name, path in copy_paths(out, fused).items()}


def twin_pipeline(pipeline, segments: dict):
    """`pipeline` with the rewritten `segments` in place of its own, for decode steps (`alternate` never runs its prefill:
    a GQA copy has no prefill inputs); its steps first make room for the slot GQA writes."""
    twin = copy.copy(pipeline)
    twin.graphs = dict(pipeline.graphs) | segments
    step = twin.step

    def step_with_room(state, tokens):
        state.cache0.make_room(1)
        state.cache1.make_room(1)
        return step(state, tokens)

    twin.step = step_with_room
    return twin


def alternate(engine_dir: str, segments, copy_first: bool, batch: int, steps: int) -> tuple:
    """The engine at `engine_dir` against a twin of its pipeline whose segment graphs `segments()` creates (before the
    engine's sessions when `copy_first`: the first created can run slower). One prefill by the engine, its state copied;
    then `steps` decode steps (after 4 of warm-up) alternating between the two, both greedy on the engine's first token,
    which goes first alternating per round (ABBA). Returns the engine, each one's step ms and, per step, the logits'
    largest difference relative to their largest magnitude."""
    from star_export.runtime.engine import Engine
    from star_export.runtime.inputs import synthetic_image

    first = segments() if copy_first else None
    engine = Engine.from_dir(engine_dir, provider="cpu", decode_graphs=False)
    twin = twin_pipeline(engine.pipeline, first or segments())
    inputs = engine.prepare([synthetic_image(i) for i in range(batch)], ["Describe the picture in detail."] * batch)
    state, _ = engine.pipeline.prefill(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], reserve=steps + 4)
    other = copy.deepcopy(state)
    tokens = state.logits.argmax(-1)
    base_ms, twin_ms, differences = [], [], []
    for i in range(steps + 4):
        for which in ("engine", "twin") if i % 2 == 0 else ("twin", "engine"):
            t = time.perf_counter()
            if which == "engine":
                state = engine.pipeline.step(state, tokens)
                base_ms.append((time.perf_counter() - t) * 1e3)
            else:
                other = twin.step(other, tokens)
                twin_ms.append((time.perf_counter() - t) * 1e3)
        differences.append(float(np.abs(state.logits - other.logits).max() / np.abs(state.logits).max()))
    return engine, base_ms[4:], twin_ms[4:], differences


def step_ab_parser(doc: str, copy: str, engine_help: str, work_help: str) -> argparse.ArgumentParser:
    """The command line of the whole-step A/B scripts (this one, fusions_ab.py): `--{copy}-first` creates the copy's
    sessions before the engine's."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--engine", required=True, help=engine_help)
    p.add_argument("--work", required=True, help=work_help)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument(f"--{copy}-first", action="store_true", help="create the copy's sessions before the engine's (the first can be slower)")
    p.add_argument("--json", default=None)
    return p


def main(argv=None) -> int:
    p = step_ab_parser(__doc__, "gqa", "an engine directory (float32 activations)", "where to write the rewritten copy (replaced)")
    p.add_argument("--pivot-too", action="store_true", help="rewrite the pivot layer too and drop the stage-2 scores (decode-only copy)")
    p.add_argument("--fuse", action="store_true", help="then apply onnxscript's optimize_for_ort to the copy (as fusions_ab.py)")
    a = p.parse_args(argv)
    rewritten = rewrite(Path(a.engine), Path(a.work), a.pivot_too)
    fusions = fuse_copy(Path(a.work)) if a.fuse else None
    engine, base_ms, gqa_ms, differences = alternate(a.engine, lambda: gqa_segments(Path(a.work), a.fuse), a.gqa_first, a.batch, a.steps)
    ratios = [b / g for b, g in zip(base_ms, gqa_ms)]

    result = {"engine": a.engine, "batch": a.batch, "steps": a.steps, "gqa_first": a.gqa_first, "gqa_layers": rewritten, "fusions": fusions, "weights": engine.manifest.get("weights"),
              "step_ms": {"engine": summary(base_ms), "gqa": summary(gqa_ms)}, "engine_over_gqa": summary(ratios),
              "logits_relative_difference": summary(differences)}
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
