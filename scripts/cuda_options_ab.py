#!/usr/bin/env python
"""The two CUDA provider options star-export sets (runtime/sessions.py PROVIDER_OPTIONS), measured on a GPU.

    python scripts/cuda_options_ab.py ENGINE [--calls 4] [--out FILE]

1. `use_tf32`: a float32 MatMul (256 x 256) on the CUDA provider with ONNX Runtime's default and with use_tf32 0,
   each as ||y - y64|| / ||y64|| against float64.
2. `cudnn_conv_algo_search`: ENGINE (a float16 engine from star-export) on the CUDA provider, one process per
   setting (EXHAUSTIVE, ONNX Runtime's default; HEURISTIC; DEFAULT) and per call order (batch 1 calls then batch 4
   calls, or the two alternating, as a server's batches do), after one warm-up call of each batch; median vision /
   prefill / decode ms per batch.
Needs torch with CUDA and onnxruntime-gpu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ALGOS = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
ORDERS = ("grouped", "alternating")


def tf32_errors() -> dict:
    import numpy as np
    import onnxruntime as ort

    from bench import matmul_model

    n = 256
    a, b = np.random.default_rng(0).standard_normal((2, n, n)).astype(np.float32)
    model = matmul_model(n, b)  # A @ b, b an initializer
    truth = a.astype(np.float64) @ b.astype(np.float64)
    result = {}
    for label, options in (("ORT default", {}), ("use_tf32 0", {"use_tf32": "0"})):
        s = ort.InferenceSession(model, providers=[("CUDAExecutionProvider", options)])
        y = s.run(None, {"A": a})[0]
        result[label] = float(np.linalg.norm(y - truth) / np.linalg.norm(truth))
    return result


def child(engine: str, algo: str, order: str, calls: int) -> dict:
    from star_export.runtime import sessions
    from star_export.runtime.engine import Engine
    from star_export.runtime.generate import Sampling
    from star_export.runtime.inputs import synthetic_image

    sessions.PROVIDER_OPTIONS["CUDAExecutionProvider"] = sessions.PROVIDER_OPTIONS["CUDAExecutionProvider"] | {"cudnn_conv_algo_search": algo}
    e = Engine.from_dir(engine, provider="cuda")
    prompt = "Describe the objects, their colours and positions, and anything unusual in this picture."
    feeds = {b: e.prepare([synthetic_image(i) for i in range(b)], [prompt] * b) for b in (1, 4)}

    def call(b: int) -> tuple[float, float, float]:
        f = feeds[b]
        t = e.pipeline.generate(f["pixel_values"], f["input_ids"], f["attention_mask"], Sampling(max_new_tokens=8, stop_at_eos=False)).timings
        return t["vision_s"] * 1e3, t["prefill_s"] * 1e3, t["decode_s"] / t["decode_steps"] * 1e3

    call(1), call(4)
    sequence = [1, 4] * calls if order == "alternating" else [1] * calls + [4] * calls
    times = {1: [], 4: []}
    for b in sequence:
        times[b].append(call(b))
    return {f"batch {b}": dict(zip(("vision_ms", "prefill_ms", "decode_ms"), (round(statistics.median(x[k] for x in v), 2) for k in range(3))))
            for b, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine")
    p.add_argument("--calls", type=int, default=4, help="timed calls per batch size")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("ALGO", "ORDER"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.engine, *a.child, a.calls)))
        return 0
    result = {"tf32_matmul_error": tf32_errors(), "conv_algo_search": {}}
    for algo in ALGOS:
        for order in ORDERS:
            run = subprocess.run([sys.executable, __file__, a.engine, "--calls", str(a.calls), "--child", algo, order], capture_output=True, text=True)
            if run.returncode:
                print(run.stderr[-2000:], file=sys.stderr)
                return run.returncode
            result["conv_algo_search"][f"{algo} {order}"] = json.loads(run.stdout.strip().splitlines()[-1])
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
