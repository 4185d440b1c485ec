"""Continuous (in-flight) batching over the two-segment engine, on one worker thread.

At every step boundary the worker admits waiting requests (prefilled together up to a budget of decoder tokens, as
one left-padded batch: `prefill_groups`; then merged into the running batch: runtime/batch.py), samples one token for
every row from its own logits with its own sampling settings and generator, sends each request its new text, lets
finished rows leave at once, and runs one decode step for the rows that remain. The batch never exceeds the engine's
max batch size.

Requests talk to the worker through `Job`: the HTTP side fills it and reads `Event`s from `emit`; the worker never
raises into a request's neighbours (a failing prefill fails its own job only).
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..runtime import batch as rows_of
from ..runtime.generate import Sampling, sample_next
from .protocol import APIError


@dataclass
class Event:
    kind: str  # "delta" (text, token_ids) | "done" (finish_reason, usage) | "error" (error)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    star: dict | None = None
    kept: tuple | None = None  # (stage-1 patch indices, stage-2 offsets) of the request's image
    error: APIError | None = None


@dataclass
class Job:
    inputs: dict  # pixel_values, input_ids, attention_mask (batch 1)
    sampling: Sampling
    stop: tuple[str, ...]
    timeout_s: float
    emit: Callable[[Event], None]
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the HTTP side (client gone)
    # the worker's
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text sent
    rng: np.random.Generator | None = None
    star: dict = field(default_factory=dict)
    kept: tuple | None = None
    last_token_at: float = 0.0

    @property
    def deadline(self) -> float:
        return self.arrived + self.timeout_s


class QueueFull(Exception):
    pass


# Decoder tokens one batched prefill may hold (rows x the longest row's n, padding included) on a GPU provider, where a
# prefill of one request leaves most of the device idle. On the CPU (ONNX Runtime or OpenVINO) a prompt's ~500 decoder
# tokens already keep the GEMMs compute-bound: batching adds no throughput there and makes the first request wait for
# the others' prefill, so each request is prefilled alone (budget 0). `star-serve --prefill-batch-tokens` overrides.
GPU_PREFILL_TOKENS = 4096


def default_prefill_tokens(provider: str) -> int:
    return GPU_PREFILL_TOKENS if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else 0


def prefill_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive jobs (by their decoder lengths n) in groups whose padded size, rows x the longest n, stays within
    `budget`; a job alone forms a group whatever its size (budget 0: every job alone)."""
    groups: list[list[int]] = []
    longest = 0  # of the last group
    for i, n in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= budget:
            groups[-1].append(i)
            longest = max(longest, n)
        else:
            groups.append([i])
            longest = n
    return groups


def left_padded(inputs: list[dict], pad_token_id: int) -> dict:
    """Batch-1 inputs (pixel_values, input_ids, attention_mask) as one batch, the prompts left padded as the
    processor pads a batch (the pipeline masks padding out and gives each row its own positions)."""
    width = max(x["input_ids"].shape[1] for x in inputs)

    def pad(key, value):
        rows = [x[key] for x in inputs]
        return np.concatenate([np.pad(r, ((0, 0), (width - r.shape[1], 0)), constant_values=value) for r in rows])

    return {
        "pixel_values": np.concatenate([x["pixel_values"] for x in inputs]),
        "input_ids": pad("input_ids", pad_token_id),
        "attention_mask": pad("attention_mask", 0),
    }


