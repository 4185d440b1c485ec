"""An engine directory, loaded: ONNX Runtime sessions, the embedding table, the saved processor."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import DecoderLayout, ModelSpec, RuntimeOptions, WeightScheme
from ..engine_check import GRAPHS, check_fields, check_graphs, check_paths, check_processor, load_embeddings
from ..errors import user_error_from
from ..manifest import PREFILL_GRAPHS, EngineError, EngineManifest, decode_graph_names
from ..memory import check_run_fits
from ..processor import normalize_processor, read_processor
from . import threads
from .decode import DecodeGraph
from .device_ops import DeviceOps
from .generate import Generation, InputError, Sampling, StarPipeline
from .images import rule_from_engine_dir
from .inputs import load_requests, prepare_inputs
from .openvino import OPENVINO, LazyOvGraph, OvGraph, graph_config
from .sessions import PROVIDER_ALIASES, LazyOrtGraph, OrtGraph, resolve_providers


def load_processor(path: Path, spec: ModelSpec, layout: DecoderLayout):
    """The engine's saved processor (tokenizer, image processor, chat template), checked against the graphs: read
    without transformers where star_export/processor.py reproduces it (LLaVA-1.5's), else transformers' own."""
    try:
        processor = read_processor(path, spec) or _transformers_processor(path, spec)
    except Exception as e:  # tokenizers' and transformers' own exception types: a broken or foreign file
        if user_error_from(e):
            raise
        raise EngineError(
            f"the processor in {str(path)!r} could not be loaded ({type(e).__name__}: {str(e)[:300]}): rebuild the "
            "engine with star-export --force"
        ) from e
    check_processor(processor, spec, layout)
    return processor


def _transformers_processor(path: Path, spec: ModelSpec):
    from transformers import AutoProcessor

    return normalize_processor(AutoProcessor.from_pretrained(path, local_files_only=True), spec)


LOAD_WORKERS = 2


def load_graphs(loaders: dict[str, Callable[[], Any]], one_at_a_time: bool = False) -> dict[str, Any]:
    """Each graph loaded by its loader, two at a time: OpenVINO's compiler and ONNX Runtime's session setup run
    outside Python's lock, so on 2 cores a real-width 4-layer int4 engine's six graphs load in 1.1-1.2 s instead of
    1.4-1.7 s one by one (three at a time gained nothing more). The first loader's error is raised.
    `one_at_a_time`: a lazy engine's (each check creates a whole session: two at once would double its peak)."""
    if len(loaders) < 2 or one_at_a_time:
        return {name: load() for name, load in loaders.items()}
    with ThreadPoolExecutor(LOAD_WORKERS, thread_name_prefix="star-load") as pool:
        futures = {name: pool.submit(load) for name, load in loaders.items()}
        return {name: future.result() for name, future in futures.items()}


class OpenVinoError(EngineError):
    """OpenVINO could not compile one of the engine's graphs."""


def _load_graph(
    path: Path,
    providers,
    lazy: bool = False,
    graph: type = OrtGraph,
    arena: str | None = None,
    scheme: WeightScheme = WeightScheme(),
) -> OrtGraph | LazyOrtGraph | OvGraph:
    try:
        if providers == [OPENVINO]:
            return (LazyOvGraph if lazy else OvGraph)(path, graph_config(scheme))
        if lazy:  # the session is created at each call; check now that it loads, then free it
            lazy_graph = LazyOrtGraph(path, providers, arena=arena)
            lazy_graph.session()
            return lazy_graph
        return graph(path, providers, arena=arena)
    except Exception as e:  # the runtime's own exception types: the file is not a graph it can run
        if user_error_from(e):
            raise
        if providers == [OPENVINO]:
            raise OpenVinoError(
                f"{path} could not be compiled by OpenVINO ({type(e).__name__}: {str(e)[:300]}): run the engine with "
                "--provider cpu (ONNX Runtime)"
            ) from e
        raise EngineError(
            f"{path} could not be loaded by ONNX Runtime ({type(e).__name__}: {str(e)[:300]}): rebuild the engine with "
            "star-export --force"
        ) from e


class Engine:
    def __init__(
        self,
        directory: str | Path,
        options: RuntimeOptions | None = None,
        *,
        verify: bool = True,
        lazy: bool = False,
        provider: str | None = None,
        allow_fallback: bool | None = None,
        decode_graphs: bool | None = None,
        prefill_graphs: bool | None = None,
    ):
        """`options`: how the sessions run (provider, thread pool, CPU arena, decode and prefill graphs); `provider`,
        `allow_fallback`, `decode_graphs`, `prefill_graphs` given here override theirs. `lazy`: one graph resident at a
        time (each session created per call: slow, for validating engines that do not fit in memory as a whole). Decode
        and prefill graphs (export/decode_graphs.py) run on the CPU provider only; elsewhere, and when a lazy engine
        runs, the segment graphs do."""
        given = {
            "provider": provider,
            "allow_fallback": allow_fallback,
            "decode_graphs": decode_graphs,
            "prefill_graphs": prefill_graphs,
        }
        self.options = options = replace(
            options or RuntimeOptions(), **{k: v for k, v in given.items() if v is not None}
        )
        self.directory = Path(directory)
        # files are verified below, after the cheap checks
        self.manifest = manifest = EngineManifest.read(self.directory, verify=False)
        m = manifest.raw
        self.spec, self.schedule, self.layout = manifest.model, manifest.schedule, manifest.layout
        self.scheme, self.limits = manifest.weights, manifest.limits
        check_fields(self.spec, self.schedule, self.layout, self.limits.asdict(), manifest.dtype)
        check_paths(self.directory, m)
        self.providers = resolve_providers(
            options.provider, allow_fallback=options.allow_fallback, quantized=self.scheme.quantized
        )
        if self.providers[0] in ("CPUExecutionProvider", OPENVINO) and not lazy:
            check_run_fits(manifest, openvino=self.providers == [OPENVINO])  # refuse now rather than be killed later
        if verify:
            manifest.verify_files()
        check_graphs(self.directory, m, self.spec, self.schedule, self.layout)
        self.embed_tokens = load_embeddings(self.directory, m, self.spec, self.layout)
        self.processor = load_processor(self.directory / "processor", self.spec, self.layout)
        threads.thread_pool(mode=options.thread_pool)  # the process's pool, fixed by its first session
        files = {name: m["graphs"][name]["file"] for name in GRAPHS}
        # The prefill graphs (GQA in every layer but the pivot; the same inputs and outputs) stand in for the segment
        # graphs on ONNX Runtime's CPU provider; OpenVINO, a GPU provider and a lazy engine run the segment graphs.
        self.variants = {
            segment: variant
            for segment, variant in PREFILL_GRAPHS.items()
            if options.prefill_graphs
            and not lazy
            and self.providers[0] == "CPUExecutionProvider"
            and variant in manifest.prefill_graphs
        }
        files |= {segment: m["graphs"][variant]["file"] for segment, variant in self.variants.items()}
        arena = options.cpu_arena

        def load(providers) -> dict:
            return load_graphs(
                {
                    name: partial(
                        _load_graph, self.directory / files[name], providers, lazy, arena=arena, scheme=self.scheme
                    )
                    for name in GRAPHS
                },
                one_at_a_time=lazy,
            )

        try:
            self.graphs = load(self.providers)
        except OpenVinoError as e:
            if options.provider != "auto":
                raise
            # `auto` chose OpenVINO: a graph it cannot compile (an engine of another release, an op it lacks) is run by
            # ONNX Runtime, as before OpenVINO was chosen
            print(f"warning: {e}; running on ONNX Runtime's CPU provider", file=sys.stderr)
            self.providers = PROVIDER_ALIASES["cpu"]
            self.graphs = load(self.providers)
        # The decode graphs run on ONNX Runtime's CPU provider only (their caches are bound as host memory), also
        # beside OpenVINO, whose graphs leave the caches in host memory too; a lazy engine, or one on a GPU provider,
        # decodes with the segment graphs.
        use = options.decode_graphs and not lazy and self.providers[0] in ("CPUExecutionProvider", OPENVINO)
        cpu = PROVIDER_ALIASES["cpu"]
        self.graphs |= load_graphs(
            {
                name: partial(
                    _load_graph, self.directory / m["graphs"][name]["file"], cpu, graph=DecodeGraph, arena=arena
                )
                for name in (manifest.decode_graphs if use else ())
            }
        )
        self.provider = self.graphs["segment0"].provider
        # What the graphs compute in: the engine's dtype, or OpenVINO's inference precision (bfloat16 on a CPU with
        # bfloat16 units); star-validate's eager twin runs in it.
        self.compute_dtype = getattr(self.graphs["segment0"], "compute_dtype", manifest.dtype)
        # The embedding lookup and image merge run where ONNX Runtime runs the graphs; beside OpenVINO (host arrays in
        # and out) and in a lazy engine, NumPy does them.
        self.ops = (
            DeviceOps(self.embed_tokens, self.providers, arena=arena)
            if type(self.graphs["segment0"]) is OrtGraph
            else None
        )
        self.pipeline = StarPipeline(self.graphs, self.embed_tokens, self.schedule, self.layout, self.ops)

    @classmethod
    def from_dir(cls, directory: str | Path, options: RuntimeOptions | None = None, **kwargs) -> "Engine":
        return cls(directory, options, **kwargs)

    def prepare(self, images: Sequence[Any], prompts: Sequence[str]) -> dict[str, np.ndarray]:
        lim = self.limits
        if len(prompts) > lim.max_batch_size:
            raise InputError(
                f"{len(prompts)} prompts exceed this engine's max batch size {lim.max_batch_size}: "
                "send fewer per call, or rebuild with a larger --max-batch-size"
            )
        inputs = prepare_inputs(self.processor, images, prompts)
        lengths = inputs["attention_mask"].sum(-1)
        if lengths.max() > lim.max_input_len:
            raise InputError(
                f"prompt of {int(lengths.max())} tokens (with {self.spec.num_vision_tokens} image tokens) exceeds this "
                f"engine's max input length {lim.max_input_len}: shorten it, or rebuild with a larger --max-input-len"
            )
        return inputs

    def stream(self, images, prompts, sampling: Sampling = Sampling()):
        """Yields (tokens of this step (B,), Generation so far) after every step."""
        if sampling.max_new_tokens > self.limits.max_new_tokens:
            raise InputError(
                f"max_new_tokens={sampling.max_new_tokens} exceeds this engine's limit {self.limits.max_new_tokens}: "
                "ask for fewer, or rebuild with a larger --max-new-tokens"
            )
        inputs = self.prepare(images, prompts)
        yield from self.pipeline.stream(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], sampling)

    def generate(self, images, prompts, sampling: Sampling = Sampling()) -> Generation:
        result = None
        for _, result in self.stream(images, prompts, sampling):
            pass
        return result

    def decode(self, token_ids: list[int]) -> str:
        return self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)


