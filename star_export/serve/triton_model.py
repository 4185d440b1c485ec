"""The Triton Python-backend model of a star-export engine (imported by the `model.py` that triton_repo.py writes).

It shares star-serve's request handling: images are decoded and checked by serve/images.py, prompts go through the
engine's chat template and limits, and requests run on star-serve's scheduler (continuous batching: a request
joins the running batch at the next step boundary, whatever Triton batch it came in). The model is decoupled:
`execute` hands requests to the scheduler and returns; responses are sent from the scheduler's thread, one per new
piece of text when `stream` is true, else one with the whole answer, each request's last flagged final.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import user_error_from
from ..runtime.generate import InputError, Sampling
from ..runtime.images import ResizeRule
from . import images
from .protocol import APIError, check_max_tokens
from .scheduler import Event, Job, QueueFull, Scheduler

REQUEST_TIMEOUT_S = 600.0


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from ..memory import return_large_frees
        from ..runtime.engine import Engine
        from ..runtime.threads import claim_process

        return_large_frees()  # the stub process serves images for as long as Triton runs (memory.py)
        claim_process()  # a Triton python-backend instance has its stub process to itself: ONNX Runtime's shared pool
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(params["engine_dir"])
        if not engine_dir.is_absolute():
            engine_dir = Path(args["model_repository"]) / engine_dir
        provider = "cuda" if args.get("model_instance_kind") == "GPU" else "cpu"
        self.engine = Engine(engine_dir, provider=provider)  # verifies the files against star.json's hashes
        self.scheduler = Scheduler(self.engine, int(params.get("max_queue", 64)))  # Triton keeps the metrics
        self.scheduler.start()

    def finalize(self):
        self.scheduler.stop()

    # ------------------------------------------------------------ requests
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job, stream = self._job(request, sender)
                self.scheduler.submit(job)
            except QueueFull:
                self._fail(sender, f"the model's queue is full ({self.scheduler.max_queue} waiting): retry shortly")
            except APIError as e:
                self._fail(sender, e.message)
            except Exception as e:
                user = user_error_from(e)
                self._fail(sender, str(user) if user else f"internal error ({type(e).__name__}: {str(e)[:200]})")
        return None  # decoupled: responses go through the senders

    def _input(self, request, name):
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _scalar(self, request, name, cast, default):
        value = self._input(request, name)
        return default if value is None or value.size == 0 else cast(value.reshape(-1)[0])

    def _job(self, request, sender) -> tuple[Job, bool]:
        text = self._input(request, "text_input")
        if text is None or text.size != 1:
            raise APIError(400, "text_input: send one question (a string) per request")
        question = text.reshape(-1)[0]
        question = question.decode("utf-8", errors="replace") if isinstance(question, bytes) else str(question)
        data = self._input(request, "image_bytes_input")
        if data is None or data.size == 0:
            raise APIError(
                400,
                "image_bytes_input is missing: LLaVA-1.5 takes exactly one image per request (the encoded file's "
                "bytes, UINT8)",
            )
        image = images.decode(
            np.ascontiguousarray(data, dtype=np.uint8).tobytes(), ResizeRule.from_processor(self.engine.processor)
        )
        limit = self.engine.limits.max_new_tokens
        max_tokens = self._scalar(request, "max_tokens", int, min(64, limit))
        check_max_tokens(max_tokens, limit)
        try:
            sampling = Sampling(
                max_new_tokens=max_tokens,
                temperature=self._scalar(request, "temperature", float, 0.0),
                top_p=self._scalar(request, "top_p", float, 1.0),
                seed=self._scalar(request, "random_seed", int, 0),
            )
            inputs = self.engine.prepare([image], [question])
        except InputError as e:
            raise APIError(400, str(e)) from None
        stream = bool(self._scalar(request, "stream", bool, False))
        return Job(
            inputs=inputs, sampling=sampling, stop=(), timeout_s=REQUEST_TIMEOUT_S, emit=self._emitter(sender, stream)
        ), stream

    def _emitter(self, sender, stream: bool):
        pb, pieces = self.pb, []
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def emit(event: Event) -> None:
            if event.kind == "error":
                self._fail(sender, event.error.message)
            elif event.kind == "delta":
                if stream:
                    sender.send(self._response(event.text, [event.token_ids[-1]], None))
                else:
                    pieces.append(event.text)
            elif stream:  # done: the kept indices close the stream
                sender.send(self._response("", [], event.kept), flags=final)
            else:
                sender.send(self._response("".join(pieces), event.token_ids, event.kept), flags=final)

        return emit

    def _response(self, text: str, ids: list[int], kept):
        pb = self.pb
        stage1, stage2 = kept if kept is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        return pb.InferenceResponse(
            output_tensors=[
                pb.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                pb.Tensor("output_ids", np.asarray(ids, dtype=np.int32).reshape(1, -1)),
                pb.Tensor("stage1_indices", np.asarray(stage1, dtype=np.int64).reshape(1, -1)),
                pb.Tensor("stage2_indices", np.asarray(stage2, dtype=np.int64).reshape(1, -1)),
            ]
        )

    def _fail(self, sender, message: str) -> None:
        pb = self.pb
        sender.send(pb.InferenceResponse(error=pb.TritonError(message)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class UnaryModel:
    """The non-streaming face of the repository (HTTP / gRPC `infer`, which Triton refuses for decoupled models):
    each request is forwarded with BLS to the decoupled engine model and answered with its one final response.
    It holds no engine; requests of one Triton batch are forwarded concurrently, so they batch there too."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.target = config["parameters"]["target"]["string_value"]
        self.outputs = [o["name"] for o in config["output"]]

    async def execute(self, requests):
        import asyncio

        return list(await asyncio.gather(*(self._forward(r) for r in requests)))

    async def _forward(self, request):
        pb = self.pb
        inputs = [t for t in request.inputs() if t.name() != "stream"]
        call = pb.InferenceRequest(model_name=self.target, inputs=inputs, requested_output_names=self.outputs)
        answer = None
        for response in await call.async_exec(decoupled=True):  # a plain iterator (python backend 2.51)
            if response.has_error():
                return pb.InferenceResponse(error=pb.TritonError(response.error().message()))
            if response.output_tensors():
                answer = response
        if answer is None:
            return pb.InferenceResponse(error=pb.TritonError(f"{self.target} sent no answer"))
        return pb.InferenceResponse(output_tensors=[pb.get_output_tensor_by_name(answer, n) for n in self.outputs])
