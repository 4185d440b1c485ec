"""Quantized engines seen from the validator: what MatMulNBits computes, in float64.

`dequantize` is the op's documented arithmetic (ONNX Runtime's ContribOperators.md, MatMulNBits) in numpy: the
references the validator runs for a quantized engine hold exactly the engine's quantized weights.

Activations: with `accuracy_level` 4, ONNX Runtime's CPU kernels (MLAS `CompInt8`, where the build and the CPU have
one) also quantize A, per block of K, to int8 before the integer dot products; elsewhere (another provider, no
kernel) the op computes in float whatever the attribute says. Which one a runtime does is measured, not assumed
(`matmul_compute`, one small op), and the references then do the same (`int8_activations`).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from ..config import WeightScheme
from ..export.quantize import engine_packing
from ..models import TORCH_DTYPES, LoadedModel, cast_copy
from ..runtime import openvino
from ..runtime.sessions import session_options, with_options

_JITTER: ContextVar = ContextVar("int8_activation_jitter", default=None)  # (relative, torch.Generator) or None


def dequantize(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int, bits: int, block_size: int
) -> np.ndarray:
    """The weight `[N, K]` MatMulNBits computes with: `(q - zero_point) * scale` per block of K (float64)."""
    N, blocks, _ = packed.shape
    if bits == 4:  # two values per byte, the lower nibble first
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, blocks, block_size)
    else:
        q = packed.reshape(N, blocks, block_size)
    if zero_points is None:
        zp = np.full((N, blocks, 1), 1 << (bits - 1), dtype=np.float64)
    elif bits == 4:
        zp = (
            np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1)
            .reshape(N, -1)[:, :blocks, None]
            .astype(np.float64)
        )
    else:
        zp = zero_points.reshape(N, blocks, 1).astype(np.float64)
    w = (q.astype(np.float64) - zp) * scales.astype(np.float64).reshape(N, blocks, 1)
    return w.reshape(N, blocks * block_size)[:, :K]


def quantized_twin(weight_nk: np.ndarray, scheme: WeightScheme, activation_dtype="float32") -> np.ndarray:
    """What the engine's MatMulNBits uses in place of `weight_nk` (float64)."""
    return dequantize(
        *engine_packing(weight_nk, scheme, activation_dtype), weight_nk.shape[1], scheme.bits, scheme.block_size
    )


def quantized_modules(model) -> list:
    """The Linears of a LLaVA model that a quantized engine holds as MatMulNBits: the decoder's and lm_head."""
    import torch

    return [
        m for layer in model.model.language_model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)
    ] + [model.lm_head]


def engine_weight(weight, engine_dtype: str) -> np.ndarray:
    """A checkpoint weight as the exporter quantizes it: cast to the engine's dtype, then to float32."""
    return weight.detach().to(TORCH_DTYPES[engine_dtype]).float().numpy()


def quantized_reference(loaded, scheme: WeightScheme, engine_dtype: str, compute: str = "float"):
    """A float64 copy of `loaded` whose decoder Linears and lm_head hold exactly the engine's quantized weights and,
    for `compute` "int8" (`matmul_compute`), quantize their inputs as the engine does (hooks, kept by casts)."""
    import torch

    model = cast_copy(loaded.model, torch.float64).to(torch.float64)  # .to: the buffers too, as before
    with torch.no_grad():
        for linear in quantized_modules(model):
            linear.weight.copy_(
                torch.from_numpy(quantized_twin(engine_weight(linear.weight, engine_dtype), scheme, engine_dtype))
            )
            if compute == "int8":
                linear.register_forward_pre_hook(int8_activation_hook(scheme.block_size))
    return LoadedModel(model, loaded.processor, loaded.spec, loaded.defaults, loaded.source)