def run_engine(
    engine_dir,
    *,
    images,
    prompts,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    options: RuntimeOptions = RuntimeOptions(),
    stream: Callable[[str], None] | None = None,
    info: dict | None = None,
) -> list[dict]:
    """Generate for each (image, prompt) pair as one batch; `stream` receives the new text of request 0 per step.
    `max_new_tokens=None`: 64, or the engine's limit if lower. `info`, when given, receives what a summary line
    needs (visual tokens per stage, the source model and whether its weights are random). `options`: how the engine's
    sessions run (provider, thread pool, CPU arena, decode graphs)."""
    # Requests are checked before the engine loads: sampling settings, image files, pairs.
    sampling = Sampling(max_new_tokens=max_new_tokens or 1, temperature=temperature, top_p=top_p, seed=seed)
    images = load_requests(images, prompts, rule_from_engine_dir(engine_dir))
    engine = Engine.from_dir(engine_dir, options)
    if max_new_tokens is None:
        max_new_tokens = min(64, engine.limits.max_new_tokens)
    sampling = replace(sampling, max_new_tokens=max_new_tokens)
    if info is not None:
        S, source = engine.schedule, engine.manifest.source
        info.update(
            visual_tokens=S.num_vision_tokens,
            stage1_keep=S.stage1_keep,
            keep=S.keep,
            model=source.get("name"),
            random_weights=bool(source.get("random_weights")),
        )
    printed, result = "", None
    for _, result in engine.stream(images, prompts, sampling):
        if stream is not None:
            text = engine.decode(result.token_ids[0])
            stream(text[len(printed) :])
            printed = text
    timings = result.timings | {
        "provider": engine.provider,
        "compute_dtype": engine.compute_dtype,
        "decode_graphs": bool(decode_graph_names(engine.graphs)),
        "prefill_graphs": bool(engine.variants),
        "thread_pool": threads.current(),
        "cpu_arena": getattr(engine.graphs["segment0"], "cpu_arena", None),
    }
    return [
        {
            "text": engine.decode(ids),
            "token_ids": ids,
            "stage1_indices": result.stage1_indices[b].tolist(),
            "stage2_indices": result.stage2_indices[b].tolist(),
            "timings": timings,
        }
        for b, ids in enumerate(result.token_ids)
    ]
