"""Memory plans from architecture numbers alone: weights per graph by dtype / scheme, what running the engine on
ONNX Runtime's CPU provider holds, what export and the self-check need; and the refusal, before any weight loads,
of a step this machine cannot hold (instead of an OOM kill).

Rules behind the estimates (measured here; docs/memory.md):
- ONNX Runtime's CPU provider widens float16 weights to float32 at session creation (an fp16 engine of 1.41 GB
  and its fp32 twin of 2.81 GB both ran at ~2.97 GiB), so a float16 engine runs in float32's memory here.
  `MatMulNBits` weights stay packed.
- Export reads each tensor from the memory-mapped checkpoint and writes it cast (onnx_export): it holds a few
  copies of the largest tensor; the mapped checkpoint pages are file-backed (reclaimable, not counted).
- The self-check's reference holds the model three times in memory: float64 (the truth), the engine's dtype
  (its eager twin), and the loaded checkpoint dtype (mapped); a quantized engine's reference adds its float64 twin.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import asdict, dataclass

from .config import QUANTIZED_GRAPHS, ModelSpec, StarSchedule, WeightScheme
from .errors import UserError

GiB = 1 << 30
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
RUNTIME_OVERHEAD = (
    2 * GiB
    # interpreter, torch, transformers, onnxruntime, the loaded model's skeleton, activations (measured ~1.8 GiB with
    # a 7B
    # model)
)


# Validation modes, most thorough first: whole-model references with per-graph checks; layer-streamed references
# (validate_streamed.py) with the whole engine resident; the same with one engine graph resident at a time.
VALIDATION_MODES = ("whole", "streamed", "streamed-lazy")


class MemoryPlanError(UserError):
    """A step needs more memory than the machine has; the message names the numbers and the alternatives."""


@dataclass(frozen=True)
class GraphWeights:
    linear: int  # elements in Linear weights that a quantized scheme packs (decoder segments)
    other: int  # everything else (norms, biases, embeddings, conv, vision / projector Linears)


def graph_weights(spec: ModelSpec, schedule: StarSchedule) -> dict[str, GraphWeights]:
    """Parameter counts of each graph, from the architecture (no weights read)."""
    c, ci, d, m, kv = (
        spec.vision_hidden,
        spec.vision_intermediate,
        spec.hidden_size,
        spec.intermediate_size,
        spec.kv_width,
    )
    tokens = spec.num_patches + 1
    clip_layer = 4 * c * c + 4 * c + 2 * c * ci + ci + c + 4 * c
    vision = (
        3 * c * spec.patch_size**2
        + c
        + tokens * c
        + 2 * c
        + spec.vision_layers_run * clip_layer
        + c * d
        + d
        + d * d
        + d
    )
    layer_linear = 2 * d * d + 2 * d * kv + 3 * d * m
    P, L, V = schedule.pivot_layer, schedule.num_layers, spec.vocab_size
    return {
        "vision": GraphWeights(0, vision),
        "segment0": GraphWeights((P + 1) * layer_linear, (P + 1) * 2 * d),
        "pivot": GraphWeights(0, 0),
        "segment1": GraphWeights((L - P - 1) * layer_linear + V * d, (L - P - 1) * 2 * d + d),
    }


def total_params(spec: ModelSpec, schedule: StarSchedule) -> int:
    """Every parameter of the checkpoint the engine uses, embeddings included (CLIP layers after the feature layer are
    not used and not counted)."""
    return sum(g.linear + g.other for g in graph_weights(spec, schedule).values()) + spec.vocab_size * spec.hidden_size


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    dtype: str
    weights: str
    graph_bytes: dict  # graph -> bytes on disk
    embed_bytes: int
    engine_bytes: int  # all graphs + embeddings, on disk
    run_bytes: int  # star-run on ONNX Runtime's CPU provider
    largest_graph_run_bytes: int  # the largest single graph on the CPU provider (an engine run one graph at a time)
    export_bytes: int  # export alone (--no-validate)
    validation_bytes: dict  # mode -> what validating needs (engine + references), see VALIDATION_MODES

    @property
    def selfcheck_bytes(self) -> int:
        """Export, then the cheapest validation mode (export's buffers are freed before validation starts)."""
        return max(self.export_bytes, min(self.validation_bytes.values()))

    def need(self, validate: bool) -> int:
        return self.selfcheck_bytes if validate else self.export_bytes

    def validation_mode(self, have: int) -> str | None:
        """The first mode (most thorough first) whose need fits in `have` bytes, or None."""
        return next((m for m in VALIDATION_MODES if self.validation_bytes[m] <= have), None)

    def asdict(self) -> dict:
        return asdict(self)


def memory_plan(
    spec: ModelSpec, schedule: StarSchedule, dtype: str, scheme=None, decode_graphs: bool = False
) -> MemoryPlan:
    """`decode_graphs`: the engine has ONNX Runtime decode graphs (export/decode_graphs.py). On disk they share the
    segments' weight files; running, each session holds its own (packed) copy, so the decoder's weights count twice."""
    scheme = scheme or WeightScheme()
    b = DTYPE_BYTES[dtype]
    run_b = 4 if dtype == "float16" else b  # ORT CPU widens float16 weights
    disk, run = {}, {}
    graphs = graph_weights(spec, schedule)
    for name, g in graphs.items():
        q = scheme if name in QUANTIZED_GRAPHS else WeightScheme()
        disk[name] = int(g.linear * q.bytes_per_weight(b) + g.other * b)
        run[name] = int(g.linear * q.bytes_per_weight(run_b) + g.other * run_b)
    largest = max(spec.vocab_size * spec.hidden_size, spec.hidden_size * spec.intermediate_size)
    embed = spec.vocab_size * spec.hidden_size * b
    params = total_params(spec, schedule)
    run_bytes = (
        sum(run.values()) + embed + RUNTIME_OVERHEAD + (run["segment0"] + run["segment1"] if decode_graphs else 0)
    )
    export_bytes = RUNTIME_OVERHEAD + 4 * largest * 4  # one tensor: read, cast, packed, written
    whole_reference = params * (8 + b + (8 if scheme.quantized else 0))
    # streamed: the embedding tables in float64 and float32, the largest unit in float64 plus the copy it is cast
    # from, and activations of one prefill in float64
    streamed_reference = spec.vocab_size * spec.hidden_size * 12 + 3 * largest * 8 + 2 * GiB
    if scheme.quantized:  # the reference keeps the engine's packed weights (streaming.quantized_transform)
        streamed_reference += sum(
            int(g.linear * scheme.bytes_per_weight(b)) for n, g in graphs.items() if n in QUANTIZED_GRAPHS
        )
    # One graph's session, created as LazyOrtGraph does (without constant folding, which would hold the file's float16
    # tensors and their float32 widening at once: 19.16 instead of 13.14 GiB for segment 1 of a 7B float16 engine).
    largest_graph = max(run.values()) + embed + RUNTIME_OVERHEAD
    return MemoryPlan(
        dtype=dtype,
        weights=scheme.kind,
        graph_bytes=disk,
        embed_bytes=embed,
        engine_bytes=sum(disk.values()) + embed,
        run_bytes=run_bytes,
        largest_graph_run_bytes=largest_graph,
        export_bytes=export_bytes,
        validation_bytes={
            "whole": run_bytes + whole_reference,
            "streamed": run_bytes + streamed_reference,
            # one graph at a time, and the engine's run is over before the references start
            "streamed-lazy": max(largest_graph, streamed_reference + RUNTIME_OVERHEAD),
        },
    )


def available_bytes() -> int:
    """MemAvailable (what can be allocated without swapping out others), else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def check_fits(
    spec: ModelSpec,
    schedule: StarSchedule,
    dtype: str,
    scheme,
    validate: bool,
    budget: int | None = None,
    decode_graphs: bool = False,
) -> MemoryPlan:
    """Refuse (MemoryPlanError) a build this machine cannot hold, naming the need and what would fit (alternatives as
    `--decode-graphs auto` builds them)."""
    plan = memory_plan(spec, schedule, dtype, scheme, decode_graphs)
    have = budget if budget is not None else available_bytes()
    if plan.need(validate) <= have:
        return plan
    what = "export with its self-check" if validate else "export"
    options = []
    for d, kind in (("float16", "float"), ("float32", "int8"), ("float32", "int4")):
        alt = memory_plan(
            spec, schedule, d, WeightScheme(kind) if kind != "float" else None, decode_graphs=kind != "float"
        )
        if (d, kind) != (dtype, scheme.kind if scheme else "float") and alt.need(validate) <= have:
            options.append(f"--dtype {d} --weights {kind} ({gib(alt.need(validate))})")
    if validate and plan.export_bytes <= have:
        options.append(
            f"--no-validate (export alone {gib(plan.export_bytes)}; the engine then needs {gib(plan.run_bytes)} to run "
            "on ONNX Runtime's CPU provider; run star-validate where that fits)"
        )
    raise MemoryPlanError(
        f"{what} of this model with --dtype {dtype} --weights {scheme.kind if scheme else 'float'} needs about "
        f"{gib(plan.need(validate))} of memory (engine {gib(plan.engine_bytes)} on disk, {gib(plan.run_bytes)} to run "
        "on the CPU provider"
        + (f", its self-check at least {gib(min(plan.validation_bytes.values()))}" if validate else "")
        + f"); this machine has {gib(have)} available. "
        + (
            "Alternatives that fit: " + "; ".join(options)
            if options
            else "No variant fits here: use a machine with more memory"
        )
        + " (see star-export --dry-run for the plan)"
    )


def validation_mode(
    spec: ModelSpec, schedule: StarSchedule, dtype: str, scheme, budget: int | None = None, decode_graphs: bool = False
) -> str:
    """How star-validate / the self-check can run here (VALIDATION_MODES); refuses up front when no mode fits."""
    plan = memory_plan(spec, schedule, dtype, scheme, decode_graphs)
    have = budget if budget is not None else available_bytes()
    mode = plan.validation_mode(have)
    if mode is None:
        need = min(plan.validation_bytes.values())
        raise MemoryPlanError(
            f"validating this engine needs at least {gib(need)} of memory (one engine graph on the CPU provider "
            f"{gib(plan.largest_graph_run_bytes)} and the layer-streamed references); this machine has {gib(have)} "
            "available: run it on a machine with more memory"
        )
    return mode


# OpenVINO running a float engine holds the file's float32 weights beside its bfloat16 copies: a real-width 4-layer
# float32 engine peaked at 7.24 GiB there against 4.23 GiB on ONNX Runtime's CPU provider (scripts/peers.py).
OPENVINO_FLOAT_FACTOR = 1.75


def check_run_fits(manifest, budget: int | None = None, openvino: bool = False) -> None:
    """Refuse (before any session loads) an engine (its `manifest.EngineManifest`) that cannot run on the CPU provider
    (or, `openvino`, on OpenVINO) in this machine's memory."""
    plan = memory_plan(
        manifest.model, manifest.schedule, manifest.dtype, manifest.weights, bool(manifest.decode_graphs)
    )
    have = budget if budget is not None else available_bytes()
    factor = OPENVINO_FLOAT_FACTOR if openvino and not manifest.weights.quantized else 1.0
    need = int(plan.run_bytes * factor)
    if need - RUNTIME_OVERHEAD > have:  # the weights alone do not fit: certain failure, not an estimate
        raise MemoryPlanError(
            f"this engine needs about {gib(need)} to run on "
            + (
                "OpenVINO (which keeps float32 weights beside bfloat16 copies)"
                if factor > 1
                else "ONNX Runtime's CPU provider"
            )
            + (" (which widens float16 weights to float32)" if plan.dtype == "float16" and factor == 1 else "")
            + f"; this machine has {gib(have)} available: run it with --provider cuda on a GPU machine, or export a "
            "smaller engine (--weights int4 / int8)"
        )


def format_memory(plan: MemoryPlan) -> str:
    lines = [f"memory plan (--dtype {plan.dtype} --weights {plan.weights}):"]
    for name, n in plan.graph_bytes.items():
        lines.append(f"  {name:9s} weights {n / 2**20:12.1f} MiB")
    lines.append(f"  embed     table   {plan.embed_bytes / 2**20:12.1f} MiB")
    lines.append(
        f"  engine on disk {gib(plan.engine_bytes)}; star-run on the CPU provider about {gib(plan.run_bytes)}"
        + (" (float16 weights are widened to float32 there)" if plan.dtype == "float16" else "")
    )
    have = available_bytes()
    modes = ", ".join(f"{m} {gib(n)}" for m, n in plan.validation_bytes.items())
    lines.append(f"  export peak about {gib(plan.export_bytes)} (--no-validate); validation needs: {modes}")
    lines.append(
        f"  this machine has {gib(have)} available: the self-check would run "
        + (f"in mode '{plan.validation_mode(have)}'" if plan.validation_mode(have) else "in no mode (refused)")
    )
    return "\n".join(lines)


LARGE_ALLOCATION = 1 << 20  # bytes from which a server process's allocations are mapped (and unmapped when freed)


def return_large_frees() -> bool:
    """In a long-running server: allocations of LARGE_ALLOCATION bytes or more get pages of their own, returned to the
    system when freed. glibc's default raises its mmap threshold to the largest block freed (up to 32 MiB), after which
    an image decode's buffers (Pillow's 16 MiB blocks, numpy arrays) come from per-thread heaps that keep the memory:
    measured here, four 16-bit 8000 x 8000 PNGs left star-serve 530 MiB above idle for good (1.07x of idle with this).
    False where the C library has no mallopt (not glibc)."""
    M_MMAP_THRESHOLD = -3  # fixing it also stops glibc's dynamic adjustment
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION))


# ------------------------------------------------------------------ pages of memory-mapped weights

MADV_PAGEOUT = 21
PAGE = 4096
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux / glibc: pages stay until the kernel reclaims them
    _libc = None


def release_pages(tensor) -> None:
    """Advise the kernel to reclaim the pages behind `tensor` (non-destructive: mapped file pages are re-read on the
    next access, anonymous ones are never dropped). Best effort; errors are ignored."""
    if _libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    aligned = start - start % PAGE
    _libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(end - aligned), MADV_PAGEOUT)
