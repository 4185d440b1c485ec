"""engine_check.py: an engine directory is checked, not trusted. Each row edits a copy of an engine (star.json alone, or a file
with its sha256 updated so the hash check passes) and runs star-run on it: exit 2, the field or file named, no
traceback. The checks compare star.json with the graphs' own IO (star_export/engine_check.py), so the rows hold for
any model: none names a value of the test model except through the engine's own star.json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from star_export.cli import run_main, validate_main
from star_export.manifest import MANIFEST
from star_export.runtime.inputs import synthetic_image


def _edit(d: Path, change) -> None:
    m = json.loads((d / MANIFEST).read_text())
    change(m)
    (d / MANIFEST).write_text(json.dumps(m))


def _set(field: str, value):
    def change(m):
        *keys, last = field.split(".")
        for k in keys:
            m = m[k]
        m[last] = value(m[last]) if callable(value) else value
    return lambda d: _edit(d, change)


def _rehash(d: Path, name: str) -> None:
    data = (d / name).read_bytes()
    _edit(d, lambda m: m["files"].__setitem__(name, {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))


def _swap_files(d: Path) -> None:
    a, b = d / "segment0.onnx", d / "segment1.onnx"
    a.rename(d / "x")
    b.rename(a)
    (d / "x").rename(b)
    _rehash(d, "segment0.onnx")
    _rehash(d, "segment1.onnx")


def _replace(name: str, write):
    def how(d: Path):
        write(d / name)
        _rehash(d, name)
    return how


def _processor_crop(d: Path) -> None:
    path = d / "processor" / "processor_config.json"
    config = json.loads(path.read_text())
    image = config.get("image_processor", config)
    image["crop_size"] = {"height": image["crop_size"]["height"] // 2, "width": image["crop_size"]["width"] // 2}
    path.write_text(json.dumps(config))
    _rehash(d, "processor/processor_config.json")


def _link_outside(d: Path) -> None:
    outside = d.parent / f"{d.name}-segment0.onnx"
    shutil.copy(d / "segment0.onnx", outside)
    (d / "segment0.onnx").unlink()
    os.symlink(outside, d / "segment0.onnx")


def _weights_outside(d: Path) -> None:
    import onnx

    graph = onnx.load(str(d / "pivot.onnx"), load_external_data=False)
    for t in graph.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../outside.bin"
    onnx.save(graph, str(d / "pivot.onnx"))
    _rehash(d, "pivot.onnx")


def _wide_embeddings(d: Path) -> None:
    table = np.load(d / "embed_tokens.npy")
    np.save(d / "embed_tokens.npy", np.zeros((table.shape[0], table.shape[1] // 2), table.dtype))
    _rehash(d, "embed_tokens.npy")


def _int_embeddings(d: Path) -> None:
    table = np.load(d / "embed_tokens.npy")
    np.save(d / "embed_tokens.npy", np.zeros(table.shape, np.int8))
    _rehash(d, "embed_tokens.npy")


def _fifo(d: Path) -> None:
    (d / "pivot.onnx").unlink()
    os.mkfifo(d / "pivot.onnx")


# (id, edit of a copy of the engine, words the message must hold)
CASES = [
    ("keep-edited", _set("schedule.keep", lambda k: k // 2), "schedule.keep"),
    ("stage1-keep-edited", _set("schedule.stage1_keep", lambda k: k - 1), "schedule.stage1_keep"),
    ("pivot-edited", _set("schedule.pivot_layer", lambda p: p + 1), "schedule.pivot_layer"),
    ("layers-edited", _set("schedule.num_layers", lambda n: n + 1), "schedule.num_layers"),
    ("model-layers-edited", _set("model.text_layers", lambda n: n + 2), "model.text_layers"),
    ("hidden-edited", _set("model.hidden_size", lambda h: h * 2), "model.hidden_size"),
    ("image-size-edited", _set("model.image_size", lambda s: s - 28), "num_vision_tokens"),
    ("patch-size-edited", _set("model.patch_size", lambda p: p + 2), "num_vision_tokens"),
    ("kv-heads-edited", _set("layout.num_key_value_heads", lambda h: h + 1), "layout.num_key_value_heads"),
    ("head-dim-edited", _set("layout.head_dim", lambda h: h * 2), "layout.head_dim"),
    ("dtype-edited", _set("layout.dtype", "float16"), "layout.dtype"),
    ("image-token-out-of-vocab", _set("layout.image_token_id", 10**9), "layout.image_token_id"),
    ("image-token-other-id", _set("layout.image_token_id", lambda t: t + 1), "layout.image_token_id"),
    ("eos-negative", _set("layout.eos_token_id", -1), "layout.eos_token_id"),
    ("limit-zero", _set("limits.max_batch_size", 0), "limits.max_batch_size"),
    ("limit-text", _set("limits.max_new_tokens", "many"), "limits.max_new_tokens"),
    ("limit-huge", _set("limits.max_input_len", 10**15), "limits.max_input_len"),
    ("limit-below-image", _set("limits.max_input_len", 1), "limits.max_input_len"),
    ("graph-files-swapped-in-star-json", lambda d: (_set("graphs.segment0.file", "segment1.onnx")(d), _set("graphs.segment1.file", "segment0.onnx")(d)),
     "graphs.segment0"),
    ("graph-files-swapped-and-rehashed", _swap_files, "graphs.segment0"),
    ("graph-io-edited", _set("graphs.pivot.outputs", lambda outs: [o | {"shape": o["shape"][:-1] + [1]} for o in outs]), "graphs.pivot.outputs"),
    ("unknown-graph", _set("graphs", lambda g: g | {"extra": g["pivot"]}), "graphs"),
    ("graph-dropped", _set("graphs", lambda g: {k: v for k, v in g.items() if k != "pivot"}), "graphs"),
    ("embeddings-not-numpy", _replace("embed_tokens.npy", lambda p: p.write_bytes(b"\x93NUMPY" + b"\x00" * 64)), "not a NumPy array file"),
    ("embeddings-pickled-objects", _replace("embed_tokens.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object))), "not a NumPy array file"),
    ("embeddings-other-width", _wide_embeddings, "embed_tokens"),
    ("embeddings-other-dtype", _int_embeddings, "embed_tokens"),
    ("tokenizer-broken", _replace("processor/tokenizer.json", lambda p: p.write_text("{not json")), "processor"),
    ("processor-other-crop", _processor_crop, "crops images"),
    ("path-absolute", _set("embed_tokens", "/etc/hostname"), "not a path inside the engine directory"),
    ("path-dotdot", _set("graphs.vision.file", "../vision.onnx"), "not a path inside the engine directory"),
    ("files-table-dotdot", _set("files", lambda f: f | {"../outside": {"sha256": "0" * 64, "bytes": 1}}), "not a path inside the engine directory"),
    ("graph-not-in-files-table", _set("files", lambda f: {k: v for k, v in f.items() if k != "pivot.onnx"}), "not in the files table"),
    ("symlink-leaving-the-directory", _link_outside, "leads outside the engine directory"),
    ("external-weights-outside", _weights_outside, "keeps its weights in '../../outside.bin'"),
    ("graph-is-a-fifo", _fifo, "is not a regular file"),
    ("graph-is-a-directory", lambda d: ((d / "pivot.onnx").unlink(), (d / "pivot.onnx").mkdir()), "is not a regular file"),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "image.png"
    synthetic_image(1).save(path)
    return path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_edited_engine_is_exit_2_naming_the_field(case, tiny_engine, image, tmp_path, capsys):
    name, edit, words = case
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine, symlinks=True)
    edit(engine)
    rc = run_main([str(engine), "--image", str(image), "--prompt", "Hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2, f"{name}: exit {rc}\n{err}"
    assert words in err, f"{name}: {words!r} not in:\n{err}"
    assert "Traceback" not in err and "internal error" not in err


def test_star_validate_refuses_an_edited_schedule(tiny_engine, tmp_path, capsys):
    """The validator loads the engine through the same checks: an edited keep is not validated against itself."""
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    _set("schedule.keep", lambda k: k // 2)(engine)
    assert validate_main([str(engine)]) == 2
    assert "schedule.keep" in capsys.readouterr().err


def test_an_unedited_engine_loads(tiny_engine, decode_engine):
    """The checks pass the engines star-export writes (with and without ONNX Runtime decode graphs)."""
    from star_export.runtime.engine import Engine

    for directory in (tiny_engine, decode_engine):
        Engine(directory)
