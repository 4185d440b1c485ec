"""star-serve's HTTP side (FastAPI on uvicorn): OpenAI chat completions with server-sent-event streaming, the model
list, health and Prometheus metrics. Every error, ours or the framework's, has OpenAI's error shape."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import user_error_from
from ..runtime.images import ResizeRule
from . import images as image_source
from . import protocol
from .connections import AcceptErrors
from .metrics import Metrics
from .protocol import APIError
from .scheduler import Event, Job, QueueFull, Scheduler, timeout_error

TEXT_BODY_BYTES = 1 << 20  # room for the messages' text next to the image's base64
SMALL_BODY_BYTES = 1 << 20  # bodies up to this size (a phone photo at 336 px is ~100 KB) never wait for an upload slot
SLOT_WAIT_S = 30.0  # longest wait for an upload slot or image memory before 429


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64
    prefill_batch_tokens: int | None = (
        None  # a batched prefill's budget in decoder tokens (None: the provider's default)
    )
    request_timeout: float = 300.0
    max_image_bytes: int = 20 << 20
    allow_remote_images: bool = False
    header_timeout: float = 10.0  # seconds for a connection's request headers (serve/connections.py)
    body_timeout: float = 60.0  # seconds for a whole request body; also the longest pause between two of its chunks
    max_connections: int | None = None  # None: what the file-descriptor limit allows
    max_image_memory: int | None = (
        None  # bytes that large bodies and images being decoded may hold together (MemoryBudget);
    )
    # None: default_image_memory()
    max_large_uploads: int = 2  # bodies over SMALL_BODY_BYTES read and parsed at once

    @property
    def max_body_bytes(self) -> int:
        return self.max_image_bytes * 4 // 3 + 4 + TEXT_BODY_BYTES  # base64 of the largest image, plus text


def max_text_chars(tokenizer, max_input_len: int) -> int:
    """Characters of text that certainly do not fit in `max_input_len` tokens: every token stands for at most the
    longest piece of the vocabulary, so longer text is refused before it is tokenized (tokenizing 21 MB of text took
    27 s)."""
    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=16)
    return max_input_len * max(longest, 1)


def create_app(engine, settings: ServeSettings) -> FastAPI:
    metrics = Metrics()
    scheduler = Scheduler(engine, settings.max_queue, metrics, settings.prefill_batch_tokens)
    limits = protocol.ServeLimits(
        settings.model_name,
        engine.limits.max_new_tokens,
        settings.max_image_bytes,
        settings.allow_remote_images,
        max_input_len=engine.limits.max_input_len,
        max_text_chars=max_text_chars(engine.processor.tokenizer, engine.limits.max_input_len),
    )
    rule = ResizeRule.from_processor(engine.processor)
    image_memory = MemoryBudget(settings.max_image_memory or default_image_memory())
    uploads = asyncio.Semaphore(settings.max_large_uploads)

    @asynccontextmanager
    async def lifespan(app):
        asyncio.get_running_loop().set_exception_handler(AcceptErrors())
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="star-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.settings, app.state.image_memory = (
        scheduler,
        metrics,
        settings,
        image_memory,
    )

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
            raise APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    async def read_body(request: Request) -> bytes:
        """The whole body, within the size limit and `body_timeout` (in total, and between two chunks)."""
        from starlette.requests import ClientDisconnect

        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"the request body is {int(declared):,} bytes, over this server's limit of {limit:,} "
                "(it follows --max-image-bytes)",
                code="body_too_large",
                headers=CLOSE,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout
        chunks, size, pieces = [], 0, request.stream().__aiter__()
        while True:
            try:
                piece = await asyncio.wait_for(pieces.__anext__(), timeout=max(deadline - loop.time(), 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise APIError(
                    408,
                    f"the request body did not arrive within {settings.body_timeout:g} s (--body-timeout)",
                    code="body_timeout",
                    headers=CLOSE,
                ) from None
            except ClientDisconnect:
                raise APIError(
                    499, "the client closed the connection before its request body arrived", code="client_closed"
                ) from None
            size += len(piece)
            if size > limit:
                raise APIError(
                    413,
                    f"the request body is over this server's limit of {limit:,} bytes (it follows --max-image-bytes)",
                    code="body_too_large",
                    headers=CLOSE,
                )
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
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model_name,
                    "object": "model",
                    "created": int(engine.directory.stat().st_mtime),
                    "owned_by": "star-export",
                    "star": {
                        "source": m.source_name,
                        "schedule": m.schedule.asdict(),
                        "limits": m.limits.asdict(),
                        "weights": m.weights.asdict(),
                    },
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        declared = request.headers.get("content-length")
        large = not (declared is not None and declared.isdigit() and int(declared) <= SMALL_BODY_BYTES)
        async with _slot(uploads if large else None):
            # A large body's bytes, its JSON text and its decoded image: about 3x its size, held until the image
            # bytes alone remain (their own share comes with the decode's).
            share = (
                await run_in_threadpool(
                    image_memory.acquire, 3 * int(declared) if large and declared else 3 * settings.max_body_bytes
                )
                if large
                else 0
            )
            try:
                body = await read_body(request)
                # a large body's JSON is parsed off the event loop (tens of MB take a noticeable fraction of a second)
                req = (
                    await run_in_threadpool(protocol.parse_request, body, limits)
                    if large
                    else protocol.parse_request(body, limits)
                )
                del body
                data = await run_in_threadpool(
                    image_source.fetch,
                    req.image_url,
                    max_bytes=settings.max_image_bytes,
                    allow_remote=settings.allow_remote_images,
                )
                req = dataclasses.replace(req, image_url="")  # the base64 text is no longer needed
            finally:
                image_memory.release(share)
            inputs = await run_in_threadpool(_prepare, engine, req, data, rule, image_memory)
            del data
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
            raise APIError(
                429,
                f"the server's queue is full ({settings.max_queue} requests waiting, --max-queue): retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        if not req.stream:
            watcher = asyncio.create_task(_watch_disconnect(request, job, emit))
        if req.stream:
            return StreamingResponse(
                _stream(req, job, events, prompt_tokens, settings, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
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
            watcher.cancel()
        metrics.e2e.observe(time.monotonic() - job.arrived)
        metrics.requests.labels("200").inc()
        use = protocol.usage(prompt_tokens, len(done.token_ids), done.star)
        return protocol.completion(req, settings.model_name, "".join(pieces), done.token_ids, done.finish_reason, use)

    return app


_PROCESSOR = threading.Lock()  # one request at a time through the processor: its fast tokenizer is not thread-safe
CLOSE = {"Connection": "close"}  # a response sent before the body was read whole: the connection cannot be reused


MIN_IMAGE_MEMORY = 320 << 20  # a 64-megapixel RGB photo (256 MB decoded) and its body, one at a time


def default_image_memory() -> int:
    """MIN_IMAGE_MEMORY, or half of what this process holds once the engine is loaded, whichever is larger: images in
    flight then never take the server past 1.5x its loaded size (plus at most MIN_IMAGE_MEMORY for a small engine),
    and a 7B engine's server (several GB) decodes every image the pixel bound admits (at most 8 bytes a pixel: 512 MB
    for a rotated or CMYK 64-megapixel photo), several at a time."""
    try:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        rss = 0
    return max(MIN_IMAGE_MEMORY, rss // 2)


class MemoryBudget:
    """Bytes that requests' bodies and images being decoded may hold together, across requests. A share waits until
    it fits beside the others (waiting longer than SLOT_WAIT_S is 429); a request never waits while holding a share
    (no two can wait on each other). An image whose decode alone needs more than the whole budget is refused (400),
    so the server's memory stays within its idle size plus the budget."""

    def __init__(self, limit: int):
        self.limit, self.used, self.cv = limit, 0, threading.Condition()

    def acquire(self, nbytes: int) -> int:
        nbytes = min(nbytes, self.limit)
        with self.cv:
            if not self.cv.wait_for(lambda: self.used + nbytes <= self.limit, timeout=SLOT_WAIT_S):
                raise APIError(
                    429,
                    "the server is holding other large images: retry shortly",
                    code="server_busy",
                    headers={"Retry-After": "1"},
                )
            self.used += nbytes
        return nbytes

    def release(self, nbytes: int) -> None:
        with self.cv:
            self.used -= nbytes
            self.cv.notify_all()

    @contextmanager
    def hold(self, nbytes: int):
        held = self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(held)


