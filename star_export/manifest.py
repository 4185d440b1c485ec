"""`star.json`: what an engine directory holds, built from what, with which schedule; and its checks."""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import UserError

FORMAT_VERSION = 2  # 2: decoder segments return this call's keys and values only (new_key_values.*), not whole caches
MANIFEST = "star.json"
BUILD_MARKER = ".star-export-build"  # in a build directory only (export/workdir.py); never part of an engine
GRAPHS = ("vision", "segment0", "pivot", "segment1")  # every engine's graphs
DECODE_GRAPHS = {"segment0": "decode0", "segment1": "decode1"}  # segment graph -> its optional decode graph (export/decode_graphs.py)
# What a reader needs, with its JSON type.
REQUIRED = {"source": dict, "dtype": str, "model": dict, "schedule": dict, "limits": dict, "layout": dict, "embed_tokens": str, "graphs": dict, "files": dict}


class EngineError(UserError):
    """An engine directory that cannot be used; the message says what is wrong and how to fix it."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("star-export", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "polygraphy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _onnx_dtype(elem_type: int) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes (dimension names for dynamic axes) and dtypes of a graph's inputs and outputs."""
    import onnx

    return graph_io_of(onnx.load(str(path), load_external_data=False).graph)


def graph_io_of(graph) -> dict[str, list[dict[str, Any]]]:
    """`graph_io` of a loaded `onnx.GraphProto`."""

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "shape": shape, "dtype": _onnx_dtype(t.elem_type)})
        return out

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, BUILD_MARKER):
            files[p.relative_to(directory).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def write_manifest(directory: Path, body: dict[str, Any]) -> dict[str, Any]:
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **body,
        "versions": tool_versions(),
        "files": file_table(directory),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Load and check `star.json`: format version, every file present, every sha256 equal."""
    directory = Path(directory)
    path = directory / MANIFEST
    if directory.exists() and not directory.is_dir():
        raise EngineError(f"{str(directory)!r} is a file, not an engine directory: pass the directory star-export wrote (it holds {MANIFEST})")
    if not directory.is_dir():
        raise EngineError(f"engine directory {str(directory)!r} does not exist: build one with `star-export --out {directory}`")
    if not path.is_file():
        raise EngineError(f"{str(directory)!r} is not an engine directory (no {MANIFEST}): build one with `star-export --out {directory}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}): rebuild the engine with star-export --force") from e
    if not isinstance(manifest, dict):
        raise EngineError(f"{path} holds a JSON {type(manifest).__name__}, not an object: rebuild the engine with star-export --force")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EngineError(
            f"{path} has format_version {version!r}; this star-export reads up to {FORMAT_VERSION}: "
            "upgrade star-export (`pip install -U star-export`) or rebuild the engine with this version"
        )
    if version < FORMAT_VERSION:
        raise EngineError(
            f"{path} has format_version {version}, written by an older star-export whose decoder graphs return whole KV "
            f"caches; this one reads format_version {FORMAT_VERSION}: rebuild the engine with star-export --force"
        )
    wrong = [f"{key} ({kind.__name__})" for key, kind in REQUIRED.items() if not isinstance(manifest.get(key), kind)]
    if wrong:
        raise EngineError(f"{path} lacks or mistypes {', '.join(wrong)}: it was not written by star-export, or was edited; rebuild the engine with star-export --force")
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every file of the manifest's table present and matching its sha256 (reads every byte of the engine)."""
    missing = [name for name in manifest.get("files", {}) if not (directory / name).is_file()]
    if missing:
        raise EngineError(f"engine directory {str(directory)!r} is missing {', '.join(missing)}: copy the whole directory, or rebuild it")
    for name, entry in manifest["files"].items():
        if sha256_file(directory / name) != entry["sha256"]:
            raise EngineError(
                f"{name} in {str(directory)!r} does not match the sha256 in {MANIFEST} (corrupted or modified): "
                "re-copy the engine directory, or rebuild it with star-export --force"
            )
