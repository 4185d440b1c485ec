"""The OpenAI chat-completions protocol, as far as a LLaVA-1.5 engine can honour it.

A request body is checked here in full before anything is queued (every refusal is an `APIError` in OpenAI's error
shape, naming the parameter); what passes becomes a `ChatRequest`: the conversation for the engine's chat template,
the image source, sampling settings and stop strings. The response and stream-chunk bodies are built here too.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.generate import Sampling


class APIError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        408: "timeout_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        499: "client_closed_request",
        500: "server_error",
        503: "server_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


# ------------------------------------------------------------------ the request body


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part]]
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(
        extra="ignore", strict=True
    )  # include_obfuscation and later additions change nothing here
    include_usage: bool = False


MAX_STOP = 4  # OpenAI's limit on `stop` sequences


class ChatCompletionBody(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted at their neutral values only (NEUTRAL): a client that sets them expects an effect this server lacks.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None


NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}


def _shown(text: str, limit: int = 100) -> str:
    """A value the client sent, as an error message repeats it: at most `limit` characters (a 5 MB model name is not
    sent back)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = _shown(
        ".".join(
            str(p)
            for p in err["loc"]
            if not (isinstance(p, str) and p in ("str", "list[tagged-union[TextPart,ImagePart]]", "function-after"))
        )
    )
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {loc}", param=loc)
    if err["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{loc}'.", param=loc, code="missing_required_parameter")
    got = json.dumps(err.get("input"), default=str)[:80]
    return APIError(400, f"Invalid value for '{loc}': {err['msg']} (got {got}).", param=loc, code="invalid_value")


# ------------------------------------------------------------------ the checked request


@dataclass(frozen=True)
class ServeLimits:
    """What a request may ask of this server: the engine's limits and the server's own."""

    model_name: str
    max_new_tokens: int
    max_image_bytes: int
    allow_remote_images: bool
    max_input_len: int = 2048
    max_text_chars: int = 1 << 20  # text that cannot fit in max_input_len tokens (serve/app.py: max_text_chars)


@dataclass(frozen=True)
class ChatRequest:
    id: str
    conversation: list[dict]  # messages for the processor's chat template (image parts first, as LLaVA was trained)
    image_url: str
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))


MAX_JSON_DEPTH = 32  # a chat request nests 6 deep; json.loads itself fails near 1,000 (RecursionError)


