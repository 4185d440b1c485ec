"""An engine directory checked, not trusted: `star.json` against itself and against what its files hold.

At load, before any session is created: every path star.json names is a regular file inside the directory; the
model, schedule, layout and limits agree with one another; each graph's own inputs and outputs (read from the ONNX
file, not from star.json) match the table star.json keeps, and their names and static sizes are the ones the
schedule implies (the TopK K of stage 1 and of the pivot, the KV inputs of each segment, hidden sizes, KV heads and
head size, the activation dtype); the embedding table has the model's width and dtype, the processor loads and makes
the image size the vision graph takes, and the image token is the layout's. Every mismatch is an EngineError (exit 2)
naming the field. The sha256 table (manifest.verify_files) catches changed file contents; this catches an edited
star.json, or files consistent with their hashes but not with each other.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .manifest import DECODE_GRAPHS, GRAPHS, MANIFEST, PREFILL_GRAPHS, VARIANT_OF, EngineError, graph_io_of

DECODE_OF = {decode: segment for segment, decode in DECODE_GRAPHS.items()}
PREFILL_OF = {prefill: segment for segment, prefill in PREFILL_GRAPHS.items()}
MAX_LIMIT = 2**31 - 1  # positions and lengths are int32 in some ONNX Runtime kernels
REBUILD = "the engine was edited or assembled from different builds: rebuild it with star-export --force"


def _fail(field: str, says: Any, found: str) -> EngineError:
    return EngineError(f"{MANIFEST} {field} = {says!r}, but {found}: {REBUILD}")


# --- paths ---------------------------------------------------------------------------------------------------------


def engine_file(directory: Path, name: Any, field: str) -> Path:
    """`name` (from star.json `field`) as a regular file inside `directory`: relative, no `..`, and (symbolic links
    followed) neither leaving the directory nor anything but a regular file."""
    if (
        not isinstance(name, str)
        or not name
        or PurePosixPath(name).is_absolute()
        or ".." in PurePosixPath(name).parts
        or "\\" in name
    ):
        raise EngineError(f"{MANIFEST} {field} = {name!r} is not a path inside the engine directory: {REBUILD}")
    root = os.path.realpath(directory)
    path = os.path.realpath(directory / name)
    if os.path.commonpath([root, path]) != root:
        raise EngineError(
            f"{MANIFEST} {field} = {name!r} leads outside the engine directory (to {path!r}): engines hold their own "
            "files; copy the engine with `cp -rL` so links become files"
        )
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise EngineError(
            f"engine directory {str(directory)!r} is missing {name} ({field}): copy the whole directory, or rebuild it"
        ) from None
    except OSError as e:
        raise EngineError(
            f"{name} in {str(directory)!r} cannot be read ({e.strerror}): fix its permissions, or rebuild the engine"
        ) from None
    if not stat.S_ISREG(mode):
        raise EngineError(
            f"{name} in {str(directory)!r} ({field}) is not a regular file: copy the whole engine directory again, or "
            "rebuild it"
        )
    return Path(path)


def check_paths(directory: Path, manifest: dict) -> None:
    """Every file of star.json's table, graph and embedding table is a regular file inside `directory`, and the
    graphs and the embedding table are in the table (so their sha256 is checked)."""
    for name in manifest["files"]:
        engine_file(directory, name, f"files[{name!r}]")
    named = {
        f"graphs.{g}.file": entry.get("file") if isinstance(entry, dict) else None
        for g, entry in manifest["graphs"].items()
    }
    named["embed_tokens"] = manifest["embed_tokens"]
    for field, name in named.items():
        engine_file(directory, name, field)
        if name not in manifest["files"]:
            raise _fail(field, name, "it is not in the files table (no sha256 to check it against)")


# --- the fields against one another --------------------------------------------------------------------------------


def check_fields(spec, schedule, layout, limits: dict, dtype: str) -> None:
    """The model, schedule, layout and limits of star.json agree with one another."""
    agree = [
        ("schedule.num_layers", schedule.num_layers, "model.text_layers", spec.text_layers),
        ("layout.num_layers", layout.num_layers, "model.text_layers", spec.text_layers),
        (
            "schedule.num_vision_tokens",
            schedule.num_vision_tokens,
            "model's (image_size / patch_size)^2",
            spec.num_vision_tokens,
        ),
        (
            "layout.num_vision_tokens",
            layout.num_vision_tokens,
            "model's (image_size / patch_size)^2",
            spec.num_vision_tokens,
        ),
        (
            "schedule.vision_feature_layer",
            schedule.vision_feature_layer,
            "model.vision_feature_layer",
            spec.vision_feature_layer,
        ),
        (
            "layout.num_key_value_heads",
            layout.num_key_value_heads,
            "model.num_key_value_heads",
            spec.num_key_value_heads,
        ),
        ("layout.head_dim", layout.head_dim, "model.head_dim", spec.head_dim),
        ("layout.dtype", layout.dtype, "dtype", dtype),
    ]
    for field, value, other, expected in agree:
        if value != expected:
            raise _fail(field, value, f"{other} is {expected!r}")
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
            raise _fail(f"limits.{key}", value, f"a limit is a whole number from 1 to {MAX_LIMIT}")
    if limits["max_input_len"] <= spec.num_vision_tokens:
        raise _fail(
            "limits.max_input_len",
            limits["max_input_len"],
            f"a prompt holds the image's {spec.num_vision_tokens} tokens and at least one more",
        )


# --- the graphs' own IO --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphIO:
    name: str
    file: str
    inputs: dict[str, dict]
    outputs: dict[str, dict]
    topk_ks: tuple[int, ...]  # the K of every TopK node whose K is a constant

    def shape(self, field: str, value_name: str, kind: str = "outputs") -> list:
        table = getattr(self, kind)
        if value_name not in table:
            raise EngineError(
                f"{MANIFEST} {field}: graph {self.file} ({self.name}) has no {kind[:-1]} {value_name!r}: {REBUILD}"
            )
        return table[value_name]["shape"]


def _topk_ks(graph) -> tuple[int, ...]:
    """The K of every TopK node of `graph` (an `onnx.GraphProto`) whose K is a constant."""
    import onnx
    from onnx import numpy_helper

    consts = {t.name: t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    consts |= {
        n.output[0]: n.attribute[0].t
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    ks = []
    for node in graph.node:
        if node.op_type == "TopK" and len(node.input) > 1 and node.input[1] in consts:
            ks.extend(int(k) for k in numpy_helper.to_array(consts[node.input[1]]).reshape(-1))
    return tuple(ks)


def _external_files(graph) -> set[str]:
    import onnx

    return {
        e.value
        for t in graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }


def read_graph(directory: Path, manifest: dict, name: str) -> GraphIO:
    """Graph `name`'s inputs and outputs as its ONNX file declares them (the file read once), checked against
    star.json's table."""
    import onnx

    entry = manifest["graphs"][name]
    path = engine_file(directory, entry.get("file"), f"graphs.{name}.file")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
        io = graph_io_of(graph)
        external = _external_files(graph)
        ks = _topk_ks(graph)
    except Exception as e:  # onnx's DecodeError and friends: not an ONNX file
        raise EngineError(
            f"{entry['file']} in {str(directory)!r} is not an ONNX graph ({type(e).__name__}): {REBUILD}"
        ) from e
    for location in sorted(external):
        if PurePosixPath(location).name != location or location not in manifest["files"]:
            raise EngineError(
                f"{entry['file']} keeps its weights in {location!r}, which is not a file of the engine's table: "
                f"{REBUILD}"
            )
    for kind in ("inputs", "outputs"):
        if entry.get(kind) != io[kind]:
            raise _fail(
                f"graphs.{name}.{kind}",
                [v.get("name") if isinstance(v, dict) else v for v in entry.get(kind) or []],
                f"{entry['file']} declares {[v['name'] for v in io[kind]]} (with their shapes and dtypes)",
            )
    return GraphIO(name, entry["file"], {v["name"]: v for v in io["inputs"]}, {v["name"]: v for v in io["outputs"]}, ks)


