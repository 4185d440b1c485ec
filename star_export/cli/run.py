"""`star-run` and `star-validate`: an engine generating, and an engine judged against its reference."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import EXIT_MISMATCH
from .common import (
    command_parser,
    count,
    device_flags,
    finite,
    positive,
    run_command,
    runtime_options,
)

# ------------------------------------------------------------------ star-run


def run_parser() -> argparse.ArgumentParser:
    p = command_parser("star-run", "Generate text with an engine directory.")
    p.add_argument("engine", help="engine directory written by star-export")
    g = p.add_argument_group("requests (several --image/--prompt pairs run as one batch)")
    g.add_argument("--image", action="append", default=None, required=True, help="image file, once per request")
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        required=True,
        help="question, once per request (wrapped as 'USER: <image>\\n{prompt} ASSISTANT:')",
    )
    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens",
        type=positive,
        default=None,
        help="most tokens to generate (default: 64, or the engine's limit if lower)",
    )
    g.add_argument("--temperature", type=finite, default=0.0, help="0 is greedy")
    g.add_argument(
        "--top-p", type=finite, default=1.0, help="nucleus sampling mass, 0 < top-p <= 1 (with --temperature > 0)"
    )
    g.add_argument("--seed", type=count, default=0, help="sampling seed")
    g = p.add_argument_group("output")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated (one request)")
    g.add_argument(
        "--json",
        action="store_true",
        help='print {"text", "token_ids", "stage1_indices", "stage2_indices", "timings"} (a list for several requests)',
    )
    g = p.add_argument_group("device")
    device_flags(g)
    g.add_argument(
        "--no-decode-graphs",
        action="store_true",
        help="decode with the segment graphs even where the engine has ONNX Runtime decode graphs",
    )
    g.add_argument(
        "--no-prefill-graphs",
        action="store_true",
        help="prefill with the segment graphs even where the engine has ONNX Runtime prefill graphs (fused attention)",
    )
    return p


def _summary(results: list[dict], info: dict) -> str:
    t = results[0]["timings"]
    steps = max(1, t.get("decode_steps", 0))
    tokens = sum(len(r["token_ids"]) for r in results)
    total = t["vision_s"] + t["prefill_s"] + t.get("decode_s", 0.0)
    line = (
        f"visual tokens {info['visual_tokens']} -> {info['stage1_keep']} -> {info['keep']} | vision "
        f"{t['vision_s'] * 1e3:.0f} ms, "
        f"prefill {t['prefill_s'] * 1e3:.0f} ms, decode {t.get('decode_s', 0.0) / steps * 1e3:.1f} ms/token | "
        f"{tokens} tokens in {total:.2f} s ({tokens / total:.1f} tokens/s) | {t['provider']}"
        + "".join(f" ({kind} graphs)" for kind in ("decode", "prefill") if t.get(f"{kind}_graphs"))
    )
    if info.get("random_weights"):
        line += f"\nnote: {info['model']} has random weights (a test model): its text is meaningless"
    return line


def _run(args) -> int:
    from ..runtime.engine import run_engine
    from ..runtime.generate import InputError

    if args.stream and len(args.prompt) > 1:
        raise InputError(
            "--stream prints one request as it is generated: give one --image/--prompt pair, or drop --stream"
        )
    stream = (lambda piece: print(piece, end="", flush=True)) if args.stream and not args.json else None
    info: dict = {}
    results = run_engine(
        args.engine,
        images=args.image,
        prompts=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        options=runtime_options(
            args, decode_graphs=not args.no_decode_graphs, prefill_graphs=not args.no_prefill_graphs
        ),
        stream=stream,
        info=info,
    )
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    elif stream:
        print()
    else:
        for r in results:
            print(r["text"])
    if not args.quiet:
        print(_summary(results, info), file=sys.stderr)
    return 0


def run_main(argv=None) -> int:
    return run_command("star-run", run_parser(), _run, argv, torch_first=False)


# ------------------------------------------------------------------ star-validate


def validate_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "star-validate",
        "Check an engine against the eager PyTorch reference (float64 truth, error budgets): per graph and end to end.",
    )
    p.add_argument("engine", help="engine directory written by star-export")
    p.add_argument("--model", default=None, help="source model for the reference (default: the one in star.json)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the eager reference runs")
    device_flags(p, "auto", " for the engine (the default validates what star-run runs)")
    p.add_argument("--image", action="append", default=None, help="extra case image (with --prompt)")
    p.add_argument("--prompt", action="append", default=None, help="extra case question (with --image)")
    p.add_argument("--max-new-tokens", type=positive, default=16, help="greedy tokens compared per case")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _validate(args) -> int:
    from ..runtime.generate import InputError
    from ..runtime.images import rule_from_engine_dir
    from ..runtime.inputs import load_image
    from ..validate import validate_engine

    args.image, args.prompt = args.image or [], args.prompt or []
    if len(args.image) != len(args.prompt):
        raise InputError(f"{len(args.image)} --image but {len(args.prompt)} --prompt: give them in pairs")
    report = validate_engine(
        args.engine,
        model=args.model,
        device=args.device,
        images=[load_image(i, rule_from_engine_dir(args.engine)) for i in args.image],
        prompts=args.prompt,
        max_new_tokens=args.max_new_tokens,
        provider=args.provider,
        allow_fallback=args.allow_fallback,
        options=runtime_options(args),
    )
    print(json.dumps(report.asdict(), indent=2) if args.json else report.table())
    return 0 if report.ok else EXIT_MISMATCH


def validate_main(argv=None) -> int:
    return run_command("star-validate", validate_parser(), _validate, argv)
