"""Console scripts: `star-export`, `star-run`, `star-validate`, `star-serve`. Each parses its arguments with nothing
heavy
imported (so `--help` answers at once), then calls one library function with the same keyword names.

Exit codes: 0 success; 1 the engine does not match its reference; 2 a user error (the message names the problem
and the fix); 3 an internal error (a bug: `--debug` shows the traceback); 130 / 143 interrupted (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading

from .config import CPU_ARENAS, PROVIDERS, THREAD_POOLS, RuntimeOptions
from .errors import EXIT_INTERNAL, EXIT_MISMATCH, EXIT_USAGE, Terminated, require_extra, user_error_from
from .runtime.threads import claim_process

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

DEFAULT_TEXT_TOKENS = 52  # text tokens of a typical single-question prompt; the plan's --text-tokens default
BACKENDS = ("onnx", "tensorrt")  # export/backends.py holds the registry; its names here keep --help free of torch
LIBRARY_LOGGERS = (
    "torch",
    "transformers",
    "onnxscript",
    "onnx_ir",
    "onnxruntime",
    "polygraphy",
    "huggingface_hub",
    "urllib3",
)


# ------------------------------------------------------------------ argument types: the message is the problem


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: allowed >= 1")
    return value


def _count(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value}: allowed 0 <= value < 2**63")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: a finite number is needed")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' except where the help already says what an unset value means."""

    def _get_help_string(self, action):
        return (
            action.help
            if action.default in (None, False) or action.help == argparse.SUPPRESS
            else super()._get_help_string(action)
        )


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("star-export")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=_HelpFormatter,
        epilog="exit codes: 0 ok, 1 engine does not match its reference, 2 bad input (the message says the fix), 3 "
        "internal error",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    g = p.add_argument_group("messages")
    g.add_argument("--quiet", action="store_true", help="print only results and errors (no progress, no summary)")
    g.add_argument(
        "--verbose", action="store_true", help="also show the warnings of torch, transformers and ONNX tools"
    )
    g.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return p


def _silence_libraries() -> None:
    """Library warnings and log lines (the ONNX exporter alone prints ~30 per export) stay out of the user's way.
    Runs after parsing (so --help stays fast); every command needs torch, which sets its loggers' levels when
    imported, so it is imported first."""
    import logging
    import warnings

    import torch  # noqa: F401

    warnings.simplefilter("ignore")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _terminate(signum, frame):
    raise Terminated()