def _expect(field: str, says: Any, graph: GraphIO, value_name: str, axis: int, kind: str = "outputs") -> None:
    shape = graph.shape(field, value_name, kind)
    found = shape[axis] if -len(shape) <= axis < len(shape) else None
    if found != says:
        raise _fail(field, says, f"{graph.file}'s {kind[:-1]} {value_name!r} has shape {shape}")


def _past_layers(graph: GraphIO, field: str, says: int, layers: list[int], kv_heads: int, head_dim: int) -> None:
    """`graph` takes the key and value caches of exactly `layers` (implied by star.json's `field` = `says`)."""
    names = sorted(n for n in graph.inputs if n.startswith("past_key_values."))
    if names != sorted(f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")):
        held = sorted({n.split(".")[1] for n in names}, key=lambda i: (len(i), i))
        raise _fail(
            field,
            says,
            f"{graph.file} takes the KV caches of layers {', '.join(held) or 'none'} (this schedule needs {layers})",
        )
    for n in names:
        _expect("layout.num_key_value_heads", kv_heads, graph, n, 1, "inputs")
        _expect("layout.head_dim", head_dim, graph, n, 3, "inputs")


def check_graphs(directory: Path, manifest: dict, spec, schedule, layout) -> None:
    """Each graph's own IO against star.json's table and the schedule; the TopK K of stage 1 and of the pivot."""
    unknown = sorted(set(manifest["graphs"]) - set(GRAPHS) - set(VARIANT_OF))
    if unknown:
        raise _fail(
            "graphs",
            sorted(manifest["graphs"]),
            f"this star-export knows the graphs {list(GRAPHS) + list(VARIANT_OF)} only (not {unknown})",
        )
    missing = [g for g in GRAPHS if g not in manifest["graphs"]]
    decode = [g for g in DECODE_OF if g in manifest["graphs"]]
    prefill = [g for g in PREFILL_OF if g in manifest["graphs"]]
    if missing or len(decode) == 1 or len(prefill) == 1:
        raise _fail(
            "graphs",
            sorted(manifest["graphs"]),
            f"an engine has {list(GRAPHS)} and either both decode graphs or none, both prefill graphs or none",
        )
    variants = decode + prefill
    io = {g: read_graph(directory, manifest, g) for g in GRAPHS + tuple(variants)}
    S, H, P, L = schedule, spec.hidden_size, schedule.pivot_layer, schedule.num_layers
    vision, pivot = io["vision"], io["pivot"]
    _expect("model.image_size", spec.image_size, vision, "pixel_values", 2, "inputs")
    _expect("model.image_size", spec.image_size, vision, "pixel_values", 3, "inputs")
    _expect("schedule.stage1_keep", S.stage1_keep, vision, "image_features", 1)
    _expect("schedule.stage1_keep", S.stage1_keep, vision, "stage1_indices", 1)
    _expect("model.hidden_size", H, vision, "image_features", 2)
    _expect("schedule.keep", S.keep, pivot, "stage2_indices", 1)
    _expect("model.hidden_size", H, pivot, "hidden_states", 2, "inputs")
    for field, graph, says in (("schedule.stage1_keep", vision, S.stage1_keep), ("schedule.keep", pivot, S.keep)):
        if not graph.topk_ks or any(k != says for k in graph.topk_ks):
            raise _fail(field, says, f"{graph.file}'s TopK keeps {sorted(set(graph.topk_ks)) or 'no constant K'}")
    layers = {"segment0": list(range(P + 1)), "segment1": list(range(P + 1, L))}
    for g in ("segment0", "segment1") + tuple(variants):
        segment = VARIANT_OF.get(g, g)
        field, says = (
            ("schedule.pivot_layer", P) if segment == "segment0" else ("schedule.num_layers", L)
        )  # segment0 is checked first
        _past_layers(io[g], field, says, layers[segment], layout.num_key_value_heads, layout.head_dim)
    _expect("model.hidden_size", H, io["segment0"], "inputs_embeds", 2, "inputs")
    _expect("model.hidden_size", H, io["segment1"], "hidden_states", 2, "inputs")
    dtype = io["segment0"].inputs["inputs_embeds"]["dtype"]
    if dtype != layout.dtype:
        raise _fail("layout.dtype", layout.dtype, f"{io['segment0'].file} takes {dtype} activations")


# --- the embedding table and the processor -------------------------------------------------------------------------


def load_embeddings(directory: Path, manifest: dict, spec, layout) -> np.ndarray:
    """The embedding table, memory-mapped: (vocab, hidden) in the activation dtype, holding the layout's token ids."""
    name = manifest["embed_tokens"]
    path = engine_file(directory, name, "embed_tokens")
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EngineError(f"{name} in {str(directory)!r} is not a NumPy array file ({str(e)[:200]}): {REBUILD}") from e
    if table.ndim != 2 or table.shape[1] != spec.hidden_size or table.dtype.name != layout.dtype:
        raise _fail(
            "embed_tokens",
            name,
            f"it holds a {table.dtype.name} array of shape {list(table.shape)}, not (vocab, "
            f"model.hidden_size = {spec.hidden_size}) in layout.dtype = {layout.dtype}",
        )
    for field in ("image_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(layout, field)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < table.shape[0]
        ):
            raise _fail(f"layout.{field}", value, f"the embedding table has token ids 0..{table.shape[0] - 1}")
    return table


def check_processor(processor, spec, layout) -> None:
    """The saved processor makes the vision graph's image size and knows the layout's image token."""
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    size = tuple(
        crop.get(k) if isinstance(crop, dict) else getattr(crop, k, None) for k in ("height", "width")
    )  # a dict or a SizeDict
    if getattr(processor.image_processor, "do_center_crop", True) and size != (spec.image_size, spec.image_size):
        raise EngineError(
            f"processor/ crops images to {size}, but the vision graph takes {spec.image_size}x{spec.image_size} "
            f"(model.image_size): {REBUILD}"
        )
    token = getattr(processor, "image_token", "<image>")
    token_id = processor.tokenizer.convert_tokens_to_ids(token)
    if token_id != layout.image_token_id:
        raise _fail(
            "layout.image_token_id",
            layout.image_token_id,
            f"the tokenizer in processor/ gives {token!r} the id {token_id}",
        )
