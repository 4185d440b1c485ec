"""star-serve: an OpenAI-compatible server with continuous batching over an engine directory."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from ..config import RuntimeOptions
from ..errors import UserError


def default_model_name(manifest) -> str:
    """The name clients send as `model` (`manifest`: the engine's `EngineManifest`): the source model's, a local
    directory by its last component."""
    name = str(manifest.source_name or "star-engine")
    return Path(name).name if os.path.isabs(name) else name


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts: a busy port is a clear error, port 0 picks a free one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(
            f"--host {host!r} is not an address this machine can bind ({e.strerror}): use 127.0.0.1, 0.0.0.0 or an "
            "interface's address"
        ) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}): choose another --port (0 picks a free one)"
        ) from None
    sock.listen(2048)
    return sock


def server_config(app, max_connections: int, *, verbose: bool = False):
    """The uvicorn configuration star-serve runs `app` (from app.create_app) with: h11 guarded by the app's header
    timeout and `max_connections` (serve/connections.py), refusals counted in the app's metrics."""
    import uvicorn

    from .connections import guarded_protocol

    settings, metrics = app.state.settings, app.state.metrics
    protocol = guarded_protocol(
        settings.header_timeout,
        max_connections,
        on_refused=lambda reason: metrics.connections_closed.labels(reason).inc(),
    )
    return uvicorn.Config(
        app, log_level="info" if verbose else "warning", access_log=verbose, timeout_graceful_shutdown=10, http=protocol
    )


def serve(
    engine_dir,
    *,
    host: str,
    port: int,
    settings_kwargs: dict,
    options: RuntimeOptions = RuntimeOptions(),
    quiet: bool = False,
    verbose: bool = False,
) -> None:
    """Load and verify the engine (its sessions as `options` say), bind, then serve until SIGINT / SIGTERM."""
    import uvicorn

    from ..runtime.engine import Engine
    from .app import ServeSettings, create_app

    from ..memory import return_large_frees

    return_large_frees()  # images decoded in worker threads give their memory back (memory.py)
    say = (lambda msg: None) if quiet else (lambda msg: print(f"star-serve: {msg}", file=sys.stderr, flush=True))
    say(f"loading {engine_dir} ...")
    engine = Engine.from_dir(engine_dir, options)
    settings = ServeSettings(
        model_name=settings_kwargs.pop("model_name", None) or default_model_name(engine.manifest), **settings_kwargs
    )
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    if not settings.api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"star-serve: warning: listening on {host} without an API key: anyone who reaches this port can use it "
            "(--api-key)",
            file=sys.stderr,
        )
    from .connections import connection_capacity

    capacity = connection_capacity()
    if settings.max_connections is not None and settings.max_connections > capacity:
        raise UserError(
            f"--max-connections {settings.max_connections} is over what this process's file-descriptor limit allows "
            f"({max(capacity, 0)}): raise it (ulimit -n) or lower --max-connections"
        )
    if capacity < 1:
        raise UserError(
            "this process's file-descriptor limit leaves no room for connections: raise it (ulimit -n 4096)"
        )
    app = create_app(engine, settings)
    config = server_config(app, settings.max_connections or capacity, verbose=verbose)
    S = engine.schedule
    say(
        f"serving '{settings.model_name}' ({S.num_vision_tokens} -> {S.stage1_keep} -> {S.keep} visual tokens, max "
        f"batch {engine.limits.max_batch_size}, {engine.provider}) on http://{host}:{bound}/v1  (port {bound})"
    )
    uvicorn.Server(config).run(sockets=[sock])
