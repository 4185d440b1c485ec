"""A Triton Inference Server model repository for an engine directory: one Python-backend model whose `model.py`
loads our `Engine` and serves it through star-serve's scheduler (continuous batching), decoupled for streaming.

Inputs follow TensorRT-LLM's multimodal ensemble names where they fit: `text_input`, `image_bytes_input` (the encoded
image file, UINT8), `max_tokens`, `temperature`, `top_p`, `random_seed`, `stream`. Outputs: `text_output`,
`output_ids`, and the kept visual tokens `stage1_indices` / `stage2_indices`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError
from ..manifest import EngineManifest

MODEL_PY = '''"""{what} (written by star-export; see star_export/serve/triton_model.py)."""
from star_export.serve.triton_model import {cls} as TritonPythonModel  # noqa: F401
'''
STREAM_SUFFIX = "_stream"

KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
MAX_QUEUE_DELAY_US = 5000  # how long Triton holds a request to batch it with others (5 ms: a few decode steps)

INPUTS = (  # name, type, dims, optional
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    (
        "image_bytes_input",
        "TYPE_UINT8",
        "[ -1 ]",
        True,
    ),  # optional so that a request without it gets our error, not Triton's
    ("max_tokens", "TYPE_INT32", "[ 1 ]", True),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("top_p", "TYPE_FP32", "[ 1 ]", True),
    ("random_seed", "TYPE_UINT64", "[ 1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
)
OUTPUTS = (
    ("text_output", "TYPE_STRING", "[ 1 ]"),
    ("output_ids", "TYPE_INT32", "[ -1 ]"),
    ("stage1_indices", "TYPE_INT64", "[ -1 ]"),
    ("stage2_indices", "TYPE_INT64", "[ -1 ]"),
)


def _tensor(name: str, type_: str, dims: str, optional: bool = False) -> str:
    return f'  {{ name: "{name}" data_type: {type_} dims: {dims}{" optional: true" if optional else ""} }}'


def config_pbtxt(
    name: str, max_batch_size: int, kind: str, parameters: dict[str, str], decoupled: bool, note: str
) -> str:
    preferred = sorted({max(1, max_batch_size // 2), max_batch_size})
    inputs = ",\n".join(_tensor(*t) for t in INPUTS if decoupled or t[0] != "stream")
    outputs = ",\n".join(_tensor(*t) for t in OUTPUTS)
    params = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in parameters.items())
    return f"""# {note}
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
model_transaction_policy {{ decoupled: {"true" if decoupled else "false"} }}
input [
{inputs}
]
output [
{outputs}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(map(str, preferred))} ]
  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
}}
instance_group [ {{ kind: {KINDS[kind]} count: 1 }} ]
parameters [
{params}
]
"""


def resolve_kind(kind: str) -> str:
    """auto: gpu when this onnxruntime has the CUDA provider (the repository is usually written where it runs)."""
    if kind != "auto":
        return kind
    import onnxruntime as ort

    return "gpu" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def check_target(repo, model_name: str, kind: str, force: bool) -> tuple[str, str]:
    """The two model folders' names, after checking they may be written (before any long step)."""
    repo = Path(repo)
    if kind not in KINDS:
        raise UserError(f"unknown instance kind {kind!r}: allowed {', '.join(KINDS)}")
    if not model_name or not model_name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"Triton model name {model_name!r}: use letters, digits, '_' and '-'")
    if repo.exists() and not repo.is_dir():
        raise UserError(f"Triton repository {repo} is a file: give a directory")
    names = (model_name + STREAM_SUFFIX, model_name)
    for name in names:
        if (repo / name).exists():
            if not force:
                raise UserError(
                    f"{repo / name} exists: choose another model name or repository, or pass --force to replace it"
                )
            if not (repo / name / "config.pbtxt").is_file():
                raise UserError(f"{repo / name} exists and is not a Triton model folder: refusing to replace it")
    return names


def write_repository(
    engine_dir,
    repo,
    *,
    model_name: str = "star_llava",
    kind: str = "cpu",
    copy_engine: bool = False,
    max_queue: int = 64,
    force: bool = False,
) -> list[Path]:
    """Two models: REPO/<model_name>_stream (decoupled: streams over gRPC; holds the engine, referenced by its absolute
    path or copied into its version folder with `copy_engine`) and REPO/<model_name> (HTTP / gRPC `infer`: one
    response, forwarded to the first). Written in hidden staging folders and renamed into place. Returns both."""
    engine_dir, repo = Path(engine_dir).resolve(), Path(repo)
    manifest = EngineManifest.read(engine_dir, verify=False)
    names = check_target(repo, model_name, kind, force)
    batch = manifest.limits.max_batch_size
    staged = {name: repo / f".{name}.tmp" for name in names}
    try:
        for name, staging in staged.items():
            shutil.rmtree(staging, ignore_errors=True)
            (staging / "1").mkdir(parents=True)
        engine_model = staged[names[0]]
        where = str(engine_dir)
        if copy_engine:
            shutil.copytree(engine_dir, engine_model / "1" / "engine")
            where = "1/engine"  # relative to the model folder
        engine_model.joinpath("1", "model.py").write_text(
            MODEL_PY.format(what="A star-export engine, streaming", cls="TritonPythonModel")
        )
        engine_model.joinpath("config.pbtxt").write_text(
            config_pbtxt(
                names[0],
                batch,
                kind,
                {"engine_dir": where, "max_queue": str(max_queue)},
                decoupled=True,
                note=f"star-export engine {engine_dir.name} ({where}); decoupled: one response per new piece of text "
                "when stream is true",
            )
        )
        unary = staged[names[1]]
        unary.joinpath("1", "model.py").write_text(
            MODEL_PY.format(what="One-response face of the engine model", cls="UnaryModel")
        )
        unary.joinpath("config.pbtxt").write_text(
            config_pbtxt(
                names[1],
                batch,
                "cpu",
                {"target": names[0]},
                decoupled=False,
                note=f"forwards each request to {names[0]} (BLS) and answers once: for HTTP and gRPC infer",
            )
        )
        for name, staging in staged.items():
            if (repo / name).exists():
                shutil.rmtree(repo / name)
            staging.rename(repo / name)
    except BaseException:
        for staging in staged.values():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return [repo / name for name in names]
