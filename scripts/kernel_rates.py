#!/usr/bin/env python
"""The decode step's weight kernels alone, against the weight-read floor of the same moment: what no graph change removes.

A decode step's weight products are one-row matmuls of a handful of shapes (at LLaVA-1.5-7B's widths, the default of
`--widths`: q, k, v, o 4096x4096; gate, up 4096x11008; down 11008x4096 per layer; lm_head 4096x32064 once). For each
shape, one ONNX Runtime session per kernel configuration: float32 `MatMul`, and `MatMulNBits` at each `--schemes` entry
(bits / block size / accuracy level, packed as star-export packs them). A session holds R products of its shape side
by side, each with its own weights (the one packing rotated, so that every copy is other memory), R the fewest that
hold `--mib` MiB: one run reads them all once, from memory, as a step reads its layers (the copies exceed the caches),
and its per-run cost (Python, waking the threads) is spread over R products as a step's is over its layers. Each run is
timed right after a float32 GEMV of `--floor-gib` GiB (1: decode_split.py's floor, which also evicts the last run's
weights) and taken against that GEMV's bandwidth:

    over_floor = run_s * bandwidth / weight_bytes - 1   (the weight bytes: the initializers the run reads)

per run, then summarised as median (min-max) over the rounds. `step` weights the shapes as a decode step of `--layers`
layers and the lm_head does (each product at its own run's bandwidth), per round: the overhead beyond the weight reads
that the weight kernels alone carry, a lower bound for decode_split.py's `overhead_beyond_weights` of an engine with
those kernels on this machine; for the layers' products as star-export's graphs run them (`separate`) and with q, k, v
as one product and gate, up as one (`fused`). Rounds visit the sessions in a rotated order. Threads: ONNX Runtime's
shared pool, as the star-* commands run, unless $STAR_ORT_THREAD_POOL says otherwise (runtime/threads.py; recorded).

    python scripts/kernel_rates.py [--schemes int4/128/4 int4/256/4 int8/128/4] [--rounds 15] [--mib 128] [--layers 4]
        [--widths 4096 11008 32064] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from bench import emit, summary  # noqa: E402
from decode_split import Gemv  # noqa: E402
from star_export.export.quantize import WeightScheme, engine_packing  # noqa: E402
from star_export.runtime.threads import claim_process, thread_pool  # noqa: E402

WIDTHS_7B = (4096, 11008, 32064)  # LLaVA-1.5-7B's hidden, intermediate, vocab


def layouts(hidden: int, intermediate: int) -> dict[str, list[tuple[tuple[int, int], int]]]:
    """How a decoder layer's weight products are laid out: (K, N) and calls per layer. "separate": as star-export's graphs
    run them (q, k, v, o; gate, up; down); "fused": q, k, v as one product and gate, up as one (what a graph with packed
    projections would run), for comparison in the same rounds. Pairs, not a dict: two products may have one shape."""
    h, i = hidden, intermediate
    return {"separate": [((h, h), 4), ((h, i), 2), ((i, h), 1)], "fused": [((h, 3 * h), 1), ((h, h), 1), ((h, 2 * i), 1), ((i, h), 1)]}


def parse_scheme(text: str) -> WeightScheme:
    """'int4/128/4' -> WeightScheme('int4', block_size=128, accuracy_level=4)."""
    try:
        kind, block, level = text.split("/")
        scheme = WeightScheme(kind, block_size=int(block), accuracy_level=int(level))
    except ValueError as e:
        raise SystemExit(f"--schemes {text!r}: allowed BITS/BLOCK/LEVEL, e.g. int4/128/4 ({e})")
    if not scheme.quantized:
        raise SystemExit(f"--schemes {text!r}: int8 or int4 (float32 is always measured)")
    return scheme


def products_model(scheme: WeightScheme | None, weight_nk: np.ndarray, min_bytes: int) -> tuple[bytes, int, int]:
    """A graph of R products `A [1, K] @ W_r` (float32 MatMul where `scheme` is None, else MatMulNBits packed as the
    engine packs), each W_r its own tensor (copy r: the packing rotated by r elements), R the fewest whose weights hold
    `min_bytes`. Returns (serialized ONNX, R, weight bytes of all R)."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = weight_nk.shape
    if scheme is None:
        tensors, attrs, op, domain = [np.ascontiguousarray(weight_nk.T)], {}, "MatMul", ""
    else:
        packed, scales, zp = engine_packing(weight_nk, scheme, "float32")
        tensors = [packed, scales] + ([] if zp is None else [zp])
        attrs, op, domain = {"K": k, "N": n, "bits": scheme.bits, "block_size": scheme.block_size}, "MatMulNBits", "com.microsoft"
        if scheme.accuracy_level:
            attrs["accuracy_level"] = scheme.accuracy_level
    one = sum(t.nbytes for t in tensors)
    copies = max(1, -(-min_bytes // one))
    inits, nodes = [], []
    for r in range(copies):
        names = [f"w{r}_{i}" for i in range(len(tensors))]
        inits += [numpy_helper.from_array(np.roll(t.reshape(-1), r).reshape(t.shape) if i == 0 else t, name) for i, (t, name) in enumerate(zip(tensors, names))]
        nodes.append(helper.make_node(op, ["A", *names], [f"Y{r}"], domain=domain, **attrs))
    graph = helper.make_graph(nodes, "products", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(f"Y{r}", TensorProto.FLOAT, [1, n]) for r in range(copies)], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString(), copies, one * copies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", nargs="+", default=["int4/128/4", "int4/256/4", "int8/128/4"], help="BITS/BLOCK/ACCURACY_LEVEL each")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--mib", type=int, default=128, help="weights per session: products of a shape are repeated to reach this")
    p.add_argument("--widths", type=int, nargs=3, default=list(WIDTHS_7B), metavar=("HIDDEN", "INTERMEDIATE", "VOCAB"))
    p.add_argument("--floor-gib", type=float, default=1.0, help="the floor's float32 GEMV (it must exceed the caches)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the step that `step` weights the shapes for")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.rounds < 2 or a.layers < 1 or a.mib < 1 or min(a.widths) < 16 or a.floor_gib <= 0:
        raise SystemExit("--rounds >= 2, --layers >= 1, --mib >= 1 and --widths >= 16 each, --floor-gib > 0")
    schemes = [parse_scheme(s) for s in a.schemes]
    claim_process()
    pool = thread_pool(a.threads)
    import onnxruntime as ort

    from star_export.runtime.sessions import session_options

    gemv = Gemv(a.threads, a.floor_gib)
    rng = np.random.default_rng(0)
    hidden, intermediate, vocab = a.widths
    counts = {}  # layout -> (K, N) -> products per step
    for name, layout in layouts(hidden, intermediate).items():
        counts[name] = Counter({(hidden, vocab): 1})  # the lm_head
        for shape, count in layout:
            counts[name][shape] += count * a.layers
    shapes = list(dict.fromkeys(shape for calls in counts.values() for shape in calls))
    kernels = {}  # (config, shape) -> (session, feed, weight bytes of its products, products)
    for k, n in shapes:
        w = rng.standard_normal((n, k), dtype=np.float32) * 0.02
        x = {"A": rng.standard_normal((1, k), dtype=np.float32)}
        for config, scheme in [("float32", None)] + [(f"{s.kind}/{s.block_size}/{s.accuracy_level}", s) for s in schemes]:
            model, copies, nbytes = products_model(scheme, w, a.mib * 2**20)
            session = ort.InferenceSession(model, session_options(a.threads), providers=["CPUExecutionProvider"])
            del model
            kernels[config, (k, n)] = (session, x, nbytes, copies)
            session.run(None, x)  # warm-up
        del w
        print(f"{k}x{n}: {1 + len(schemes)} kernels", file=sys.stderr)
    configs = list(dict.fromkeys(c for c, _ in kernels))
    keys = list(kernels)
    moved: dict[tuple, list[float]] = {key: [] for key in keys}  # per round: run seconds x the floor's bandwidth (bytes)
    rates = []
    for r in range(a.rounds):
        rotated = keys[r % len(keys):] + keys[: r % len(keys)]
        for key in rotated:
            session, x, _, _ = kernels[key]
            rate = gemv.bandwidth()
            t = time.perf_counter()
            session.run(None, x)
            moved[key].append((time.perf_counter() - t) * rate)
            rates.append(rate)
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)

    def kernel_over(key) -> dict:
        return summary([m / kernels[key][2] - 1 for m in moved[key]])

    def step_over(config: str, layout: str) -> dict:  # per round: the step's products, each at its own run's bandwidth
        share = {shape: count / kernels[config, shape][3] for shape, count in counts[layout].items()}  # a run's products -> the step's
        read = sum(kernels[config, shape][2] * f for shape, f in share.items())
        return summary([sum(moved[config, shape][r] * f for shape, f in share.items()) / read - 1 for r in range(a.rounds)])

    result = {
        "command": "python scripts/kernel_rates.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "widths": {"hidden": hidden, "intermediate": intermediate, "vocab": vocab},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": a.threads,
                    "thread_pool": pool, "onnxruntime": ort.__version__},
        "rounds": a.rounds,
        "gemv_bandwidth_gb_s": summary([r / 1e9 for r in rates]),
        "step": {"layers": a.layers, "calls": {name: {f"{k}x{n}": c for (k, n), c in calls.items()} for name, calls in counts.items()},
                 "over_floor": {c: {layout: step_over(c, layout) for layout in counts} for c in configs}},
        "kernels": {c: {f"{k}x{n}": {"weight_bytes": kernels[c, (k, n)][2], "products": kernels[c, (k, n)][3], "over_floor": kernel_over((c, (k, n)))}
                        for k, n in shapes} for c in configs},
    }
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
