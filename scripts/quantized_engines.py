"""float32 vs int8 vs int4 engines of one model: the validator's verdict, what quantization costs against the
unquantized model, and decode ms/token, interleaved (one round = every engine once, in rotated order).

    python scripts/quantized_engines.py [--model DIR] [--rounds 3] [--tokens 16] [--json out.json]

Default model: real LLaVA-1.5-7B widths at reduced depth (testing.real_width_case: 2 decoder / 3 CLIP layers),
random weights, saved as a local HF directory. Timings are medians with min-max over the rounds, from this one
run only (DEVELOPERS.md: timings here are noisy; compare within one run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from star_export.export.build import export_engine
from star_export.export.quantize import WeightScheme
from star_export.models import load_model
from star_export.runtime.engine import Engine
from star_export.runtime.generate import Sampling
from star_export.runtime.inputs import synthetic_image
from star_export.testing import real_width_case, save_random_llava
from star_export.validate import validate_engine

SCHEMES = ("float", "int8", "int4")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local HF directory (default: a real-width, reduced-depth random model)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--keep", type=int, default=58)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="star-quant-"))
    model = a.model
    if model is None:
        case = real_width_case()
        model = str(save_random_llava(case.spec, root / "model", seed=case.seed, **case.init))
    loaded = load_model(model)
    rows = {}
    for kind in SCHEMES:
        out = root / kind
        export_engine(model=model, keep=a.keep, out=out, weights=WeightScheme(kind), validate=False, show_progress=False)
        report = validate_engine(out, loaded=loaded, max_new_tokens=a.tokens)
        rows[kind] = {"validator": "passed" if report.ok else "FAILED", "quality": report.quality,
                      "largest_multiplier": max([c.numbers["ratio"] for c in report.checks if "ratio" in c.numbers], default=None),
                      "failed": [f"{c.name}: {c.cause}" for c in report.checks if not c.ok],
                      "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()), "decode_ms": [], "prefill_s": []}
        print(f"{kind}: validator {rows[kind]['validator']}, quality {report.quality}", file=sys.stderr, flush=True)
    engines = {kind: Engine.from_dir(root / kind, provider="cpu") for kind in SCHEMES}
    images, prompts = [synthetic_image(0)], ["Describe the picture."]
    sampling = Sampling(max_new_tokens=a.tokens, stop_at_eos=False)
    for r in range(a.rounds):
        for kind in SCHEMES[r % 3:] + SCHEMES[: r % 3]:
            g = engines[kind].generate(images, prompts, sampling)
            rows[kind]["decode_ms"].append(1000 * g.timings["decode_s"] / max(1, g.timings["decode_steps"]))
            rows[kind]["prefill_s"].append(g.timings["prefill_s"])
    base = statistics.median(rows["float"]["decode_ms"])
    print(f"{'weights':8s} {'engine MB':>10s} {'validator':>9s} {'agree':>6s} {'top5':>6s} {'KL mean':>9s} {'decode ms/token (min-max)':>28s} {'vs float':>8s}")
    for kind, row in rows.items():
        q = next(iter(row["quality"].values()), {})
        d = row["decode_ms"]
        print(f"{kind:8s} {row['bytes'] / 1e6:10.0f} {row['validator']:>9s} {q.get('greedy_agreement', 1.0):6.3f} "
              f"{q.get('top5_containment', 1.0):6.3f} {q.get('kl_mean', 0.0):9.2e} "
              f"{statistics.median(d):12.1f} ({min(d):.1f}-{max(d):.1f}){'':6s} {statistics.median(d) / base:8.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
