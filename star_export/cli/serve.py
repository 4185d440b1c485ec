"""`star-serve`: its flags, and the server (or the Triton repository) they ask for."""

from __future__ import annotations

import argparse
import os

from ..errors import require_extra
from .common import (
    command_parser,
    device_flags,
    port,
    non_negative,
    positive,
    run_command,
    runtime_options,
    seconds,
    triton_flags,
    write_triton,
)

# ------------------------------------------------------------------ star-serve


def serve_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "star-serve", "Serve an engine directory over the OpenAI chat-completions API, with continuous batching."
    )
    p.add_argument("engine", help="engine directory written by star-export")
    g = p.add_argument_group("network")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; set an API key then)"
    )
    g.add_argument("--port", type=port, default=8000, help="TCP port (0: a free one, printed at start)")
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
        type=positive,
        default=64,
        help="requests waiting for a batch slot; more get 429 with Retry-After",
    )
    g.add_argument(
        "--prefill-batch-tokens",
        type=non_negative,
        default=None,
        metavar="N",
        help="requests admitted together are prefilled as one batch of at most N decoder tokens (rows x the longest "
        "prompt, after stage 1); 0: each alone (default: 4096 on a GPU provider, 0 on the CPU, where batching adds no "
        "throughput)",
    )
    g.add_argument(
        "--request-timeout", type=seconds, default=300.0, help="seconds from arrival to the last token; later is 408"
    )
    g.add_argument(
        "--max-image-bytes",
        type=positive,
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
        type=positive,
        default=None,
        metavar="MIB",
        help="memory that large request bodies and images being decoded "
        "may hold together, in MiB (a 64-megapixel RGB photo takes 256; a rotated, CMYK or transparent one twice that; "
        "an image that needs more is refused; default: 320 or half the server's memory once the engine is loaded, "
        "whichever is larger)",
    )
    g.add_argument(
        "--max-connections",
        type=positive,
        default=None,
        help="open connections; more are answered 429 (default: what the file-descriptor limit allows)",
    )
    g.add_argument(
        "--header-timeout", type=seconds, default=10.0, help="seconds a connection has to send its request headers"
    )
    g.add_argument("--body-timeout", type=seconds, default=60.0, help="seconds a request has to send its whole body")
    device_flags(p.add_argument_group("device"))
    g = p.add_argument_group("Triton Inference Server")
    triton_flags(g, "--write-triton-repo", "write a Triton model repository for ENGINE and exit (no server starts)")
    g.add_argument("--force", action="store_true", help="with --write-triton-repo: replace models of the same names")
    return p


def _serve(args) -> int:
    from ..serve import serve

    if args.write_triton_repo:
        from ..serve.triton_repo import check_target

        check_target(args.write_triton_repo, args.triton_model_name, "cpu", args.force)
        write_triton(args, args.engine, args.write_triton_repo)
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
            "prefill_batch_tokens": args.prefill_batch_tokens,
            "request_timeout": args.request_timeout,
            "max_image_bytes": args.max_image_bytes,
            "allow_remote_images": args.allow_remote_images,
            "max_image_memory": args.max_image_memory and args.max_image_memory << 20,
            "max_connections": args.max_connections,
            "header_timeout": args.header_timeout,
            "body_timeout": args.body_timeout,
        },
        options=runtime_options(args),
        quiet=args.quiet,
        verbose=args.verbose,
    )
    return 0


def serve_main(argv=None) -> int:
    return run_command("star-serve", serve_parser(), _serve, argv, torch_first=False)