@asynccontextmanager
async def _slot(semaphore: asyncio.Semaphore | None):
    """One of the few upload slots for a large body (read, parsed and decoded), or none for a small one."""
    if semaphore is None:
        yield
        return
    try:
        await asyncio.wait_for(semaphore.acquire(), timeout=SLOT_WAIT_S)
    except asyncio.TimeoutError:
        raise APIError(
            429,
            "the server is receiving other large uploads: retry shortly",
            code="server_busy",
            headers={"Retry-After": "1"},
        ) from None
    try:
        yield
    finally:
        semaphore.release()


def _prepare(
    engine, req: protocol.ChatRequest, data: bytes, rule: ResizeRule | None, image_memory: MemoryBudget
) -> dict:
    """Image bytes and prompt -> the engine's inputs (in a worker thread: decoding and tokenizing are not free). The
    decode holds its share of the image memory; the processor lock is held only for the (bounded) text and the
    already-resized picture."""
    cost = image_source.decode_cost(data, rule)
    if cost > image_memory.limit:
        raise APIError(
            400,
            f"the image needs about {cost / 2**20:,.0f} MiB to decode, over this server's "
            f"{image_memory.limit / 2**20:,.0f} MiB for images (--max-image-memory): downscale it",
            param=image_source.PARAM,
            code="image_too_large",
        )
    with image_memory.hold(cost):
        image = image_source.decode(data, rule)
        try:
            with _PROCESSOR:
                prompt = engine.processor.apply_chat_template(req.conversation, add_generation_prompt=True)
                return engine.prepare([image], [prompt])
        except APIError:
            raise
        except Exception as e:
            user = user_error_from(e)
            if user is None:
                raise
            raise APIError(
                400,
                str(user),
                param="messages",
                code="context_length_exceeded" if "max input length" in str(user) else None,
            ) from None


async def _watch_disconnect(request: Request, job: Job, emit) -> None:
    """A non-streaming request's client leaving cancels its job at the next step (a stream's does so by itself)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled = True
            emit(Event("error", error=APIError(499, "the client closed the connection", code="client_closed")))
            return


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
    model, status, finished = settings.model_name, "200", False
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
                yield protocol.chunk(
                    req, model, None, use=protocol.usage(prompt_tokens, len(event.token_ids), event.star)
                )
            metrics.e2e.observe(time.monotonic() - job.arrived)
            break
        yield protocol.DONE
        finished = True
    finally:
        job.cancelled = True  # the client went away mid-stream, or the stream is over
        metrics.requests.labels(status if finished or status != "200" else "499").inc()
