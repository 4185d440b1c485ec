"""star-calibrate: choose a model's schedule (k1, P, method) by fidelity to the unpruned model on the user's own images.

For a model, a final `keep` and a calibration set (JSONL of {"image": path, "prompt": text}), every schedule of a grid
(stage-1 budgets x pivot layers x methods, config.METHODS) is measured against the unpruned model:

- fidelity, teacher-forced on the unpruned model's greedy answer over N tokens: the mean next-token KL divergence
  KL(unpruned || schedule) in float64, the top-1 agreement (the schedule's argmax is the answer's token), and the exact
  match of greedy answers (a schedule's free-running greedy answer equals the unpruned one exactly when its argmax
  agrees at every forced step, so it needs no second run);
- cost, from the plan (flops.py): decoder prefill FLOPs and KV-cache bytes relative to the unpruned model.

Both run the eager reference (validate/reference.py) in float32; the unpruned model is the schedule that keeps every
visual token, which equals the unmodified Hugging Face model (tests/test_reference.py). Results go to `DIR` one schedule
at a time (`results.jsonl`), so an interrupted run picks up where it stopped; then the table (Markdown, CSV, JSON), a
PNG of fidelity against FLOPs with the Pareto front, and `recipe.json` for the most faithful schedule within
`--flops-budget` (or at the given keep), which `star-export --recipe DIR/recipe.json` builds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import METHODS, ScheduleError, StarSchedule
from .errors import UserError
from .flops import plan
from .models import LoadedModel
from .runtime.generate import Sampling, softmax64
from .runtime.inputs import prepare_inputs, synthetic_image
from .validate import BUILTIN_QUESTIONS
from .validate.reference import reference_pipeline

RECIPE_VERSION = 1
DEFAULT_TOKENS = 16
TEXT_TOKENS_FOR_COST = 52  # the prompt text tokens the cost is planned for (flops.dry_run's default)


class CalibrationError(UserError, ValueError):
    """A bad calibration input (data file, grid, output directory); the message names the line or flag."""


@dataclass(frozen=True)
class Case:
    image: Any  # a path or a PIL image
    prompt: str
    where: str  # "FILE:LINE", or "built-in N"


def default_cases(count: int = 6) -> list[Case]:
    """The synthetic default set: generated pictures and the validator's questions."""
    return [
        Case(synthetic_image(i), BUILTIN_QUESTIONS[i % len(BUILTIN_QUESTIONS)], f"built-in {i}") for i in range(count)
    ]


