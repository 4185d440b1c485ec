"""The token embedding lookup and the image merge, where the graphs run.

Between the vision graph and segment 0 the pipeline turns token ids into embeddings and puts each row's k1 stage-1
features in place of its image tokens; every decode step looks up one embedding per row. `HostOps` does this in NumPy
(the eager reference, and engines whose graphs take host arrays: OpenVINO, one graph at a time). `DeviceOps` does it
with two small ONNX graphs run by ONNX Runtime on the engine's provider, through the same IO binding as the engine's
graphs: the embedding table is bound once where the provider computes (on the CPU, the memory-mapped file itself, no
copy; on a GPU, one copy at load), the image features stay the vision graph's output value, and only token ids and
each row's image start cross from the host. Both give the same values (a gather and a select: exact).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .sessions import OrtGraph

OPSET = 17
ONNX_TYPES = {"float32": 1, "float16": 10, "float64": 11}  # onnx.TensorProto element types of the tables we hold


class HostOps:
    """Embedding lookup and merge in NumPy over the (memory-mapped) table."""

    def __init__(self, embed_tokens: np.ndarray, dtype: np.dtype):
        self.embed_tokens, self.dtype = embed_tokens, dtype

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(B, q) token ids -> (B, q, d)."""
        return self.embed_tokens[ids].astype(self.dtype)

    def merge(self, ids: np.ndarray, image_features: Any, image_start: np.ndarray, to_numpy) -> np.ndarray:
        """(B, n) ids whose span `image_start .. + k1` holds image tokens -> (B, n, d) with the features there."""
        embeds = self.embed(ids)
        features = to_numpy(image_features)
        k1 = features.shape[1]
        for b, s in enumerate(image_start):
            embeds[b, s : s + k1] = features[b]
        return embeds


def _graphs(dtype: str) -> tuple[bytes, bytes]:
    """(merge, embed) as serialized ONNX models over a table of `dtype`."""
    from onnx import TensorProto, helper, numpy_helper

    elem = ONNX_TYPES[dtype]
    table = helper.make_tensor_value_info("embed_tokens", elem, ["vocab", "hidden"])
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    embeds = helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "seq", "hidden"])

    def model(nodes, inputs, initializers=()):
        graph = helper.make_graph(nodes, "star_ops", inputs, [embeds], list(initializers))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]).SerializeToString()

    embed = model([helper.make_node("Gather", ["embed_tokens", "input_ids"], ["inputs_embeds"], axis=0)], [table, ids])
    constants = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in (("zero", 0), ("one", 1))]
    constants += [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in (("ax0", [0]), ("ax1", [1]))]
    constants += [numpy_helper.from_array(np.array([2], np.int64), "ax2")]
    nodes = [
        helper.make_node("Gather", ["embed_tokens", "input_ids"], ["tokens"], axis=0),  # (B, n, d)
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "one"], ["n"], axis=0),
        helper.make_node("Range", ["zero", "n", "one"], ["columns"]),  # (n,)
        helper.make_node("Unsqueeze", ["columns", "ax0"], ["columns_row"]),  # (1, n)
        helper.make_node("Unsqueeze", ["image_start", "ax1"], ["start_column"]),  # (B, 1)
        helper.make_node("Sub", ["columns_row", "start_column"], ["offset"]),  # (B, n): column - image start
        helper.make_node("Shape", ["image_features"], ["features_shape"]),
        helper.make_node("Gather", ["features_shape", "one"], ["k1"], axis=0),
        helper.make_node("Sub", ["k1", "one"], ["last"]),
        helper.make_node("GreaterOrEqual", ["offset", "zero"], ["after_start"]),
        helper.make_node("Less", ["offset", "k1"], ["before_end"]),
        helper.make_node("And", ["after_start", "before_end"], ["inside"]),
        helper.make_node("Unsqueeze", ["inside", "ax2"], ["inside3"]),  # (B, n, 1)
        helper.make_node("Clip", ["offset", "zero", "last"], ["feature_index"]),
        helper.make_node("Unsqueeze", ["feature_index", "ax2"], ["feature_index3"]),  # (B, n, 1)
        helper.make_node("GatherND", ["image_features", "feature_index3"], ["features"], batch_dims=1),  # (B, n, d)
        helper.make_node("Where", ["inside3", "features", "tokens"], ["inputs_embeds"]),
    ]
    inputs = [
        table,
        ids,
        helper.make_tensor_value_info("image_features", elem, ["batch", "k1", "hidden"]),
        helper.make_tensor_value_info("image_start", TensorProto.INT64, ["batch"]),
    ]
    return model(nodes, inputs, constants), embed


class DeviceOps:
    """Embedding lookup and merge as ONNX Runtime graphs on the engine's provider (`providers`)."""

    def __init__(self, embed_tokens: np.ndarray, providers, threads: int | None = None, arena: str | None = None):
        import onnxruntime as ort

        merge, embed = _graphs(embed_tokens.dtype.name)
        self.merge_graph = OrtGraph(merge, providers, threads=threads, arena=arena)
        self.embed_graph = OrtGraph(embed, providers, threads=threads, arena=arena)
        # bound once where the provider computes: on the CPU the array itself (memory-mapped: only the rows looked up
        # are read), on a GPU one copy
        self.table = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(embed_tokens), self.embed_graph.device, 0)

    @property
    def graphs(self) -> tuple[OrtGraph, OrtGraph]:
        return self.merge_graph, self.embed_graph

    def embed(self, ids: np.ndarray):
        return self.embed_graph.run({"embed_tokens": self.table, "input_ids": np.asarray(ids, np.int64)})[
            "inputs_embeds"
        ]

    def merge(self, ids: np.ndarray, image_features: Any, image_start: np.ndarray, to_numpy=None):
        feed = {"embed_tokens": self.table, "input_ids": ids, "image_features": image_features}
        return self.merge_graph.run(feed | {"image_start": np.asarray(image_start, np.int64)})["inputs_embeds"]