def parse_request(raw: bytes, limits: ServeLimits) -> ChatRequest:
    """The body of POST /v1/chat/completions, checked; raises APIError (400 / 404) naming what is wrong."""
    try:
        obj = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise APIError(
            400, f"The request body is not valid JSON ({_shown(str(e), 200)}).", code="invalid_json"
        ) from None
    except RecursionError:
        raise APIError(
            400, f"The request body nests too deeply (limit {MAX_JSON_DEPTH} levels).", code="invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(obj).__name__}.", code="invalid_json")
    _check_json(obj)
    try:
        body = ChatCompletionBody.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e) from None
    for name, allowed in NEUTRAL.items():
        if getattr(body, name) not in allowed:
            raise APIError(
                400,
                f"'{name}' is not supported by this server (only its default is accepted).",
                param=name,
                code="unsupported_parameter",
            )
    if body.model != limits.model_name:
        raise APIError(
            404,
            f"The model '{_shown(body.model)}' does not exist: this server serves '{limits.model_name}' (GET "
            "/v1/models).",
            param="model",
            code="model_not_found",
        )
    if body.n not in (None, 1):
        raise APIError(
            400, f"n={body.n}: this server generates one choice per request (n=1).", param="n", code="unsupported_value"
        )
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed with 'stream': true.", param="stream_options")
    conversation, image_url = _conversation(body.messages)
    chars = sum(len(part["text"]) for m in conversation for part in m["content"] if part["type"] == "text")
    if chars > limits.max_text_chars:
        raise APIError(
            400,
            f"the messages hold {chars:,} characters of text, more than this engine's {limits.max_input_len} input "
            f"tokens can hold (at most {limits.max_text_chars:,} characters): shorten them",
            param="messages",
            code="context_length_exceeded",
        )
    return ChatRequest(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        conversation=conversation,
        image_url=image_url,
        sampling=_sampling(body, limits),
        stop=_stops(body.stop),
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


def _check_json(obj: Any) -> None:
    """Depth within MAX_JSON_DEPTH and every string valid Unicode (JSON's \\ud800 escapes decode to lone surrogates,
    which no tokenizer or encoder takes), walked without recursion."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(
                400, f"The request body nests too deeply (limit {MAX_JSON_DEPTH} levels).", code="invalid_json"
            )
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(
                    400,
                    f"The request body holds a lone surrogate (\\u{ord(value[_surrogate(value)]):04x}): strings must "
                    "be valid Unicode.",
                    code="invalid_json",
                ) from None


def _surrogate(text: str) -> int:
    return next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)


def _conversation(messages: list[Message]) -> tuple[list[dict], str]:
    """Chat-template messages and the one image. Within a message the image goes first (LLaVA-1.5's training
    format, and vLLM's placement for it): the same question gives the same prompt whatever the order of parts."""
    conversation, images = [], []
    for i, m in enumerate(messages):
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        found = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        if found and m.role != "user":
            raise APIError(
                400,
                f"messages[{i}] ({m.role}) holds an image: images go in user messages.",
                param=f"messages.{i}.content",
            )
        images += found
        content = [{"type": "image"} for _ in found] + [
            {"type": "text", "text": p.text} for p in parts if isinstance(p, TextPart)
        ]
        conversation.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if len(images) != 1:
        raise APIError(
            400,
            f"the messages hold {len(images)} images: LLaVA-1.5 takes exactly one image per request "
            "(one content part of type 'image_url' in a user message).",
            param="messages",
            code="invalid_image_count",
        )
    if conversation[-1]["role"] == "assistant":
        raise APIError(
            400, "the last message is the assistant's: end with a user message to get an answer.", param="messages"
        )
    return conversation, images[0]


def check_max_tokens(wanted: int, limit: int) -> None:
    """A request's token budget against the engine's (star-serve and the Triton model alike)."""
    if wanted > limit:
        raise APIError(
            400,
            f"max_tokens={wanted} exceeds this engine's limit of {limit} new tokens "
            "(rebuild the engine with a larger --max-new-tokens).",
            param="max_tokens",
            code="max_tokens_exceeded",
        )


def _sampling(body: ChatCompletionBody, limits: ServeLimits) -> Sampling:
    if (
        body.max_tokens is not None
        and body.max_completion_tokens is not None
        and body.max_tokens != body.max_completion_tokens
    ):
        raise APIError(
            400, "'max_tokens' and 'max_completion_tokens' differ: give one of them.", param="max_completion_tokens"
        )
    wanted = body.max_completion_tokens or body.max_tokens
    if wanted is not None:
        check_max_tokens(wanted, limits.max_new_tokens)
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:8], "little") >> 1
    return Sampling(
        max_new_tokens=wanted or limits.max_new_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=seed,
    )


def _stops(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP:
        raise APIError(400, f"'stop' holds {len(stops)} sequences: at most {MAX_STOP}.", param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "'stop' holds an empty string.", param="stop")
    return stops


# ------------------------------------------------------------------ the response


def usage(prompt_tokens: int, completion_tokens: int, star: dict) -> dict:
    """OpenAI's usage, plus `star`: visual tokens per stage (576 -> k1 -> keep) and the stage timings."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "star": star,
    }


def completion(req: ChatRequest, model: str, text: str, token_ids: list[int], finish_reason: str, use: dict) -> dict:
    return {
        "id": req.id,
        "object": "chat.completion",
        "created": req.created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
                "token_ids": token_ids,
            }
        ],
        "usage": use,
    }


def chunk(
    req: ChatRequest,
    model: str,
    delta: dict | None,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
    use: dict | None = None,
) -> str:
    """One server-sent event of a `chat.completion.chunk` stream; `delta=None` is the usage chunk (no choices)."""
    body: dict[str, Any] = {
        "id": req.id,
        "object": "chat.completion.chunk",
        "created": req.created,
        "model": model,
        "system_fingerprint": None,
    }
    body["choices"] = (
        []
        if delta is None
        else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason, "token_ids": token_ids or []}
        ]
    )
    if req.include_usage:
        body["usage"] = use
    return f"data: {json.dumps(body)}\n\n"


def error_event(error: APIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


DONE = "data: [DONE]\n\n"