def read_cases(path: str | Path) -> list[Case]:
    """The calibration set in JSONL: one {"image": path, "prompt": text} per line (blank lines skipped; image paths
    relative to the file). Every problem names its line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"--data {path}: cannot read it ({e.__class__.__name__}: {e})") from e
    cases = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f'{where}: not a JSON object ({e.msg}): write one {{"image", "prompt"}} per line')
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise CalibrationError(f'{where}: needs {{"image": "<path>", "prompt": "<text>"}} with both as strings')
        image = (path.parent / row["image"]).expanduser()
        if not image.is_file():
            raise CalibrationError(f"{where}: image {row['image']!r} not found (looked at {image})")
        if not row["prompt"].strip():
            raise CalibrationError(f"{where}: the prompt is empty")
        cases.append(Case(str(image), row["prompt"], where))
    if not cases:
        raise CalibrationError(f"--data {path}: no cases in it")
    return cases


def schedule_grid(
    loaded: LoadedModel,
    keep: int,
    methods: Sequence[str],
    stage1_keeps: Sequence[int] | None,
    pivot_layers: Sequence[int] | None,
) -> list[StarSchedule]:
    """Every schedule of the grid, each once; the unpruned schedule is the reference, not a candidate. `stage1_keeps`
    / `pivot_layers` apply to the methods whose budget they are (STAR's k1 and P; FastV's P); None: each method's
    defaults."""
    spec = loaded.spec
    if not methods:
        raise CalibrationError("--methods is empty: name at least one of " + ", ".join(METHODS))
    for flag, values in (("--stage1-keeps", stage1_keeps), ("--pivot-layers", pivot_layers)):
        if values is not None and not values:
            raise CalibrationError(f"{flag} is empty: give at least one value, or leave the flag out")
    for k1 in stage1_keeps or ():
        if k1 < keep:
            raise CalibrationError(f"--stage1-keeps {k1}: smaller than --keep {keep} (stage 1 keeps at least keep)")
    schedules: dict[str, StarSchedule] = {}
    for method in methods:
        if method not in METHODS:
            raise CalibrationError(f"--methods {method!r}: allowed {', '.join(METHODS)}")
        m = METHODS[method]
        k1s = stage1_keeps if (stage1_keeps and m.stage1_keep is None) else [None]
        ps = pivot_layers if (pivot_layers and m.stage2_scorer != "none") else [None]
        for k1 in k1s:
            for p in ps:
                try:
                    s = StarSchedule.from_spec(
                        spec, keep=keep, stage1_keep=k1, pivot_layer=p, defaults=loaded.defaults, method=method
                    )
                except ScheduleError as e:
                    raise CalibrationError(f"{method} k1={k1} P={p}: {e}") from e
                schedules.setdefault(schedule_key(s), s)
    return list(schedules.values())


def schedule_key(s: StarSchedule) -> str:
    return f"{s.method or 'custom'}-k1_{s.stage1_keep}-P{s.pivot_layer}-keep{s.keep}"


def forced_logits(pipe, inputs: dict, tokens: list[int]) -> list[np.ndarray]:
    """The schedule's next-token logits (vocab,) at each of `tokens`' steps, fed `tokens` (teacher forcing)."""
    state, _ = pipe.prefill(
        inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], reserve=max(len(tokens) - 1, 0)
    )
    out = [state.logits[0]]
    for token in tokens[:-1]:
        state = pipe.step(state, np.array([token], np.int64))
        out.append(state.logits[0])
    return out


def fidelity(teacher: list[np.ndarray], student: list[np.ndarray], tokens: list[int]) -> dict[str, float]:
    """KL(teacher || student) per step (mean), top-1 agreement with the teacher's tokens, exact match of the answer."""
    kls, agree = [], []
    for t, s, token in zip(teacher, student, tokens):
        p, q = softmax64(t), softmax64(s)
        kls.append(float(np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))))))
        agree.append(int(np.argmax(s)) == token)
    return {"kl": float(np.mean(kls)), "top1": float(np.mean(agree)), "exact": float(all(agree))}


def cost(loaded: LoadedModel, s: StarSchedule) -> dict[str, float]:
    p = plan(loaded.spec, s, TEXT_TOKENS_FOR_COST)
    return {
        "flops_ratio": p.flops["ratio"],
        "star_tflops": p.flops["star_tflops"],
        "kv_ratio": p.kv_cache_bytes_per_sequence["float32"]["ratio"],
    }


