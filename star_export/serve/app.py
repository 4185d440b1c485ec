"""star-serve's HTTP side (FastAPI on uvicorn): OpenAI chat completions with server-sent-event streaming, the model
list, health and Prometheus metrics. Every error, ours or the framework's, has OpenAI's error shape."""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import user_error_from
from . import images as image_source
from . import protocol
from .metrics import Metrics
from .protocol import APIError
from .scheduler import Event, Job, QueueFull, Scheduler, timeout_error

TEXT_BODY_BYTES = 1 << 20  # room for the messages' text next to the image's base64


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64
    request_timeout: float = 300.0
    max_image_bytes: int = 20 << 20
    allow_remote_images: bool = False

    @property
    def max_body_bytes(self) -> int:
        return self.max_image_bytes * 4 // 3 + 4 + TEXT_BODY_BYTES  # base64 of the largest image, plus text


def create_app(engine, settings: ServeSettings) -> FastAPI:
    metrics = Metrics()
    scheduler = Scheduler(engine, settings.max_queue, metrics)
    limits = protocol.ServeLimits(settings.model_name, engine.limits["max_new_tokens"], settings.max_image_bytes, settings.allow_remote_images)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="star-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def error_response(e: APIError) -> JSONResponse:
        metrics.requests.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):  # unknown route, wrong method
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(APIError(500, f"internal error ({type(e).__name__}): this is a bug in star-serve"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {int(declared):,} bytes, over this server's limit of {limit:,} "
                                "(it follows --max-image-bytes)", code="body_too_large")
        chunks, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise APIError(413, f"the request body is over this server's limit of {limit:,} bytes (it follows --max-image-bytes)", code="body_too_large")
            chunks.append(piece)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return error_response(APIError(503, "not ready: the scheduler is not running"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        m = engine.manifest
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": int(engine.directory.stat().st_mtime), "owned_by": "star-export",
            "star": {"source": m["source"].get("name"), "schedule": m["schedule"], "limits": engine.limits, "weights": m.get("weights")},
        }]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = protocol.parse_request(await read_body(request), limits)
        inputs = await run_in_threadpool(_prepare, engine, req, settings)
        prompt_tokens = int(inputs["attention_mask"].sum())
        metrics.prompt_tokens.inc(prompt_tokens)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        job = Job(inputs=inputs, sampling=req.sampling, stop=req.stop, timeout_s=settings.request_timeout, emit=emit)
        try:
            scheduler.submit(job)
        except QueueFull:
            raise APIError(429, f"the server's queue is full ({settings.max_queue} requests waiting, --max-queue): retry shortly",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        if req.stream:
            return StreamingResponse(_stream(req, job, events, prompt_tokens, settings, metrics), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            pieces, done = [], None
            while done is None:
                event = await _next(events, job, settings)
                if event.kind == "error":
                    raise event.error
                if event.kind == "delta":
                    pieces.append(event.text)
                else:
                    done = event
        finally:
            job.cancelled = True  # no-op when finished; frees the row when the client went away
        metrics.e2e.observe(time.monotonic() - job.arrived)
        metrics.requests.labels("200").inc()
        use = protocol.usage(prompt_tokens, len(done.token_ids), done.star)
        return protocol.completion(req, settings.model_name, "".join(pieces), done.token_ids, done.finish_reason, use)

    return app


_PROCESSOR = threading.Lock()  # one request at a time through the processor: its fast tokenizer is not thread-safe


def _prepare(engine, req: protocol.ChatRequest, settings: ServeSettings) -> dict:
    """Image and prompt -> the engine's inputs (in a worker thread: decoding and tokenizing are not free)."""
    image = image_source.load(req.image_url, max_bytes=settings.max_image_bytes, allow_remote=settings.allow_remote_images)
    try:
        with _PROCESSOR:
            prompt = engine.processor.apply_chat_template(req.conversation, add_generation_prompt=True)
            return engine.prepare([image], [prompt])
    except Exception as e:
        user = user_error_from(e)
        if user is None:
            raise
        raise APIError(400, str(user), param="messages", code="context_length_exceeded" if "max input length" in str(user) else None) from None


async def _next(events: asyncio.Queue, job: Job, settings: ServeSettings) -> Event:
    """The job's next event; the worker enforces the timeout at step boundaries, this is the backstop."""
    remaining = job.deadline - time.monotonic() + 5.0
    try:
        return await asyncio.wait_for(events.get(), timeout=max(remaining, 0.1))
    except asyncio.TimeoutError:
        job.cancelled = True
        return Event("error", error=timeout_error(job))


async def _stream(req, job: Job, events: asyncio.Queue, prompt_tokens: int, settings: ServeSettings, metrics: Metrics):
    """chat.completion.chunk events: the role first, content deltas, the finish reason, usage if asked, [DONE]."""
    model, status = settings.model_name, "200"
    try:
        yield protocol.chunk(req, model, {"role": "assistant", "content": ""})
        while True:
            event = await _next(events, job, settings)
            if event.kind == "error":
                status = str(event.error.status)
                yield protocol.error_event(event.error)
                break
            if event.kind == "delta":
                if event.text or event.token_ids:
                    yield protocol.chunk(req, model, {"content": event.text}, token_ids=event.token_ids)
                continue
            yield protocol.chunk(req, model, {}, finish_reason=event.finish_reason)
            if req.include_usage:
                yield protocol.chunk(req, model, None, use=protocol.usage(prompt_tokens, len(event.token_ids), event.star))
            metrics.e2e.observe(time.monotonic() - job.arrived)
            break
        yield protocol.DONE
    finally:
        job.cancelled = True  # the client went away mid-stream, or the stream is over
        metrics.requests.labels(status).inc()
