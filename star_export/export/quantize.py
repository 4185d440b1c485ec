"""Weight-only int8 / int4 decoder engines: ONNX Runtime's `MatMulNBits` for every Linear of the decoder segments.

The numbers are ONNX Runtime's own: its block quantizer (`MatMulNBitsQuantizer`'s `DefaultWeightOnlyQuantizer`,
C++ kernels) packs each weight. The graph rewrite is ours because the exporter writes a Linear as
`MatMul(x, Transpose(W))` with W `[N, K]`, a pattern the quantizer (which wants MatMul with a `[K, N]`
initializer) skips; `MatMulNBits` takes W in exactly that `[N, K]` layout, so the Transpose goes away.

Memory: the quantized tensors are lazy too: each weight is read, cast to float32, packed, and written
while the graph is saved, one at a time.

The validator's side of quantization (the op's arithmetic, the references' weights and activations) is in
validate/quantized.py.
"""

from __future__ import annotations

import numpy as np

from ..config import WeightScheme


def _quantizer(scheme: WeightScheme):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size,
        is_symmetric=scheme.symmetric,
        bits=scheme.bits,
        accuracy_level=scheme.accuracy_level or None,
    )
    return DefaultWeightOnlyQuantizer(config)


def quantize_weight(weight_nk: np.ndarray, scheme: WeightScheme) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A Linear weight `[N, K]` -> (packed `[N, K/block, block*bits/8]` uint8, scales `[N * K/block]` float32,
    zero points or None when symmetric), by ONNX Runtime's block quantizer."""
    packed, scales, zero_points = _quantizer(scheme).qbits_block_quant(
        np.ascontiguousarray(weight_nk.T, dtype=np.float32)
    )
    return packed, scales.reshape(-1), None if scheme.symmetric else zero_points


def engine_packing(
    weight_nk: np.ndarray, scheme: WeightScheme, activation_dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The tensors the engine's MatMulNBits holds for `weight_nk`: packed values, scales in the activation dtype
    (as the engine stores them), zero points or None."""
    packed, scales, zp = quantize_weight(weight_nk, scheme)
    return packed, scales.astype(np.dtype(activation_dtype)), zp


def _linear_weight(node):
    """W if `node` is `MatMul(x, Transpose(W, perm=[1, 0]))` with W a 2-D initializer, else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    producer = node.inputs[1].producer() if node.inputs[1] is not None else None
    if producer is None or producer.op_type != "Transpose":
        return None
    perm = producer.attributes.get("perm")
    w = producer.inputs[0]
    if w is None or w.const_value is None or len(w.shape) != 2 or (perm is not None and list(perm.value) != [1, 0]):
        return None
    return w


def quantize_linears(model, scheme: WeightScheme, activation_dtype) -> int:
    """Rewrite every Linear of `model` (an onnx_ir Model with lazy initializers) to MatMulNBits. Returns the count."""
    import onnx_ir as ir

    graph = model.graph
    np_dtype = np.dtype(activation_dtype)
    cache: dict[str, tuple] = {}

    def quantized(w) -> tuple:
        if w.name not in cache:
            cache.clear()  # the saver writes a weight's three tensors one after another: keep one weight only
            cache[w.name] = engine_packing(w.const_value.numpy().astype(np.float32), scheme, np_dtype)
        return cache[w.name]

    count = 0
    for node in list(graph):
        w = _linear_weight(node)
        if w is None:
            continue
        N, K = (int(d) for d in w.shape)
        blocks = -(-K // scheme.block_size)
        blob = scheme.block_size * scheme.bits // 8
        parts = [
            ("_Q", ir.DataType.UINT8, (N, blocks, blob), lambda w=w: quantized(w)[0]),
            ("_scales", ir.DataType.from_numpy(np_dtype), (N * blocks,), lambda w=w: quantized(w)[1]),
        ]
        if not scheme.symmetric:
            zp_cols = -(-blocks * scheme.bits // 8)
            parts.append(("_zero_points", ir.DataType.UINT8, (N, zp_cols), lambda w=w: quantized(w)[2]))
        inputs = [node.inputs[0]]
        for suffix, dtype, shape, make in parts:
            name = w.name + suffix
            tensor = ir.LazyTensor(
                lambda make=make, name=name: ir.Tensor(make(), name=name), dtype=dtype, shape=ir.Shape(shape), name=name
            )
            value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=tensor)
            graph.register_initializer(value)
            inputs.append(value)
        attributes = {"K": K, "N": N, "bits": scheme.bits, "block_size": scheme.block_size}
        if scheme.accuracy_level:
            attributes["accuracy_level"] = scheme.accuracy_level
        new = ir.Node(
            "com.microsoft",
            "MatMulNBits",
            inputs,
            attributes=ir.convenience.convert_attributes(attributes),
            num_outputs=1,
            name=(node.name or w.name) + f"_Q{scheme.bits}",
        )
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        count += 1
    if count:
        model.opset_imports["com.microsoft"] = 1
    return count