def _settings_hash(model: str, keep: int, cases: Sequence[Case], tokens: int) -> str:
    text = json.dumps([model, keep, tokens, [(str(c.image), c.prompt) for c in cases]], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def calibrate(
    loaded: LoadedModel,
    model_name: str,
    keep: int,
    out: str | Path,
    cases: Sequence[Case],
    schedules: Sequence[StarSchedule],
    tokens: int = DEFAULT_TOKENS,
    flops_budget: float | None = None,
    device: str = "cpu",
    progress=print,
) -> dict:
    """Measure every schedule (resuming from `out/results.jsonl`), write the table, plot and recipe. Returns the
    recipe."""
    within_budget([{"key": schedule_key(s), **cost(loaded, s)} for s in schedules], flops_budget)  # before measuring
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = {
        "model": model_name,
        "keep": keep,
        "tokens": tokens,
        "settings": _settings_hash(model_name, keep, cases, tokens),
    }
    run_file, results_file = out / "run.json", out / "results.jsonl"
    if run_file.exists() and json.loads(run_file.read_text()) != run:
        raise CalibrationError(
            f"--out {out} holds a calibration of other settings (model, keep, data or tokens): use another directory "
            "or delete it"
        )
    run_file.write_text(json.dumps(run, indent=2) + "\n")
    done = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            try:
                row = json.loads(line)
                done[row["key"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by an interruption: measured again
        tmp = results_file.with_suffix(".tmp")  # the whole lines only, so new ones start on a line of their own
        tmp.write_text("".join(json.dumps(row) + "\n" for row in done.values()))
        tmp.replace(results_file)
    if any(schedule_key(s) not in done for s in schedules):  # the unpruned model's answers, for what is left
        inputs = [prepare_inputs(loaded.processor, [c.image], [c.prompt]) for c in cases]
        unpruned = StarSchedule.from_spec(
            loaded.spec, keep=loaded.spec.num_vision_tokens, stage1_keep=loaded.spec.num_vision_tokens, pivot_layer=0
        )
        progress(f"unpruned model: greedy answers of {tokens} tokens on {len(cases)} cases")
        teacher_pipe = reference_pipeline(loaded, unpruned, device)
        answers, teacher = [], []
        for x in inputs:
            gen = teacher_pipe.generate(x["pixel_values"], x["input_ids"], x["attention_mask"], _greedy(tokens))
            answers.append(gen.token_ids[0])
            teacher.append([logits[0] for logits in gen.logits])
    for i, s in enumerate(schedules, 1):
        key = schedule_key(s)
        if key in done:
            progress(f"[{i}/{len(schedules)}] {key}: measured before, kept")
            continue
        t = time.perf_counter()
        pipe = reference_pipeline(loaded, s, device)
        per_case = [fidelity(tl, forced_logits(pipe, x, a), a) for x, a, tl in zip(inputs, answers, teacher)]
        row = {
            "key": key,
            "method": s.method,
            "stage1_keep": s.stage1_keep,
            "pivot_layer": s.pivot_layer,
            "keep": s.keep,
            "schedule": s.asdict(),
            **{m: float(np.mean([c[m] for c in per_case])) for m in ("kl", "top1", "exact")},
            **cost(loaded, s),
            "cases": per_case,
        }
        with results_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row
        progress(
            f"[{i}/{len(schedules)}] {key}: KL {row['kl']:.4g}, top-1 {row['top1']:.3f}, exact {row['exact']:.2f}, "
            f"FLOPs {row['flops_ratio']:.3f} ({time.perf_counter() - t:.1f} s)"
        )
    rows = [done[schedule_key(s)] for s in schedules]
    front = pareto(rows)
    best = choose(rows, flops_budget)
    write_tables(out, rows, front, run)
    write_plot(out / "pareto.png", rows, front, best)
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "model": model_name,
        "keep": best["keep"],
        "stage1_keep": best["stage1_keep"],
        "pivot_layer": best["pivot_layer"],
        "method": best["method"],
        "chosen_by": "lowest mean KL" + (f" within FLOPs ratio <= {flops_budget}" if flops_budget else " at this keep"),
        "fidelity": {m: best[m] for m in ("kl", "top1", "exact")},
        "cost": {m: best[m] for m in ("flops_ratio", "kv_ratio")},
        "calibration": {"cases": len(cases), "tokens": tokens, "schedules": len(rows)},
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def _greedy(tokens: int) -> Sampling:
    return Sampling(max_new_tokens=tokens, stop_at_eos=False)


def pareto(rows: list[dict]) -> list[str]:
    """Keys of the schedules no other beats on both FLOPs and KL (lower is better in both)."""
    front = []
    for r in rows:
        if not any(
            o["flops_ratio"] <= r["flops_ratio"]
            and o["kl"] <= r["kl"]
            and (o["flops_ratio"], o["kl"]) != (r["flops_ratio"], r["kl"])
            for o in rows
        ):
            front.append(r["key"])
    return front


def within_budget(rows: list[dict], flops_budget: float | None) -> list[dict]:
    """The rows whose FLOPs ratio is at most `flops_budget` (all where None); none is a CalibrationError."""
    within = [r for r in rows if flops_budget is None or r["flops_ratio"] <= flops_budget]
    if not within:
        cheapest = min(r["flops_ratio"] for r in rows)
        raise CalibrationError(
            f"--flops-budget {flops_budget}: no schedule of the grid is that cheap (the cheapest: {cheapest:.3f}); "
            "raise the budget or lower --keep"
        )
    return within


def choose(rows: list[dict], flops_budget: float | None) -> dict:
    return min(within_budget(rows, flops_budget), key=lambda r: (r["kl"], -r["top1"], r["flops_ratio"]))


COLUMNS = ("key", "method", "stage1_keep", "pivot_layer", "keep", "kl", "top1", "exact", "flops_ratio", "kv_ratio")


def write_tables(out: Path, rows: list[dict], front: list[str], run: dict) -> None:
    with (out / "table.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*COLUMNS, "pareto"])
        for r in rows:
            w.writerow([*(r[c] for c in COLUMNS), r["key"] in front])
    (out / "table.json").write_text(
        json.dumps(
            {"run": run, "rows": [{k: v for k, v in r.items() if k != "cases"} for r in rows], "pareto": front},
            indent=2,
        )
        + "\n"
    )
    lines = [
        f"# star-calibrate: {run['model']}, keep {run['keep']}, {run['tokens']} teacher-forced tokens",
        "",
        "Fidelity to the unpruned model (mean over cases): next-token KL(unpruned || schedule), top-1 agreement, exact "
        "match of the greedy answer; cost: decoder prefill FLOPs and KV bytes relative to the unpruned model. "
        "`*`: on the Pareto front (FLOPs vs KL).",
        "",
        "| schedule | method | k1 | P | keep | KL | top-1 | exact | FLOPs | KV |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["flops_ratio"]):
        mark = " *" if r["key"] in front else ""
        lines.append(
            f"| {r['key']}{mark} | {r['method']} | {r['stage1_keep']} | {r['pivot_layer']} | {r['keep']} | "
            f"{r['kl']:.4g} | {r['top1']:.3f} | {r['exact']:.2f} | {r['flops_ratio']:.3f} | {r['kv_ratio']:.3f} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")


def write_plot(path: Path, rows: list[dict], front: list[str], best: dict, size: tuple[int, int] = (720, 480)) -> None:
    """Mean KL (log scale) against the FLOPs ratio, one dot per schedule coloured by method, the Pareto front joined,
    the chosen schedule ringed; drawn with Pillow."""
    from PIL import Image, ImageDraw

    w, h, pad = *size, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [r["flops_ratio"] for r in rows]
    ys = [math.log10(max(r["kl"], 1e-12)) for r in rows]
    x0, x1 = min(xs) - 0.02, max(xs) + 0.02
    y0, y1 = min(ys) - 0.1, max(ys) + 0.1

    def at(x, y):
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    d.text((w / 2 - 80, h - pad + 25), "decoder FLOPs / unpruned", fill="black")
    d.text((5, pad - 25), "mean KL vs unpruned (log10)", fill="black")
    for v in np.linspace(y0, y1, 5):
        d.text((5, at(x0, v)[1] - 6), f"{v:.1f}", fill="black")
    for v in np.linspace(x0, x1, 5):
        d.text((at(v, y0)[0] - 12, h - pad + 5), f"{v:.2f}", fill="black")
    on_front = sorted((r for r in rows if r["key"] in front), key=lambda r: r["flops_ratio"])
    d.line([at(r["flops_ratio"], math.log10(max(r["kl"], 1e-12))) for r in on_front], fill="gray", width=2)
    colours = {"star": "tab:blue", "fastv": "tab:orange", "fastervlm": "tab:green"}
    rgb = {"tab:blue": (31, 119, 180), "tab:orange": (255, 127, 14), "tab:green": (44, 160, 44)}
    for r, y in zip(rows, ys):
        cx, cy = at(r["flops_ratio"], y)
        colour = rgb[colours.get(r["method"], "tab:blue")]
        d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=colour)
        if r["key"] == best["key"]:
            d.ellipse([cx - 10, cy - 10, cx + 10, cy + 10], outline="red", width=2)
    for i, (name, c) in enumerate(colours.items()):
        d.ellipse([w - pad - 110, pad + 10 + 18 * i, w - pad - 100, pad + 20 + 18 * i], fill=rgb[c])
        d.text((w - pad - 95, pad + 8 + 18 * i), name, fill="black")
    img.save(path)


def read_recipe(path: str | Path) -> dict:
    """A recipe.json written by star-calibrate: model, keep, stage1_keep, pivot_layer, method."""
    try:
        recipe = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"--recipe {path}: not a readable recipe.json ({e.__class__.__name__}: {e})") from e
    need = {"model": str, "keep": int, "stage1_keep": int, "pivot_layer": int, "method": str}
    bad = [k for k, t in need.items() if not isinstance(recipe.get(k), t)]
    if not isinstance(recipe, dict) or recipe.get("recipe_version") != RECIPE_VERSION or bad:
        raise CalibrationError(
            f"--recipe {path}: not a star-calibrate recipe (version {RECIPE_VERSION}; fields {', '.join(need)})"
            + (f": {', '.join(bad)} missing or mistyped" if bad else "")
        )
    return recipe


def main_progress(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
