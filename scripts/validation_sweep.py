"""Measure the validator's multipliers on the generated sweep of random models (tests/test_validate_sweep.py).

For each case: save the random model as a local HF directory, `star-export` it (self-check included), then run
`star-validate`'s check on the engine and record, per budgeted output, engine error / eager error. Prints one
row per case and the largest multiplier seen per kind of output; `--json PATH` keeps every number.

    python scripts/validation_sweep.py [--n 24] [--real-width] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from star_export.export.build import export_engine
from star_export.testing import real_width_case, save_random_llava, validation_sweep
from star_export.validate import validate_engine


def run_case(case, root: Path) -> dict:
    model_dir = save_random_llava(case.spec, root / "model", seed=case.seed, **case.init)
    t = time.perf_counter()
    row = {"case": case.name}
    try:
        export_engine(model=str(model_dir), keep=case.keep, out=root / "engine", dtype=case.dtype, max_new_tokens=32, show_progress=False)
        row["self_check"] = "passed"
    except Exception as e:  # the self-check's failure is what this script reports
        row["self_check"] = f"{type(e).__name__}: {str(e)[-3000:]}"
        return row | {"seconds": time.perf_counter() - t}
    report = validate_engine(root / "engine", max_new_tokens=8)
    row["star_validate"] = "passed" if report.ok else "FAILED"
    row["failed"] = [f"{c.name}: {c.cause}" for c in report.checks if not c.ok]
    row["ratios"] = {c.name: c.numbers["ratio"] for c in report.checks if "ratio" in c.numbers}
    row["swaps"] = {c.name: c.numbers["swaps"] for c in report.checks if c.numbers.get("swaps")}
    return row | {"seconds": time.perf_counter() - t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--real-width", action="store_true", help="also the two real-width cases (float32, float16), minutes each")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cases = validation_sweep(args.n) + ([real_width_case("float32"), real_width_case("float16", keep=29)] if args.real_width else [])
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory() as d:
            row = run_case(case, Path(d))
        rows.append(row)
        worst = max(row.get("ratios", {}).items(), key=lambda kv: kv[1], default=("-", 0.0))
        print(f"{row['case']:<52} self-check {row['self_check'][:60]:<12} validate {row.get('star_validate', '-'):<7} "
              f"max x eager {worst[1]:5.2f} ({worst[0]}) swaps {sum(row.get('swaps', {}).values())} {row['seconds']:.0f} s", flush=True)
        for f in row.get("failed", []):
            print(f"    {f}", flush=True)
    kinds: dict[str, float] = {}
    for row in rows:
        for name, ratio in row.get("ratios", {}).items():
            kind = name.split(" ", 1)[1] if name.startswith(("vision", "segment", "pivot")) else "logits (end to end)"
            kinds[kind.split(" (")[0]] = max(kinds.get(kind.split(" (")[0], 0.0), ratio)
    print("largest multiplier per output:", json.dumps({k: round(v, 2) for k, v in sorted(kinds.items())}))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r.get("star_validate") == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