def _main(prog: str, parser: argparse.ArgumentParser, run, argv) -> int:
    args = parser.parse_args(argv)  # argparse reports its own errors: usage + message, exit 2
    if not args.verbose:
        _silence_libraries()
    claim_process()  # ONNX Runtime's shared thread pool (runtime/threads.py)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if on_main else None
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated; nothing half-written was left", file=sys.stderr)
        return 143
    except Exception as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        user = user_error_from(e)
        if user is not None:
            print(f"{prog}: error: {user}", file=sys.stderr)
            return EXIT_USAGE
        print(
            f"{prog}: internal error: {type(e).__name__}: {str(e)[:500]}\n"
            f"this is a bug in star-export; re-run with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------ star-export


def export_parser() -> argparse.ArgumentParser:
    p = _parser(
        "star-export", "Export LLaVA with two-stage STAR visual-token pruning (STAR.md) into an engine directory."
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="tiny-llava",
        help="recipe alias (tiny-llava, llava-1.5-7b, llava-1.5-13b), a local Hugging Face directory, or a model id in "
        "the local HF cache",
    )
    g = p.add_argument_group("schedule (STAR.md)")
    g.add_argument(
        "--keep",
        type=int,
        default=58,
        help="visual tokens that survive both stages (paper: 288 / 115 / 58 / 29 of 576)",
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
        type=_positive,
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
        type=_gib,
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
    g.add_argument("--max-batch-size", type=_positive, default=8, help="most requests per call")
    g.add_argument(
        "--max-input-len", type=_positive, default=2048, help="most prompt tokens per request, image tokens included"
    )
    g.add_argument("--max-new-tokens", type=_positive, default=256, help="most generated tokens per request")
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
    g.add_argument(
        "--text-tokens", type=_positive, default=DEFAULT_TEXT_TOKENS, help="text tokens assumed by --dry-run"
    )
    g.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    g.add_argument(
        "--add-decode-graphs",
        default=None,
        metavar="ENGINE",
        help="write ONNX Runtime decode graphs into ENGINE, an engine exported without them, re-sign its star.json, "
        "and exit (minutes: they share the segments' weight files; check the result with star-validate)",
    )
    _triton_flags(
        p.add_argument_group("Triton Inference Server"),
        "--triton-repo",
        "also write a Triton model repository for the engine (README: Serving)",
    )
    return p


def _triton_flags(g, flag: str, help: str) -> None:
    g.add_argument(flag, default=None, metavar="REPO", help=help)
    g.add_argument(
        "--triton-model-name", default="star_llava", help="Triton model name (the streaming model is NAME_stream)"
    )
    g.add_argument(
        "--triton-kind",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="instance group kind (auto: gpu when onnxruntime has CUDA)",
    )
    g.add_argument(
        "--triton-copy-engine",
        action="store_true",
        help="copy the engine into the repository (default: reference it by absolute path)",
    )


def _write_triton(args, engine_dir, repo) -> None:
    from .serve.triton_repo import resolve_kind, write_repository

    models = write_repository(
        engine_dir,
        repo,
        model_name=args.triton_model_name,
        kind=resolve_kind(args.triton_kind),
        copy_engine=args.triton_copy_engine,
        force=args.force,
    )
    if not args.quiet:
        print(
            f"Triton model repository written to {repo} (models: {', '.join(m.name for m in models)})", file=sys.stderr
        )


def _gib(text: str) -> int:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed a number of GiB > 0")
    return int(value * (1 << 30))


def _scheme(args):
    from .config import SchemeError, WeightScheme

    if args.weights == "float" and (args.block_size != 128 or args.asymmetric or args.accuracy_level is not None):
        raise SchemeError("--block-size / --asymmetric / --accuracy-level apply to --weights int8 / int4 only")
    level = {} if args.accuracy_level is None else {"accuracy_level": args.accuracy_level}
    return WeightScheme(args.weights, block_size=args.block_size, symmetric=not args.asymmetric, **level)


def _export(args) -> int:
    if args.add_decode_graphs:
        return _add_decode_graphs(args)
    if args.dry_run:
        from .export.write import wants_decode_graphs
        from .flops import dry_run, format_plan
        from .memory import format_memory, memory_plan

        plan, spec, schedule = dry_run(
            model=args.model,
            keep=args.keep,
            stage1_keep=args.stage1_keep,
            pivot_layer=args.pivot_layer,
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
    from .build import ValidationFailed, export_engine
    from .export.workdir import OutDirError

    if not args.out:
        raise OutDirError("--out is required (the engine directory to write), or pass --dry-run")
    if args.triton_repo:
        from .serve.triton_repo import check_target

        check_target(args.triton_repo, args.triton_model_name, "cpu", args.force)  # before the long export
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
        _write_triton(args, args.out, args.triton_repo)
    summary = {k: manifest[k] for k in ("schedule", "dtype", "weights", "backend", "timings_s")} | {
        "out": str(args.out),
        "files": sorted(manifest["files"]),
    }
    print(json.dumps(summary, indent=2) if args.json else f"engine written to {args.out}")
    return 0


def _add_decode_graphs(args) -> int:
    from .export.write import Progress, add_decode_graphs

    written = add_decode_graphs(args.add_decode_graphs, Progress(1, enabled=not args.quiet))
    print(
        f"decode graphs written into {args.add_decode_graphs}: {', '.join(written)}"
        if written
        else f"{args.add_decode_graphs}: no decode graphs written (it has them already, or see the warning above)"
    )
    return 0


def export_main(argv=None) -> int:
    return _main("star-export", export_parser(), _export, argv)


# ------------------------------------------------------------------ star-run


def _session_flags(g: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--thread-pool",
        default=None,
        choices=THREAD_POOLS,
        help="ONNX Runtime CPU threads: one pool shared by every session (spinning), or a pool per session "
        "(default: $STAR_ORT_THREAD_POOL, else shared; docs/runtime.md)",
    )
    g.add_argument(
        "--cpu-arena",
        default=None,
        choices=CPU_ARENAS,
        help="where sessions take CPU memory from: one arena for the process, one per session, or none "
        "(default: $STAR_ORT_CPU_ARENA, else shared; docs/runtime.md)",
    )


def _options(args, **fixed) -> RuntimeOptions:
    """The runtime options a command's flags give."""
    given = {"provider": args.provider, "allow_fallback": args.allow_fallback} | fixed
    return RuntimeOptions(thread_pool=args.thread_pool, cpu_arena=args.cpu_arena, **given)


def _fallback_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--allow-fallback",
        action="store_true",
        help="run on the CPU when the asked-for GPU provider / device is not available (default: refuse, exit 2)",
    )


def run_parser() -> argparse.ArgumentParser:
    p = _parser("star-run", "Generate text with an engine directory.")
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
        type=_positive,
        default=None,
        help="most tokens to generate (default: 64, or the engine's limit if lower)",
    )
    g.add_argument("--temperature", type=_finite, default=0.0, help="0 is greedy")
    g.add_argument(
        "--top-p", type=_finite, default=1.0, help="nucleus sampling mass, 0 < top-p <= 1 (with --temperature > 0)"
    )
    g.add_argument("--seed", type=_count, default=0, help="sampling seed")
    g = p.add_argument_group("output")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated (one request)")
    g.add_argument(
        "--json",
        action="store_true",
        help='print {"text", "token_ids", "stage1_indices", "stage2_indices", "timings"} (a list for several requests)',
    )
    g = p.add_argument_group("device")
    g.add_argument(
        "--provider",
        default="auto",
        choices=PROVIDERS,
        help="ONNX Runtime execution provider (auto: CUDA when present, else CPU)",
    )
    g.add_argument(
        "--no-decode-graphs",
        action="store_true",
        help="decode with the segment graphs even where the engine has ONNX Runtime decode graphs",
    )
    _fallback_flag(g)
    _session_flags(g)
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
        + (" (decode graphs)" if t.get("decode_graphs") else "")
    )
    if info.get("random_weights"):
        line += f"\nnote: {info['model']} has random weights (a test model): its text is meaningless"
    return line


