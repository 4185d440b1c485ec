"""What the four console scripts share: argument types whose message is the problem, the parser with the message
flags, library quieting, and `run_command`, which turns every outcome into an exit code.

Exit codes: 0 success; 1 the engine does not match its reference; 2 a user error (the message names the problem
and the fix); 3 an internal error (a bug: `--debug` shows the traceback); 130 / 143 interrupted (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading

from ..config import CPU_ARENAS, PROVIDERS, THREAD_POOLS, RuntimeOptions
from ..errors import EXIT_INTERNAL, EXIT_USAGE, Terminated, user_error_from
from ..runtime.threads import claim_process

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


def whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def non_negative(text: str) -> int:
    value = whole(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: allowed 0 or more")
    return value


def positive(text: str) -> int:
    value = whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: allowed >= 1")
    return value


def count(text: str) -> int:
    value = whole(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value}: allowed 0 <= value < 2**63")
    return value


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: a finite number is needed")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' except where the help already says what an unset value means."""

    def _get_help_string(self, action):
        return (
            action.help
            if action.default in (None, False) or action.help == argparse.SUPPRESS
            else super()._get_help_string(action)
        )


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("star-export")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=HelpFormatter,
        epilog="exit codes: 0 ok, 1 engine does not match its reference, 2 bad input (the message says the fix), 3 "
        "internal error",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    g = p.add_argument_group("messages")
    g.add_argument("--quiet", action="store_true", help="print only results and errors (no progress, no summary)")
    g.add_argument(
        "--verbose", action="store_true", help="also show the warnings of torch, transformers and ONNX tools"
    )
    g.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return p


def silence_libraries(torch_first: bool = True) -> None:
    """Library warnings and log lines (the ONNX exporter alone prints ~30 per export) stay out of the user's way.
    Runs after parsing (so --help stays fast). torch sets its loggers' levels when imported, so a command that
    needs it imports it first (`torch_first`); star-run and star-serve run a CPU engine without it (a second of
    their load)."""
    import logging
    import warnings

    if torch_first:
        import torch  # noqa: F401

    warnings.simplefilter("ignore")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def terminate(signum, frame):
    raise Terminated()


def run_command(prog: str, parser: argparse.ArgumentParser, run, argv, torch_first: bool = True) -> int:
    """`torch_first`: see silence_libraries."""
    args = parser.parse_args(argv)  # argparse reports its own errors: usage + message, exit 2
    if not args.verbose:
        silence_libraries(torch_first)
    claim_process()  # ONNX Runtime's shared thread pool (runtime/threads.py)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if on_main else None
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


def triton_flags(g, flag: str, help: str) -> None:
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


def write_triton(args, engine_dir, repo) -> None:
    from ..serve.triton_repo import resolve_kind, write_repository

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


def gib(text: str) -> int:
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed a number of GiB > 0")
    return int(value * (1 << 30))


def device_flags(g: argparse.ArgumentParser | argparse._ArgumentGroup, provider: str = "auto", what: str = "") -> None:
    """--provider (default `provider`; `what`: whose provider it is), --allow-fallback, and the session flags."""
    g.add_argument(
        "--provider",
        default=provider,
        choices=PROVIDERS,
        help=f"where the graphs run{what}: ONNX Runtime's cpu / cuda / tensorrt provider, or OpenVINO's CPU plugin "
        "(auto: $STAR_PROVIDER if set; else CUDA when present; else openvino for an int4 / int8 engine on a CPU with "
        "bfloat16 units; else cpu; docs/runtime.md)",
    )
    fallback_flag(g)
    session_flags(g)


def session_flags(g: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
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


def runtime_options(args, **fixed) -> RuntimeOptions:
    """The runtime options a command's flags give."""
    given = {"provider": args.provider, "allow_fallback": args.allow_fallback} | fixed
    return RuntimeOptions(thread_pool=args.thread_pool, cpu_arena=args.cpu_arena, **given)


def fallback_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--allow-fallback",
        action="store_true",
        help="run on the CPU when the asked-for GPU provider / device is not available (default: refuse, exit 2)",
    )


def port(text: str) -> int:
    value = whole(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: allowed 0..65535 (0 picks a free port)")
    return value


def seconds(text: str) -> float:
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value}: allowed > 0")
    return value
