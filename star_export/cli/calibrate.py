"""`star-calibrate`: choose the schedule for a model by fidelity on the user's own images (star_export/calibrate.py)."""

from __future__ import annotations

import argparse

from .common import command_parser, positive, run_command


def calibrate_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "star-calibrate",
        "Measure schedules (stage-1 budget k1, pivot layer P, method) by fidelity to the unpruned model on a "
        "calibration set and by cost; write a table, a plot and the recipe star-export --recipe builds.",
    )
    p.add_argument(
        "--model", default="tiny-llava", help="recipe alias, local Hugging Face directory, or cached model id"
    )
    p.add_argument("--keep", type=positive, default=58, help="visual tokens kept after both stages (default 58)")
    p.add_argument(
        "--data",
        default=None,
        help='calibration set: JSONL, one {"image": path, "prompt": text} per line, image paths relative to the file '
        "(default: 6 built-in synthetic pictures and questions)",
    )
    p.add_argument(
        "--methods",
        nargs="*",
        default=["star", "fastv", "fastervlm"],
        help="methods to compare (star fastv fastervlm; default all three)",
    )
    p.add_argument(
        "--stage1-keeps", type=positive, nargs="*", default=None, help="k1 values for STAR (default: the recipe's)"
    )
    p.add_argument(
        "--pivot-layers",
        type=int,
        nargs="*",
        default=None,
        help="pivot layers for STAR and FastV (default: each method's)",
    )
    p.add_argument(
        "--tokens", type=positive, default=16, help="tokens of the unpruned model's greedy answer compared (default 16)"
    )
    p.add_argument(
        "--flops-budget",
        type=float,
        default=None,
        help="recipe: the most faithful schedule whose decoder FLOPs ratio is at most this (default: the most "
        "faithful)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the eager model runs")
    p.add_argument("--out", required=True, help="output directory (a run there with the same settings is resumed)")
    return p


def _calibrate(args) -> int:
    from ..calibrate import CalibrationError, calibrate, default_cases, main_progress, read_cases, schedule_grid
    from ..models import load_model

    if args.flops_budget is not None and not 0 < args.flops_budget <= 1:
        raise CalibrationError(f"--flops-budget {args.flops_budget}: allowed 0 < budget <= 1 (a ratio of FLOPs)")
    cases = read_cases(args.data) if args.data else default_cases()
    progress = main_progress(args.quiet)
    progress(f"load {args.model}")
    loaded = load_model(args.model)
    schedules = schedule_grid(loaded, args.keep, args.methods, args.stage1_keeps, args.pivot_layers)
    progress(f"{len(schedules)} schedules x {len(cases)} cases, {args.tokens} tokens each")
    recipe = calibrate(
        loaded,
        args.model,
        args.keep,
        args.out,
        cases,
        schedules,
        tokens=args.tokens,
        flops_budget=args.flops_budget,
        device=args.device,
        progress=progress,
    )
    print(
        f"recipe: method {recipe['method']}, stage1_keep {recipe['stage1_keep']}, pivot_layer {recipe['pivot_layer']} "
        f"(KL {recipe['fidelity']['kl']:.4g}, top-1 {recipe['fidelity']['top1']:.3f}, FLOPs ratio "
        f"{recipe['cost']['flops_ratio']:.3f}); table, plot and recipe.json in {args.out}\n"
        f"build it: star-export --model {args.model} --recipe {args.out}/recipe.json --out ENGINE"
    )
    return 0


def calibrate_main(argv=None) -> int:
    return run_command("star-calibrate", calibrate_parser(), _calibrate, argv)