def _run(args) -> int:
    from .runtime.engine import run_engine
    from .runtime.generate import InputError

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
        options=_options(args, decode_graphs=not args.no_decode_graphs),
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
    return _main("star-run", run_parser(), _run, argv)


# ------------------------------------------------------------------ star-validate


def validate_parser() -> argparse.ArgumentParser:
    p = _parser(
        "star-validate",
        "Check an engine against the eager PyTorch reference (float64 truth, error budgets): per graph and end to end.",
    )
    p.add_argument("engine", help="engine directory written by star-export")
    p.add_argument("--model", default=None, help="source model for the reference (default: the one in star.json)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the eager reference runs")
    p.add_argument(
        "--provider", default="cpu", choices=PROVIDERS, help="ONNX Runtime execution provider for the engine"
    )
    _fallback_flag(p)
    _session_flags(p)
    p.add_argument("--image", action="append", default=None, help="extra case image (with --prompt)")
    p.add_argument("--prompt", action="append", default=None, help="extra case question (with --image)")
    p.add_argument("--max-new-tokens", type=_positive, default=16, help="greedy tokens compared per case")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _validate(args) -> int:
    from .runtime.generate import InputError
    from .runtime.images import rule_from_engine_dir
    from .runtime.inputs import load_image
    from .validate import validate_engine

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
        options=_options(args),
    )
    print(json.dumps(report.asdict(), indent=2) if args.json else report.table())
    return 0 if report.ok else EXIT_MISMATCH


