"""Console scripts: `star-export`, `star-run`, `star-validate`. Each calls one library function with
the same keyword names. Exit codes: 0 success, 1 a parity check failed, 2 bad input (message says the fix)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

DEFAULT_TEXT_TOKENS = 52  # text tokens of a typical single-question prompt; the plan's --text-tokens default


def _usage_errors() -> tuple[type[BaseException], ...]:
    from .config import ScheduleError
    from .export.backends import BackendError
    from .export.build import OutDirError
    from .manifest import EngineError
    from .models import ModelLoadError
    from .runtime.generate import InputError
    from .runtime.sessions import ProviderError

    return (ScheduleError, ModelLoadError, EngineError, InputError, BackendError, OutDirError, ProviderError)


def _main(fn, argv) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; our own stages report progress
    try:
        return fn(argv)
    except _usage_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' except where the help already says what an unset value means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: allowed >= 1")
    return value


# ------------------------------------------------------------------ star-export


def export_parser() -> argparse.ArgumentParser:
    from .export.backends import BACKENDS

    p = argparse.ArgumentParser(
        prog="star-export",
        description="Export LLaVA with two-stage STAR visual-token pruning into an engine directory.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny-llava", help="recipe alias (tiny-llava, llava-1.5-7b, llava-1.5-13b), a local Hugging Face directory, or a model id in the local HF cache")
    g = p.add_argument_group("schedule (STAR.md)")
    g.add_argument("--keep", type=int, default=58, help="visual tokens that survive both stages (paper: 288 / 115 / 58 / 29 of 576)")
    g.add_argument("--stage1-keep", type=int, default=None, help="stage-1 budget k1, keep <= k1 <= 576 (default: the recipe's, 490 for 576 tokens)")
    g.add_argument("--pivot-layer", type=int, default=None, help="decoder layer P that scores and prunes, 0 <= P <= L-2 (default: the recipe's, 15 for 32 layers, else the middle)")
    g = p.add_argument_group("build")
    g.add_argument("--backend", default="onnx", choices=sorted(BACKENDS), help="what to build (tensorrt: not in this release)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights, activations and KV cache dtype")
    g.add_argument("--max-batch-size", type=_positive, default=8, help="most requests per call")
    g.add_argument("--max-input-len", type=_positive, default=2048, help="most prompt tokens per request, image tokens included")
    g.add_argument("--max-new-tokens", type=_positive, default=256, help="most generated tokens per request")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="engine directory to write (required unless --dry-run)")
    g.add_argument("--force", action="store_true", help="replace a non-empty --out")
    g.add_argument("--no-validate", action="store_true", help="skip the parity self-check against the eager reference")
    g.add_argument("--dry-run", action="store_true", help="print the plan (tokens per stage, FLOPs, KV bytes) without weights; writes nothing")
    g.add_argument("--text-tokens", type=_positive, default=DEFAULT_TEXT_TOKENS, help="text tokens assumed by --dry-run")
    g.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return p


def _export(argv) -> int:
    args = export_parser().parse_args(argv)
    if args.dry_run:
        from .flops import dry_run, format_plan

        plan = dry_run(model=args.model, keep=args.keep, stage1_keep=args.stage1_keep, pivot_layer=args.pivot_layer, text_tokens=args.text_tokens)
        print(json.dumps(plan.asdict(), indent=2) if args.json else format_plan(plan, args.model))
        return 0
    if not args.out:
        from .export.build import OutDirError

        raise OutDirError("--out is required (the engine directory to write), or pass --dry-run")
    from .export.build import ValidationFailed, export_engine

    try:
        manifest = export_engine(
            model=args.model,
            keep=args.keep,
            out=args.out,
            stage1_keep=args.stage1_keep,
            pivot_layer=args.pivot_layer,
            dtype=args.dtype,
            backend=args.backend,
            max_batch_size=args.max_batch_size,
            max_input_len=args.max_input_len,
            max_new_tokens=args.max_new_tokens,
            force=args.force,
            validate=not args.no_validate,
            show_progress=True,
        )
    except ValidationFailed as e:
        print(f"error: {e}\nnothing was written to {args.out}", file=sys.stderr)
        return 1
    summary = {k: manifest[k] for k in ("schedule", "dtype", "backend", "timings_s")} | {"out": str(args.out), "files": sorted(manifest["files"])}
    print(json.dumps(summary, indent=2) if args.json else f"engine written to {args.out}")
    return 0


def export_main(argv=None) -> int:
    return _main(_export, argv)


# ------------------------------------------------------------------ star-run


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-run", description="Generate text with an engine directory.", formatter_class=_HelpFormatter)
    p.add_argument("engine", help="engine directory written by star-export")
    g = p.add_argument_group("requests (several --image/--prompt pairs run as one batch)")
    g.add_argument("--image", action="append", default=None, required=True, help="image file, once per request")
    g.add_argument("--prompt", action="append", default=None, required=True, help="question, once per request (wrapped as 'USER: <image>\\n{prompt} ASSISTANT:')")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=_positive, default=None, help="most tokens to generate (default: 64, or the engine's limit if lower)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g = p.add_argument_group("output")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated (one request)")
    g.add_argument("--json", action="store_true", help='print {"text", "token_ids", "stage1_indices", "stage2_indices", "timings"} (a list for several requests)')
    g.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"], help="ONNX Runtime execution provider")
    return p


def _run(argv) -> int:
    from .runtime.engine import run_engine
    from .runtime.generate import InputError

    args = run_parser().parse_args(argv)
    if args.stream and len(args.prompt) > 1:
        raise InputError("--stream prints one request as it is generated: give one --image/--prompt pair, or drop --stream")
    stream = (lambda piece: print(piece, end="", flush=True)) if args.stream and not args.json else None
    results = run_engine(
        args.engine,
        images=args.image,
        prompts=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        provider=args.provider,
        stream=stream,
    )
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    elif stream:
        print()
    else:
        for r in results:
            print(r["text"])
    return 0


def run_main(argv=None) -> int:
    return _main(_run, argv)


# ------------------------------------------------------------------ star-validate


def validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="star-validate",
        description="Check an engine against the eager PyTorch reference: per graph and end to end. Exit 0 pass, 1 fail.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("engine", help="engine directory written by star-export")
    p.add_argument("--model", default=None, help="source model for the reference (default: the one in star.json)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the eager reference runs")
    p.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda", "tensorrt"], help="ONNX Runtime execution provider for the engine")
    p.add_argument("--image", action="append", default=None, help="extra case image (with --prompt)")
    p.add_argument("--prompt", action="append", default=None, help="extra case question (with --image)")
    p.add_argument("--max-new-tokens", type=_positive, default=16, help="greedy tokens compared per case")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _validate(argv) -> int:
    from .runtime.generate import InputError
    from .runtime.inputs import load_image
    from .validate import validate_engine

    args = validate_parser().parse_args(argv)
    args.image, args.prompt = args.image or [], args.prompt or []
    if len(args.image) != len(args.prompt):
        raise InputError(f"{len(args.image)} --image but {len(args.prompt)} --prompt: give them in pairs")
    report = validate_engine(
        args.engine,
        model=args.model,
        device=args.device,
        images=[load_image(i) for i in args.image],
        prompts=args.prompt,
        max_new_tokens=args.max_new_tokens,
        provider=args.provider,
    )
    print(json.dumps(report.asdict(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1


def validate_main(argv=None) -> int:
    return _main(_validate, argv)
