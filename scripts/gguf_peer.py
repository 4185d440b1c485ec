#!/usr/bin/env python
"""llama.cpp's files for one LLaVA-1.5 checkpoint (published llava-hf layout), for scripts/peers.py:
WORK/llama-cpp/text-q4_0.gguf and text-q8_0.gguf (the language model; `--quants`) and mmproj-f16.gguf (CLIP + projector).

    python scripts/gguf_peer.py --model MODEL --work WORK --llama-cpp DIR   # DIR: llama.cpp's source tree

The language model goes through llama.cpp's `convert_hf_to_gguf.py` (it reads LlavaForConditionalGeneration's text
part) to float16, then llama-cpp-python's `llama_model_quantize` to Q4_0 / Q8_0. Its converter rejects LLaVA-1.5's
tower (`--mmproj`), so the tower takes llama.cpp's legacy route: the CLIP vision weights as a CLIPVisionModel directory
and the projector as a `llava.projector` file (what `llava_surgery_v2.py` makes of the original LLaVA layout), then
`convert_image_encoder_to_gguf.py --clip-model-is-vision` with the checkpoint's feature layer, mean and std.
Tensors are read one at a time from the safetensors shards (a full-depth checkpoint does not have to fit in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# published names (`vision_tower.vision_model.*`), transformers 5's (`vision_tower.*`, `model.vision_tower.*`)
VISION_PREFIXES = ("vision_tower.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def shards(model: Path) -> list[Path]:
    index = model / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(model.glob("*.safetensors"))


def split_tower(model: Path, out: Path) -> None:
    """The CLIP vision tower as a CLIPVisionModel directory and the projector as `llava.projector`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig

    vision, projector = {}, {}
    for shard in shards(model):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                for prefix in VISION_PREFIXES:
                    if name.startswith(prefix):
                        # CLIPVisionModel's names as transformers 4 (llama.cpp's converter) reads them
                        key = name[len(prefix):]
                        key = key if key.startswith("vision_model.") else "vision_model." + key
                        vision[key] = f.get_tensor(name).float().contiguous()
                for prefix in PROJECTOR_PREFIXES:
                    if name.startswith(prefix):
                        projector["multi_modal_projector." + name[len(prefix):]] = f.get_tensor(name).float()
    if not vision or len(projector) != 4:
        raise SystemExit(f"{model}: no LLaVA vision tower / two-layer projector found")
    config = json.loads((model / "config.json").read_text())
    # the published config lists only what differs from CLIP's defaults; the converter reads every field
    vision_config = CLIPVisionConfig(**config["vision_config"]).to_dict() | {"architectures": ["CLIPVisionModel"]}
    vision_config["vision_feature_layer"] = config.get("vision_feature_layer", -2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(vision_config, indent=1))
    save_file(vision, str(out / "model.safetensors"))
    torch.save(projector, out / "llava.projector")


def image_norm(model: Path) -> tuple[list[float], list[float]]:
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = model / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg = cfg.get("image_processor", cfg)
            if "image_mean" in cfg:
                return cfg["image_mean"], cfg["image_std"]
    return [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # CLIP's


def run(cmd: list[str], log: Path, env: dict) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    with open(log, "a") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
            raise SystemExit(f"failed: {' '.join(cmd)}; see {log}")


def quantize(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 1
    tmp = dst.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params):
        raise SystemExit(f"llama_model_quantize {ftype} failed")
    tmp.rename(dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp's source tree (its Python converters)")
    p.add_argument("--quants", nargs="+", default=["Q4_0", "Q8_0"], choices=["Q4_0", "Q8_0"])
    a = p.parse_args(argv)
    out = a.work / "llama-cpp"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "convert.log"
    env = os.environ | {"PYTHONPATH": str(a.llama_cpp / "gguf-py")}
    f16 = out / "text-f16.gguf"
    if not all((out / f"text-{q.lower()}.gguf").is_file() for q in a.quants):
        if not f16.is_file():
            run([sys.executable, str(a.llama_cpp / "convert_hf_to_gguf.py"), str(a.model), "--outtype", "f16",
                 "--outfile", str(f16)], log, env)
        for q in a.quants:
            if not (out / f"text-{q.lower()}.gguf").is_file():
                quantize(f16, out / f"text-{q.lower()}.gguf", q)
        f16.unlink()
    if not (out / "mmproj-f16.gguf").is_file():
        vit = out / "vit"
        split_tower(a.model, vit)
        mean, std = image_norm(a.model)
        run([sys.executable, str(a.llama_cpp / "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"),
             "-m", str(vit), "--llava-projector", str(vit / "llava.projector"), "--output-dir", str(vit),
             "--clip-model-is-vision", "--image-mean", *map(str, mean), "--image-std", *map(str, std)], log, env)
        (vit / "mmproj-model-f16.gguf").rename(out / "mmproj-f16.gguf")
        for f in vit.iterdir():
            f.unlink()
        vit.rmdir()
    print(f"llama.cpp files ready in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