def int8_activations(x, block_size: int):
    """What MatMulNBits' int8 compute multiplies instead of A (MLAS `QuantizeARow_CompInt8`): each row quantized
    per block of K, symmetric, `scale = amax / 127`, `q = round_half_even(a * (127 / amax))` (0 where amax is 0),
    in A's own dtype; returns `q * scale`, which the integer dot products times the scales equal."""
    import torch

    jitter = _JITTER.get()
    if jitter is not None:
        relative, generator = jitter
        x = x * (1 + relative * (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1))
    K = x.shape[-1]
    blocks = (torch.nn.functional.pad(x, (0, -K % block_size)) if K % block_size else x).unflatten(-1, (-1, block_size))
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax != 0, 127 / amax, torch.zeros_like(amax))
    q = (blocks * inverse).round_().mul_(amax / 127).flatten(-2)  # in place: a prefill's activations are large
    return q if K % block_size == 0 else q[..., :K]


@contextmanager
def activation_jitter(relative: float, seed: int):
    """While open, `int8_activations` quantizes each value times (1 + u), u ~ U(-relative, relative) (seeded): an
    implementation whose activations before the quantization differ from this one's by up to `relative`."""
    import torch

    token = _JITTER.set((relative, torch.Generator().manual_seed(seed)))
    try:
        yield
    finally:
        _JITTER.reset(token)


def int8_activation_hook(block_size: int):
    """A forward pre-hook: the Linear computes on `int8_activations` of its input, as an int8-compute engine does."""
    return lambda module, args: (int8_activations(args[0], block_size), *args[1:])


@contextmanager
def int8_activation_hooks(modules, block_size: int):
    """`int8_activation_hook` on `modules` while open."""
    handles = [m.register_forward_pre_hook(int8_activation_hook(block_size)) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def matmulnbits_model(scheme: WeightScheme, activation_dtype, K: int, N: int, weight_nk: np.ndarray) -> bytes:
    """One MatMulNBits `A [M, K] -> Y [M, N]` holding `weight_nk` as the engine would (serialized ONNX)."""
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(activation_dtype))
    packed, scales, zp = engine_packing(weight_nk, scheme, activation_dtype)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zero_points"))
    attrs = {"K": K, "N": N, "bits": scheme.bits, "block_size": scheme.block_size}
    if scheme.accuracy_level:
        attrs["accuracy_level"] = scheme.accuracy_level
    node = helper.make_node("MatMulNBits", ["A", *(t.name for t in inits)], ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("A", elem, ["M", K])],
        [helper.make_tensor_value_info("Y", elem, ["M", N])],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def matmul_compute(scheme: WeightScheme, activation_dtype: str, providers) -> str:
    """Which arithmetic MatMulNBits of `scheme` has on this ONNX Runtime and `providers`: "int8" (activations
    quantized as `int8_activations`) or "float". It depends on the build, the provider and the CPU's ISA, so it is
    measured: one random op (8 x 2 blocks x 16), compared with both float64 models of it; the nearer one is the
    answer (the two differ by the activations' quantization, ~1e-2 relative, far above float rounding)."""
    import onnxruntime as ort
    import torch

    K, N = 2 * scheme.block_size, 16
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((N, K)).astype(np.float32)
    a = rng.standard_normal((8, K)).astype(activation_dtype)
    model = matmulnbits_model(scheme, activation_dtype, K, N, weight)
    if list(providers) == [openvino.OPENVINO]:
        y = openvino.run_once(model, {"A": a}, openvino.graph_config(scheme))[0].astype(np.float64)
    else:
        session = ort.InferenceSession(model, session_options(), providers=with_options(providers))
        y = session.run(None, {"A": a})[0].astype(np.float64)
    w = quantized_twin(weight, scheme, activation_dtype)
    models = {
        "float": a.astype(np.float64) @ w.T,
        "int8": int8_activations(torch.from_numpy(a), scheme.block_size).double().numpy() @ w.T,
    }
    return min(models, key=lambda k: np.linalg.norm(y - models[k]))


def quantized_note(scheme: WeightScheme, compute: str, provider: str) -> str:
    """The validator's note on what its references do for a quantized engine."""
    what = (
        "and quantize their activations to int8 per block as the engine does"
        if compute == "int8"
        else "and float activations"
    )
    return (
        f"{scheme.kind} weights (block {scheme.block_size}, accuracy_level {scheme.accuracy_level}): MatMulNBits "
        f"computes in {compute} on {provider} (probed); references use the engine's dequantized weights {what}"
    )
