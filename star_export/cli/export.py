"""`star-export`: its flags, and the export, plan or decode-graph addition they ask for."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import METHODS
from ..errors import EXIT_MISMATCH
from .common import (
    BACKENDS,
    DEFAULT_TEXT_TOKENS,
    command_parser,
    gib,
    positive,
    run_command,
    triton_flags,
    write_triton,
)

# ------------------------------------------------------------------ star-export


def export_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "star-export", "Export LLaVA with two-stage STAR visual-token pruning (STAR.md) into an engine directory."
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="recipe alias (tiny-llava, llava-1.5-7b, llava-1.5-13b), a local Hugging Face directory, or a model id in "
        "the local HF cache (default: tiny-llava, or the --recipe's)",
    )
    g = p.add_argument_group("schedule (STAR.md)")
    g.add_argument(
        "--keep",
        type=int,
        default=None,
        help="visual tokens that survive both stages (paper: 288 / 115 / 58 / 29 of 576; default 58, or the "
        "--recipe's)",
    )
    g.add_argument(
        "--stage1-keep",
        type=int,
        default=None,
        help="stage-1 budget k1, keep <= k1 <= 576 (default: the recipe's, 490 for 576 tokens)",
    )
    g.add_argument(
        "--pivot-layer",
        type=int,
        default=None,
        help="decoder layer P that scores and prunes, 0 <= P <= L-2 (default: the recipe's, 15 for 32 layers, else the "
        "middle)",
    )
    g.add_argument(
        "--method",
        default=None,
        choices=list(METHODS),
        help="star: both stages (STAR); fastv: no vision pruning, the last prompt token's attention after decoder "
        "layer 2 (pivot 1); fastervlm: [CLS] attention in the vision tower, nothing in the decoder (stage-1 keep = "
        "--keep). --stage1-keep / --pivot-layer override the method's (default: star, or the --recipe's)",
    )
    g.add_argument(
        "--recipe",
        default=None,
        metavar="RECIPE_JSON",
        help="a star-calibrate recipe.json: its model, keep, stage-1 keep, pivot layer and method (flags given too "
        "must agree with it)",
    )
    g = p.add_argument_group("build")
    g.add_argument("--backend", default="onnx", choices=BACKENDS, help="what to build (tensorrt: not in this release)")
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="weights, activations and KV cache dtype",
    )
    g.add_argument(
        "--weights",
        default="float",
        choices=["float", "int8", "int4"],
        help="decoder weights: float (the --dtype), or weight-only int8 / int4 (ONNX Runtime MatMulNBits; vision stays "
        "float)",
    )
    g.add_argument(
        "--block-size",
        type=positive,
        default=128,
        help="int8 / int4: weights per quantization block along K (power of two >= 16)",
    )
    g.add_argument("--asymmetric", action="store_true", help="int8 / int4: per-block zero points (default symmetric)")
    g.add_argument(
        "--accuracy-level",
        type=int,
        default=None,
        choices=range(5),
        metavar="{0..4}",
        help="int8 / int4: MatMulNBits compute (0: unset, float; 4: int8 where ONNX Runtime's CPU kernels have it, "
        "faster, activations quantized per block) (default: 4)",
    )
    g.add_argument(
        "--memory-budget",
        type=gib,
        default=None,
        metavar="GIB",
        help="memory the build may use, in GiB (default: what the machine has available); a build that needs more is "
        "refused up front",
    )
    g.add_argument(
        "--decode-graphs",
        default="auto",
        choices=["auto", "on", "off"],
        help="also write ONNX Runtime decode graphs (GroupQueryAttention, caches written in place; CPU provider) "
        "beside the portable segment graphs (auto: for --weights int8 / int4; on: any float32 engine)",
    )
    g.add_argument("--max-batch-size", type=positive, default=8, help="most requests per call")
    g.add_argument(
        "--max-input-len", type=positive, default=2048, help="most prompt tokens per request, image tokens included"
    )
    g.add_argument("--max-new-tokens", type=positive, default=256, help="most generated tokens per request")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="engine directory to write (required unless --dry-run)")
    g.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it holds an engine (a star.json); other directories are never deleted",
    )
    g.add_argument("--no-validate", action="store_true", help="skip the parity self-check against the eager reference")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (tokens per stage, FLOPs, KV bytes) without weights; writes nothing",
    )
    g.add_argument("--text-tokens", type=positive, default=DEFAULT_TEXT_TOKENS, help="text tokens assumed by --dry-run")
    g.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    g.add_argument(
        "--add-decode-graphs",
        default=None,
        metavar="ENGINE",
        help="write ONNX Runtime decode graphs into ENGINE, an engine exported without them, re-sign its star.json, "
        "and exit (minutes: they share the segments' weight files; check the result with star-validate)",
    )
    triton_flags(
        p.add_argument_group("Triton Inference Server"),
        "--triton-repo",
        "also write a Triton model repository for the engine (README: Serving)",
    )
    return p


def _scheme(args):
    from ..config import SchemeError, WeightScheme

    if args.weights == "float" and (args.block_size != 128 or args.asymmetric or args.accuracy_level is not None):
        raise SchemeError("--block-size / --asymmetric / --accuracy-level apply to --weights int8 / int4 only")
    level = {} if args.accuracy_level is None else {"accuracy_level": args.accuracy_level}
    return WeightScheme(args.weights, block_size=args.block_size, symmetric=not args.asymmetric, **level)


DEFAULTS = {"model": "tiny-llava", "keep": 58, "method": "star"}  # what --model / --keep / --method default to


def _schedule_args(args) -> None:
    """Fill --model, --keep, --stage1-keep, --pivot-layer, --method from --recipe (a flag given as well must agree) or
    from their defaults."""
    recipe = {}
    if args.recipe:
        from ..calibrate import CalibrationError, read_recipe

        recipe = read_recipe(args.recipe)
        for field in ("model", "keep", "stage1_keep", "pivot_layer", "method"):
            given = getattr(args, field)
            if given is not None and given != recipe[field]:
                flag = "--" + field.replace("_", "-")
                raise CalibrationError(
                    f"{flag} {given} disagrees with --recipe {args.recipe} ({recipe[field]}): drop one of the two"
                )
    for field in ("model", "keep", "stage1_keep", "pivot_layer", "method"):
        if getattr(args, field) is None:
            setattr(args, field, recipe.get(field, DEFAULTS.get(field)))


def _export(args) -> int:
    if args.add_decode_graphs:
        return _add_decode_graphs(args)
    _schedule_args(args)
    if args.dry_run:
        from ..export.write import wants_decode_graphs
        from ..flops import dry_run, format_plan
        from ..memory import format_memory, memory_plan

        plan, spec, schedule = dry_run(
            model=args.model,
            keep=args.keep,
            stage1_keep=args.stage1_keep,
            pivot_layer=args.pivot_layer,
            method=args.method,
            text_tokens=args.text_tokens,
            full=True,
        )
        scheme = _scheme(args)
        memory = memory_plan(
            spec,
            schedule,
            args.dtype,
            scheme,
            wants_decode_graphs(args.decode_graphs, args.dtype, scheme, args.backend),
        )
        if args.json:
            print(json.dumps(plan.asdict() | {"memory": memory.asdict()}, indent=2))
        else:
            print(format_plan(plan, args.model) + "\n" + format_memory(memory))
        return 0
    from ..build import ValidationFailed, export_engine
    from ..export.workdir import OutDirError

    if not args.out:
        raise OutDirError("--out is required (the engine directory to write), or pass --dry-run")
    if args.triton_repo:
        from ..serve.triton_repo import check_target

        check_target(args.triton_repo, args.triton_model_name, "cpu", args.force)  # before the long export
    try:
        manifest = export_engine(
            model=args.model,
            keep=args.keep,
            out=args.out,
            stage1_keep=args.stage1_keep,
            pivot_layer=args.pivot_layer,
            method=args.method,
            dtype=args.dtype,
            backend=args.backend,
            max_batch_size=args.max_batch_size,
            max_input_len=args.max_input_len,
            max_new_tokens=args.max_new_tokens,
            force=args.force,
            validate=not args.no_validate,
            weights=_scheme(args),
            memory_budget=args.memory_budget,
            decode_graphs=args.decode_graphs,
            show_progress=not args.quiet,
            verbose=args.verbose,
        )
    except ValidationFailed as e:
        print(f"star-export: error: {e}\nnothing was written to {args.out}", file=sys.stderr)
        return EXIT_MISMATCH
    if args.triton_repo:
        write_triton(args, args.out, args.triton_repo)
    summary = {k: manifest[k] for k in ("schedule", "dtype", "weights", "backend", "timings_s")} | {
        "out": str(args.out),
        "files": sorted(manifest["files"]),
    }
    print(json.dumps(summary, indent=2) if args.json else f"engine written to {args.out}")
    return 0


def _add_decode_graphs(args) -> int:
    from ..export.write import Progress, add_decode_graphs

    written = add_decode_graphs(args.add_decode_graphs, Progress(1, enabled=not args.quiet))
    print(
        f"decode graphs written into {args.add_decode_graphs}: {', '.join(written)}"
        if written
        else f"{args.add_decode_graphs}: no decode graphs written (it has them already, or see the warning above)"
    )
    return 0


def export_main(argv=None) -> int:
    return run_command("star-export", export_parser(), _export, argv)