class _NoMetrics:
    """Stands in for serve/metrics.Metrics where the host server keeps its own (Triton)."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


class Scheduler:
    def __init__(self, engine, max_queue: int, metrics=None, prefill_tokens: int | None = None):
        """`metrics`: a serve/metrics.Metrics, or None. `prefill_tokens`: the budget of a batched prefill in decoder
        tokens (None: `default_prefill_tokens` of the engine's provider; 0: each request alone)."""
        self.engine, self.pipeline, self.metrics = engine, engine.pipeline, metrics or _NoMetrics()
        self.prefill_tokens = default_prefill_tokens(engine.provider) if prefill_tokens is None else prefill_tokens
        self.max_batch = engine.limits.max_batch_size
        self.max_queue = max_queue
        # A copy of its own: a fast tokenizer mutated by a request's encoding (padding settings) while this thread
        # decodes
        # fails with "Already borrowed".
        self.tokenizer = copy.deepcopy(engine.processor.tokenizer)
        self.eos = engine.layout.eos_token_id
        self.waiting: collections.deque[Job] = collections.deque()
        self.rows: list[Job] = []
        self.state = None  # DecodeState of `rows`
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="star-scheduler", daemon=True)
        self.failure: BaseException | None = None

    # ------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping and self.failure is None

    def submit(self, job: Job) -> None:
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull()
            self.waiting.append(job)
            self.metrics.queue_depth.set(len(self.waiting))
            self.cv.notify()

    # ------------------------------------------------------------ the worker
    def _loop(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.waiting and not self.rows and not self.stopping:
                        self.cv.wait()
                    if self.stopping:
                        break
                    admitted = [
                        self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.rows)))
                    ]
                    self.metrics.queue_depth.set(len(self.waiting))
                self._admit_all(admitted)
                if self.rows:
                    try:
                        self._step()
                    except Exception as e:  # the running rows fail; the server goes on with the next requests
                        rows, self.rows, self.state = self.rows, [], None
                        for job in rows:
                            job.emit(
                                Event(
                                    "error",
                                    error=APIError(500, f"decoding failed ({type(e).__name__}: {str(e)[:200]})"),
                                )
                            )
        except (
            BaseException
        ) as e:  # a bug: fail every request in flight rather than leave them waiting (/health turns 503)
            self.failure = e
            self._fail_all(
                APIError(500, f"the scheduler failed ({type(e).__name__}: {str(e)[:200]}); restart the server")
            )
            raise
        self._fail_all(APIError(503, "the server is shutting down"))

    def _fail_all(self, error: APIError) -> None:
        with self.cv:
            jobs, self.waiting, self.rows, self.state = list(self.waiting) + self.rows, collections.deque(), [], None
        for job in jobs:
            job.emit(Event("error", error=error))

    def _admit_all(self, jobs: list[Job]) -> None:
        """Prefill the admitted jobs, together in groups within the token budget, and add them to the running batch.
        A group whose prefill fails is prefilled again one job at a time, so a failing request fails alone."""
        now = time.monotonic()
        live = []
        for job in jobs:
            if job.cancelled:
                continue
            if now > job.deadline:
                job.emit(Event("error", error=timeout_error(job)))
                continue
            live.append(job)
        S = self.engine.schedule
        lengths = [int(j.inputs["input_ids"].shape[1]) - S.num_vision_tokens + S.stage1_keep for j in live]
        for group in prefill_groups(lengths, self.prefill_tokens):
            members = [live[i] for i in group]
            if len(members) > 1:
                try:
                    self._prefill(members, now)
                    continue
                except Exception:
                    pass  # one of them may be at fault: each alone, below
            for job in members:
                try:
                    self._prefill([job], now)
                except Exception as e:
                    job.emit(
                        Event("error", error=APIError(500, f"prefill failed ({type(e).__name__}: {str(e)[:200]})"))
                    )

    def _admit(self, job: Job) -> None:
        """One job, prefilled alone."""
        self._admit_all([job])

    def _prefill(self, jobs: list[Job], now: float) -> None:
        inputs = left_padded([j.inputs for j in jobs], self.engine.layout.pad_token_id)
        state, gen = self.pipeline.prefill(
            inputs["pixel_values"],
            inputs["input_ids"],
            inputs["attention_mask"],
            reserve=max(j.sampling.max_new_tokens for j in jobs) - 1,
        )
        S = self.engine.schedule
        for row, job in enumerate(jobs):
            job.star = {
                "visual_tokens": {"input": S.num_vision_tokens, "stage1": S.stage1_keep, "kept": S.keep},
                "timings": {"queue_s": now - job.arrived, **gen.timings, "decode_s": 0.0, "decode_steps": 0},
                "prefill_batch": len(jobs),
            }
            job.rng = np.random.default_rng(job.sampling.seed)
            job.kept = (gen.stage1_indices[row], gen.stage2_indices[row])
            self.metrics.visual_tokens(S.num_vision_tokens, S.stage1_keep, S.keep)
        self.state = state if self.state is None else rows_of.concat([self.state, state])
        self.rows.extend(jobs)

    def _step(self) -> None:
        """Sample every row's next token, send it, drop finished rows, decode the rest one step."""
        logits = self.state.logits
        tokens = np.empty(len(self.rows), dtype=np.int64)
        keep = []
        now = time.monotonic()
        for i, job in enumerate(self.rows):
            tokens[i] = sample_next(logits[i : i + 1], job.sampling, job.rng)[0]
            job.tokens.append(int(tokens[i]))
            self.metrics.token(now - (job.last_token_at or job.arrived), first=len(job.tokens) == 1)
            job.last_token_at = now
            if not self._send(job, now):
                keep.append(i)
        self.metrics.tokens_generated.inc(len(self.rows))
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            self.state = rows_of.take(self.state, keep) if keep else None
        self.metrics.running.set(len(self.rows))
        if self.rows:
            t = time.perf_counter()
            self.state = self.pipeline.step(self.state, tokens[keep])
            dt = time.perf_counter() - t
            self.metrics.batch_size.observe(len(self.rows))
            for job in self.rows:
                job.star["timings"]["decode_s"] += dt
                job.star["timings"]["decode_steps"] += 1

    def _send(self, job: Job, now: float) -> bool:
        """Send the job its new text; True when it is finished (and told so)."""
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        reason = None
        if job.cancelled:
            reason = "cancelled"
        elif job.sampling.stop_at_eos and job.tokens[-1] == self.eos:
            reason = "stop"
        hits = [i for i in (text.find(s, max(0, job.sent - len(s) + 1)) for s in job.stop) if i >= 0]
        if hits:
            text, reason = text[: min(hits)], "stop"
        elif reason is None and len(job.tokens) >= job.sampling.max_new_tokens:
            reason = "length"
        if reason is None and now > job.deadline:
            job.emit(Event("error", error=timeout_error(job)))
            return True
        if reason == "cancelled":
            return True
        if reason is None:  # hold back what may still become a stop string, and an unfinished UTF-8 character
            end = len(text) - max((len(s) - 1 for s in job.stop), default=0)
            while end > job.sent and text[end - 1] == "\ufffd":
                end -= 1
        else:
            end = len(text)
        piece = text[job.sent : max(end, job.sent)]
        job.sent = max(end, job.sent)
        job.emit(Event("delta", text=piece, token_ids=[job.tokens[-1]]))
        if reason is not None:
            job.emit(Event("done", finish_reason=reason, star=job.star, token_ids=list(job.tokens), kept=job.kept))
            return True
        return False


def timeout_error(job: Job) -> APIError:
    return APIError(
        408,
        f"the request ran past this server's timeout of {job.timeout_s:g} s (--request-timeout): "
        "ask for fewer tokens, or retry when the server is less busy",
        code="request_timeout",
    )