def validate_main(argv=None) -> int:
    return _main("star-validate", validate_parser(), _validate, argv)


# ------------------------------------------------------------------ star-serve


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: allowed 0..65535 (0 picks a free port)")
    return value


def _seconds(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value}: allowed > 0")
    return value


def serve_parser() -> argparse.ArgumentParser:
    p = _parser(
        "star-serve", "Serve an engine directory over the OpenAI chat-completions API, with continuous batching."
    )
    p.add_argument("engine", help="engine directory written by star-export")
    g = p.add_argument_group("network")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; set an API key then)"
    )
    g.add_argument("--port", type=_port, default=8000, help="TCP port (0: a free one, printed at start)")
    g.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (default: $STAR_API_KEY; unset: no key)",
    )
    g.add_argument(
        "--model-name", default=None, help="the name clients send as `model` (default: the engine's source model)"
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-queue",
        type=_positive,
        default=64,
        help="requests waiting for a batch slot; more get 429 with Retry-After",
    )
    g.add_argument(
        "--request-timeout", type=_seconds, default=300.0, help="seconds from arrival to the last token; later is 408"
    )
    g.add_argument(
        "--max-image-bytes",
        type=_positive,
        default=20 << 20,
        help="largest image accepted, in bytes (the body limit follows)",
    )
    g.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (default: only inline data: URLs; files are never read)",
    )
    g.add_argument(
        "--max-image-memory",
        type=_positive,
        default=None,
        metavar="MIB",
        help="memory that large request bodies and images being decoded "
        "may hold together, in MiB (a 64-megapixel RGB photo takes 256; a rotated, CMYK or transparent one twice that; "
        "an image that needs more is refused; default: 320 or half the server's memory once the engine is loaded, "
        "whichever is larger)",
    )
    g.add_argument(
        "--max-connections",
        type=_positive,
        default=None,
        help="open connections; more are answered 429 (default: what the file-descriptor limit allows)",
    )
    g.add_argument(
        "--header-timeout", type=_seconds, default=10.0, help="seconds a connection has to send its request headers"
    )
    g.add_argument("--body-timeout", type=_seconds, default=60.0, help="seconds a request has to send its whole body")
    g = p.add_argument_group("device")
    g.add_argument(
        "--provider",
        default="auto",
        choices=PROVIDERS,
        help="ONNX Runtime execution provider (auto: CUDA when present, else CPU)",
    )
    _fallback_flag(g)
    _session_flags(g)
    g = p.add_argument_group("Triton Inference Server")
    _triton_flags(g, "--write-triton-repo", "write a Triton model repository for ENGINE and exit (no server starts)")
    g.add_argument("--force", action="store_true", help="with --write-triton-repo: replace models of the same names")
    return p


def _serve(args) -> int:
    from .serve import serve

    if args.write_triton_repo:
        from .serve.triton_repo import check_target

        check_target(args.write_triton_repo, args.triton_model_name, "cpu", args.force)
        _write_triton(args, args.engine, args.write_triton_repo)
        return 0

    require_extra("serve", "star-serve")  # before the engine loads
    api_key = args.api_key if args.api_key is not None else os.environ.get("STAR_API_KEY") or None
    serve(
        args.engine,
        host=args.host,
        port=args.port,
        settings_kwargs={
            "model_name": args.model_name,
            "api_key": api_key,
            "max_queue": args.max_queue,
            "request_timeout": args.request_timeout,
            "max_image_bytes": args.max_image_bytes,
            "allow_remote_images": args.allow_remote_images,
            "max_image_memory": args.max_image_memory and args.max_image_memory << 20,
            "max_connections": args.max_connections,
            "header_timeout": args.header_timeout,
            "body_timeout": args.body_timeout,
        },
        options=_options(args),
        quiet=args.quiet,
        verbose=args.verbose,
    )
    return 0


def serve_main(argv=None) -> int:
    return _main("star-serve", serve_parser(), _serve, argv)
