"""`star.json`: what an engine directory holds, built from what, with which schedule; and its checks.

`EngineManifest.read(directory)` is the one place star.json is parsed: the JSON, its format version, the types of its
top-level fields, and the typed configs (model, schedule, layout, limits, weight scheme) built from them. Writers
(export/write.py) build the JSON body as a dict and `write_manifest` signs it with the file table.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .config import LIMIT_FIELDS, DecoderLayout, Limits, ModelSpec, StarSchedule, WeightScheme
from .errors import UserError

FORMAT_VERSION = 2  # 2: decoder segments return this call's keys and values only (new_key_values.*), not whole caches
MANIFEST = "star.json"
BUILD_MARKER = ".star-export-build"  # in a build directory only (export/workdir.py); never part of an engine
GRAPHS = ("vision", "segment0", "pivot", "segment1")  # every engine's graphs
DECODE_GRAPHS = {
    "segment0": "decode0",
    "segment1": "decode1",
}  # segment graph -> its optional decode graph (export/decode_graphs.py)
PREFILL_GRAPHS = {
    "segment0": "prefill0",
    "segment1": "prefill1",
}  # segment graph -> its optional prefill graph: the same inputs and outputs, GQA in every layer but the pivot
VARIANT_OF = {graph: segment for table in (DECODE_GRAPHS, PREFILL_GRAPHS) for segment, graph in table.items()}
# What a reader needs, with its JSON type.
REQUIRED = {
    "source": dict,
    "dtype": str,
    "model": dict,
    "schedule": dict,
    "limits": dict,
    "layout": dict,
    "embed_tokens": str,
    "graphs": dict,
    "files": dict,
}


def prefill_graph_names(graphs) -> list[str]:
    """The prefill graphs among `graphs` (a manifest's "graphs" table): none, or both."""
    return [name for name in PREFILL_GRAPHS.values() if name in graphs]


def decode_graph_names(graphs) -> list[str]:
    """The decode graphs among `graphs` (a manifest's "graphs" table, or an engine's loaded graphs): none, or both."""
    return [name for name in DECODE_GRAPHS.values() if name in graphs]


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
    for dist in (
        "star-export",
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxscript",
        "polygraphy",
    ):
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


def _parse(directory: str | Path) -> dict[str, Any]:
    """`star.json` as JSON, its format version and the types of its top-level fields checked."""
    directory = Path(directory)
    path = directory / MANIFEST
    if directory.exists() and not directory.is_dir():
        raise EngineError(
            f"{str(directory)!r} is a file, not an engine directory: pass the directory star-export wrote (it holds "
            f"{MANIFEST})"
        )
    if not directory.is_dir():
        raise EngineError(
            f"engine directory {str(directory)!r} does not exist: build one with `star-export --out {directory}`"
        )
    if not path.is_file():
        raise EngineError(
            f"{str(directory)!r} is not an engine directory (no {MANIFEST}): build one with `star-export --out "
            f"{directory}`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}): rebuild the engine with star-export --force") from e
    if not isinstance(manifest, dict):
        raise EngineError(
            f"{path} holds a JSON {type(manifest).__name__}, not an object: rebuild the engine with star-export --force"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EngineError(
            f"{path} has format_version {version!r}; this star-export reads up to {FORMAT_VERSION}: "
            "upgrade star-export (`pip install -U star-export`) or rebuild the engine with this version"
        )
    if version < FORMAT_VERSION:
        raise EngineError(
            f"{path} has format_version {version}, written by an older star-export whose decoder graphs return whole "
            f"KV caches; this one reads format_version {FORMAT_VERSION}: rebuild the engine with star-export --force"
        )
    wrong = [f"{key} ({kind.__name__})" for key, kind in REQUIRED.items() if not isinstance(manifest.get(key), kind)]
    if wrong:
        raise EngineError(
            f"{path} lacks or mistypes {', '.join(wrong)}: it was not written by star-export, or was edited; rebuild "
            "the engine with star-export --force"
        )
    return manifest


@dataclass(frozen=True)
class EngineManifest:
    """An engine directory's star.json, read once and typed. `raw` is the JSON as written (what the directory checks
    of engine_check.py read field by field, naming each)."""

    directory: Path
    format_version: int
    source: Mapping[str, Any]
    dtype: str
    backend: str
    model: ModelSpec
    schedule: StarSchedule
    layout: DecoderLayout
    limits: Limits
    weights: WeightScheme
    embed_tokens: str
    graphs: Mapping[str, Mapping[str, Any]]  # name -> {"file", "inputs", "outputs", ...}
    files: Mapping[str, Mapping[str, Any]]  # relative path -> {"sha256", "bytes"}
    versions: Mapping[str, str]
    raw: Mapping[str, Any]

    @classmethod
    def read(cls, directory: str | Path, *, verify: bool = True) -> "EngineManifest":
        """Load and check `star.json` (format version, field types; with `verify`, every file present and every
        sha256 equal)."""
        directory = Path(directory)
        m = _parse(directory)
        try:
            manifest = cls(
                directory=directory,
                format_version=m["format_version"],
                source=MappingProxyType(m["source"]),
                dtype=m["dtype"],
                backend=str(m.get("backend", "onnx")),
                model=ModelSpec.from_dict(m["model"]),
                schedule=StarSchedule(**m["schedule"]),
                layout=DecoderLayout(**m["layout"]),
                limits=Limits(**{k: m["limits"][k] for k in LIMIT_FIELDS}),
                weights=WeightScheme.from_dict(m.get("weights")),
                embed_tokens=m["embed_tokens"],
                graphs=MappingProxyType(m["graphs"]),
                files=MappingProxyType(m["files"]),
                versions=MappingProxyType(m.get("versions") or {}),
                raw=MappingProxyType(m),
            )
        except (TypeError, KeyError, ValueError, ZeroDivisionError) as e:
            raise EngineError(
                f"{directory / MANIFEST} is malformed ({type(e).__name__}: {e}): rebuild the engine with star-export "
                "--force"
            ) from e
        if verify:
            manifest.verify_files()
        return manifest

    @property
    def decode_graphs(self) -> list[str]:
        """The engine's ONNX Runtime decode graphs: none, or both."""
        return decode_graph_names(self.graphs)

    @property
    def prefill_graphs(self) -> list[str]:
        """The engine's ONNX Runtime prefill graphs: none, or both."""
        return prefill_graph_names(self.graphs)

    @property
    def source_name(self) -> str | None:
        return self.source.get("name")

    def verify_files(self) -> None:
        verify_files(self.directory, self.raw)


def verify_files(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Every file of the manifest's table present and matching its sha256 (reads every byte of the engine)."""
    missing = [name for name in manifest.get("files", {}) if not (directory / name).is_file()]
    if missing:
        raise EngineError(
            f"engine directory {str(directory)!r} is missing {', '.join(missing)}: copy the whole directory, or "
            "rebuild it"
        )
    for name, entry in manifest["files"].items():
        if sha256_file(directory / name) != entry["sha256"]:
            raise EngineError(
                f"{name} in {str(directory)!r} does not match the sha256 in {MANIFEST} (corrupted or modified): "
                "re-copy the engine directory, or rebuild it with star-export --force"
            )
