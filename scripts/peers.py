#!/usr/bin/env python
"""star-export against what a CPU user would run instead, on one checkpoint, one image, one prompt: HF transformers
`generate` (bfloat16, float32), OpenVINO GenAI `VLMPipeline` (`optimum-cli export openvino`, int4 / int8), llama.cpp
through llama-cpp-python (Q4_0 / Q8_0 GGUF, float16 CLIP; in .llama-venv), and star-export engines (int4, int8 and
float32, on the `auto` provider and on the other CPU one).

Every measurement is a fresh process (`--one NAME`): it loads the runtime (timed), makes one warm-up call on the
mirrored image, then one timed call, and reports its time to the first token (image preprocessing included), decode ms/token, prompt tokens
and the process's peak RSS. Rounds interleave the configurations (A B C ... A B C ...); each figure is the median with
min-max over rounds. The prompt token counts are printed so that a runtime that skipped the image shows.

    bash scripts/setup_peers.sh MODEL WORK        # once: OpenVINO GenAI exports, llama.cpp build + GGUF files
    python scripts/peers.py --model MODEL --work WORK [--rounds 3] [--tokens 32] [--threads 2] [--out docs/benchmarks/peers]

Engines are exported into WORK on first use (star-export --no-validate; validate them with star-validate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "Describe the objects, their colours and positions, and anything unusual in this picture."
LLAMA_VENV = Path(__file__).resolve().parents[1] / ".llama-venv"
ISAS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


# ------------------------------------------------------------------ one measurement (in its own process)
def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def star_runner(engine_dir: str, provider: str, threads: int, decode_graphs: bool = True):
    from star_export.config import RuntimeOptions
    from star_export.runtime.engine import Engine
    from star_export.runtime.generate import Sampling
    from star_export.runtime.threads import claim_process

    claim_process()
    engine = Engine(engine_dir, RuntimeOptions(provider=provider, decode_graphs=decode_graphs), verify=False)

    def run(image, tokens):
        t0 = time.perf_counter()
        stamps, prompt = [], None
        for _, result in engine.stream([image], [QUESTION], Sampling(max_new_tokens=tokens, stop_at_eos=False)):
            stamps.append(time.perf_counter())
        prompt = len(engine.prepare([image], [QUESTION])["input_ids"][0])
        used = {"provider": engine.provider, "compute_dtype": engine.compute_dtype}
        return t0, stamps, prompt, used | {"decode_graphs": any(n.startswith("decode") for n in engine.graphs)}

    return run


def hf_runner(model_dir: str, dtype: str, threads: int):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):  # first call: the prompt; then one per new token
            self.calls += 1
            if self.calls > 1:
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(image, tokens):
        t0 = time.perf_counter()
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        stamps = Stamps()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=stamps)
        return t0, stamps.times, int(inputs["input_ids"].shape[1]), {}

    return run


def ov_genai_runner(ov_dir: str, threads: int):
    import numpy as np
    import openvino as ov
    import openvino_genai

    pipe = openvino_genai.VLMPipeline(ov_dir, "CPU", INFERENCE_NUM_THREADS=threads)

    def run(image, tokens):
        config = openvino_genai.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = tokens
        stamps = []

        def streamer(_text):
            stamps.append(time.perf_counter())
            return openvino_genai.StreamingStatus.RUNNING

        t0 = time.perf_counter()
        tensor = ov.Tensor(np.asarray(image.convert("RGB"))[None])
        result = pipe.generate(QUESTION, images=[tensor], generation_config=config, streamer=streamer)
        end = time.perf_counter()
        metrics = result.perf_metrics
        first = t0 + (metrics.get_inference_duration().mean - metrics.get_generate_duration().mean) / 1e3
        first = stamps[0] if stamps else first
        # tokens generated: the metrics' count (the streamer is called per printable text chunk, not per token)
        n = metrics.get_num_generated_tokens()
        ticks = [first] + [first + (end - first) * (i + 1) / max(n - 1, 1) for i in range(n - 1)]
        return t0, ticks, int(metrics.get_num_input_tokens()), {"ttft_ms_reported": metrics.get_ttft().mean}

    return run


def llama_cpp_runner(gguf: str, mmproj: str, threads: int):
    """llama-cpp-python as its users run LLaVA-1.5: `Llama` + `Llava15ChatHandler` (mtmd), streamed chat completion,
    greedy. The handler's default system message is dropped so that the prompt is llava-hf's template."""
    import base64
    import io

    import llama_cpp
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    class Handler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None

    handler = Handler(clip_model_path=mmproj, verbose=False)
    llm = llama_cpp.Llama(model_path=gguf, chat_handler=handler, n_ctx=2048, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    handler._init_mtmd_context(llm)  # otherwise done by the first call: count it as loading
    eos = llm.token_eos()

    def run(image, tokens):
        t0 = time.perf_counter()
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": QUESTION}]}]
        stamps, prompt = [], 0
        for chunk in llm.create_chat_completion(messages, max_tokens=tokens, temperature=0.0, repeat_penalty=1.0,
                                                logit_bias={str(eos): -100.0}, stream=True):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None:
                stamps.append(time.perf_counter())
                prompt = prompt or llm.n_tokens
        # chunks are text pieces (a piece can hold more than one token); spread the tokens over the stream like the
        # OpenVINO GenAI runner does
        end, first = stamps[-1], stamps[0]
        ticks = [first] + [first + (end - first) * (i + 1) / max(tokens - 1, 1) for i in range(tokens - 1)]
        return t0, ticks, int(prompt), {"chunks": len(stamps), "provider": f"llama-cpp-python {llama_cpp.__version__}"}

    return run


def measure_one(spec: dict, image_path: str, tokens: int, threads: int) -> dict:
    from PIL import Image, ImageOps

    image = Image.open(image_path).convert("RGB")
    image.load()
    t = time.perf_counter()
    kind = spec["kind"]
    if kind == "star":
        run = star_runner(spec["path"], spec["provider"], threads, spec.get("decode_graphs", True))
    elif kind == "hf":
        run = hf_runner(spec["path"], spec["dtype"], threads)
    elif kind == "llama-cpp":
        run = llama_cpp_runner(spec["path"], spec["mmproj"], threads)
    else:
        run = ov_genai_runner(spec["path"], threads)
    load_s = time.perf_counter() - t
    # Warm-up on another picture of the same size: OpenVINO GenAI keeps the last call's KV cache and reuses it for the
    # same image (measured: the same image and prompt again reached the first token in 0.2 s instead of 2.5 s).
    run(ImageOps.mirror(image), tokens)
    t0, stamps, prompt, extra = run(image, tokens)
    return {
        "load_s": load_s,
        "ttft_ms": (stamps[0] - t0) * 1e3,
        "decode_ms": (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3,
        "new_tokens": len(stamps),
        "prompt_tokens": prompt,
        "peak_rss_gib": peak_rss_gib(),
        **extra,
    }


# ------------------------------------------------------------------ the run
def configurations(a) -> dict[str, dict]:
    work = Path(a.work)
    star = {
        f"star-int4-k{a.keep}": ("int4", a.keep, "auto"),
        f"star-int4-k{a.keep}-onnxruntime": ("int4", a.keep, "cpu"),
        "star-int4-k576": ("int4", 576, "auto"),
        f"star-int8-k{a.keep}": ("int8", a.keep, "auto"),
        f"star-f32-k{a.keep}": ("float", a.keep, "auto"),
        f"star-f32-k{a.keep}-openvino": ("float", a.keep, "openvino"),
    }
    out = {
        name: {"kind": "star", "path": str(work / f"star-{w}-k{k}"), "weights": w, "keep": k, "provider": p}
        for name, (w, k, p) in star.items()
    }
    # the int4 engine on OpenVINO without its ONNX Runtime decode graphs (less memory and load, slower steps)
    for w in ("int4", "int8"):
        out[f"star-{w}-k{a.keep}-openvino-segments"] = out[f"star-{w}-k{a.keep}"] | {"provider": "openvino", "decode_graphs": False}
    out |= {f"hf-{d}": {"kind": "hf", "path": a.model, "dtype": d} for d in ("bfloat16", "float32")}
    out |= {f"openvino-genai-{w}": {"kind": "ov", "path": str(work / f"ov-{w}")} for w in ("int4", "int8")}
    # llama.cpp runs in a venv of its own (setup_peers.sh: llama.cpp's converters pin transformers 4)
    llama = work / "llama-cpp"
    out |= {f"llama-cpp-{q}": {"kind": "llama-cpp", "path": str(llama / f"text-{q}.gguf"), "mmproj": str(llama / "mmproj-f16.gguf"),
                               "python": str(LLAMA_VENV / "bin/python")} for q in ("q4_0", "q8_0")}
    return {k: v for k, v in out.items() if not a.only or k in a.only}


def export_engines(a, configs: dict) -> None:
    for spec in configs.values():
        if spec["kind"] != "star" or (Path(spec["path"]) / "star.json").is_file():
            continue
        weights = [] if spec["weights"] == "float" else ["--weights", spec["weights"]]
        cmd = ["star-export", "--model", a.model, "--keep", str(spec["keep"]), "--out", spec["path"], "--no-validate",
               "--quiet", "--max-batch-size", "1", "--max-new-tokens", str(a.tokens), "--max-input-len", "700", *weights]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], check=True)


def lscpu() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"model": fields.get("Model name", "").strip(), "family": fields.get("CPU family", "").strip(),
            "model_number": fields.get("Model", "").strip(), "cpus": fields.get("CPU(s)", "").strip(),
            "isa": [f for f in ISAS if f in flags]}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})" if values else "-"


def write(out: Path, meta: dict, results: dict) -> str:
    lines = [f"# star-export and its CPU peers ({meta['date']})", "",
             f"`lscpu`: {meta['cpu']['model']}, {meta['cpu']['cpus']} CPUs, {' '.join(meta['cpu']['isa'])}; "
             f"{meta['threads']} threads; {meta['rounds']} rounds, fresh process per measurement after a warm-up call; "
             f"{meta['tokens']} new tokens; model {meta['model']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
             f"Command: `{meta['command']}`", "",
             "| runtime | time to first token ms | decode ms/token | load s | peak RSS GiB | prompt tokens | runs on |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append(f"| {name} | failed: {runs[-1]['error'][:120]} | | | | | |")
            continue
        col = {k: [r[k] for r in ok] for k in ("ttft_ms", "decode_ms", "load_s", "peak_rss_gib")}
        where = ok[0].get("provider", "") + (f" ({ok[0]['compute_dtype']})" if ok[0].get("compute_dtype") else "")
        where += " + ONNX Runtime decode graphs" if ok[0].get("decode_graphs") and "OpenVINO" in where else ""
        lines.append(
            f"| {name} | {summary(col['ttft_ms'])} | {statistics.median(col['decode_ms']):.1f} | "
            f"{statistics.median(col['load_s']):.1f} | {max(col['peak_rss_gib']):.2f} | "
            f"{sorted({r['prompt_tokens'] for r in ok})} | {where} |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.md").write_text(text)
    (out / "peers.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the checkpoint (published llava-hf layout)")
    p.add_argument("--work", required=True, help="engines and OpenVINO GenAI exports (setup_peers.sh)")
    p.add_argument("--keep", type=int, default=58)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "star_export/assets/example.png"))
    p.add_argument("--only", nargs="*", default=None, help="configuration names (default: all)")
    p.add_argument("--out", default="docs/benchmarks/peers")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a single measurement, in this process
    a = p.parse_args(argv)
    configs = configurations(a)
    if a.one:
        print(json.dumps(measure_one(configs[a.one], a.image, a.tokens, a.threads)))
        return 0
    export_engines(a, configs)
    env = os.environ | {"OMP_NUM_THREADS": str(a.threads)}
    results: dict[str, list] = {name: [] for name in configs}
    for r in range(a.rounds):
        for name in configs:
            cmd = [configs[name].get("python", sys.executable), __file__, *(argv if argv is not None else sys.argv[1:]), "--one", name]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                results[name].append({"error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r} {name}: {results[name][-1]}", file=sys.stderr)
    from importlib.metadata import version

    packages = ("onnxruntime", "openvino", "openvino-genai", "torch", "transformers")
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": lscpu(), "versions": {p: version(p) for p in packages}, "threads": a.threads, "rounds": a.rounds,
            "tokens": a.tokens, "model": a.model, "command": " ".join(["python scripts/peers.py", *(argv or sys.argv[1:])])}
    print(write(Path(a.out), meta, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
