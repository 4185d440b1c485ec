"""The layer-streamed eager reference: the validator's references for models that do not fit in memory as copies.

The loaded model stays in its checkpoint's dtype, memory-mapped from the safetensors. Each unit of it (a CLIP or
decoder layer, the embeddings, the projector, the final norm, lm_head) is cast to the reference's dtype for the
duration of its forward only (hooks), then restored, and the checkpoint pages it read are handed back to the
kernel (`madvise(MADV_PAGEOUT)`, best effort: they are clean file pages). A float64 reference of a 7B model thus
holds one layer in float64 (1.6 GB) at a time, not 56 GB; every forward re-reads the weights it needs.

The same hooks serve every reference dtype (one model, one streamer): a graph's `context` says which dtype (and
which weight transform: a quantized engine's dequantized twins) is active while that graph runs.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from ..config import StarSchedule
from ..graphs.stages import decoder_layout, graph_modules
from ..memory import release_pages
from ..models import TORCH_DTYPES, LoadedModel
from ..runtime.generate import StarPipeline
from ..runtime.eager import TorchGraph
from .quantized import dequantize, engine_packing, engine_weight, quantized_modules
from .reference import widen_numerics


def units(model) -> list[torch.nn.Module]:
    """The modules cast as a whole: every parameter of the model but the token embeddings lies in exactly one."""
    tower, lm = model.model.vision_tower, model.model.language_model
    # Layers by their parts: the graph modules call a layer's parts directly where they keep attention probabilities,
    # and the decoder's attention by its projections (graphs/decoder.py `attend`).
    clip = [
        m for layer in tower.encoder.layers for m in (layer.layer_norm1, layer.self_attn, layer.layer_norm2, layer.mlp)
    ]
    llama = [
        m
        for layer in lm.layers
        for m in (
            layer.input_layernorm,
            *(getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
            layer.post_attention_layernorm,
            layer.mlp,
        )
    ]
    found = [
        tower.embeddings,
        tower.pre_layrnorm,
        *clip,
        model.model.multi_modal_projector,
        *llama,
        lm.norm,
        lm.rotary_emb,
        model.lm_head,
    ]
    if getattr(tower, "post_layernorm", None) is not None:
        found.append(tower.post_layernorm)
    return found


Transform = Callable[
    [torch.nn.Module, str, torch.Tensor, torch.Tensor], torch.Tensor
]  # (owner, name, stored, cast) -> used


class Streamer:
    """Casts a unit's parameters and floating buffers on entry to its forward and restores them on exit."""

    def __init__(self, model):
        self.model = model
        self.dtype: torch.dtype | None = None
        self.transform: Transform | None = None
        self._saved: dict[int, list] = {}
        covered = {id(p) for u in units(model) for p in u.parameters()} | {id(model.get_input_embeddings().weight)}
        missing = [n for n, p in model.named_parameters() if id(p) not in covered]
        if missing:
            raise RuntimeError(
                f"layer streaming does not cover {missing[:3]}: the model's structure is not LLaVA-1.5's"
            )
        self._hooks = [
            h
            for unit in units(model)
            for h in (unit.register_forward_pre_hook(self._enter), unit.register_forward_hook(self._exit))
        ]
        # A float64 run widens the model's numerics in place (reference.widen_numerics): undone on close.
        self._attention = getattr(model.config, "_attn_implementation", None) or "eager"
        self._classes = [(m, type(m)) for m in model.modules()]

    def close(self) -> None:
        """Remove the hooks and undo any widening (the model is then as it was loaded)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for module, cls in self._classes:
            module.__class__ = cls
        self.model.set_attn_implementation(self._attention)

    def __enter__(self) -> "Streamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def active(self, dtype: str, transform: Transform | None = None):
        previous = self.dtype, self.transform
        self.dtype, self.transform = TORCH_DTYPES[dtype], transform
        try:
            yield
        finally:
            self.dtype, self.transform = previous

    def _enter(self, unit, args):
        if self.dtype is None:
            return
        saved = []
        for owner in unit.modules():
            for name, p in owner.named_parameters(recurse=False):
                cast = p.detach().to(self.dtype)
                if self.transform is not None:
                    cast = self.transform(owner, name, p.detach(), cast)
                saved.append((p, p.data))
                p.data = cast
            for name, b in list(owner.named_buffers(recurse=False)):
                if b is not None and b.is_floating_point():
                    saved.append((owner, name, b))
                    owner._buffers[name] = b.to(self.dtype)
        self._saved[id(unit)] = saved

    def _exit(self, unit, args, output):
        for entry in self._saved.pop(id(unit), []):
            if len(entry) == 2:
                p, stored = entry
                p.data = stored
                release_pages(stored)
            else:
                owner, name, b = entry
                owner._buffers[name] = b


def quantized_transform(model, scheme, engine_dtype: str) -> Transform:
    """The engine's dequantized weights for the decoder Linears and lm_head (quantized from the weight in the engine's
    dtype, as the exporter does). Each weight is quantized once (ONNX Runtime's quantizer: ~1 s per 45 M weights here)
    and kept packed (the engine's own size: bits / 8 bytes per weight plus scales); it is dequantized at each use."""
    linears = {id(m) for m in quantized_modules(model)}
    packed: dict[int, tuple] = {}

    def transform(owner, name, stored, cast):
        if name != "weight" or id(owner) not in linears:
            return cast
        if id(owner) not in packed:
            packed[id(owner)] = engine_packing(engine_weight(stored, engine_dtype), scheme, engine_dtype)
        return torch.from_numpy(dequantize(*packed[id(owner)], stored.shape[1], scheme.bits, scheme.block_size)).to(
            cast.dtype
        )

    return transform


def streamed_pipeline(
    loaded: LoadedModel, schedule: StarSchedule, streamer: Streamer, dtype: str, transform: Transform | None = None
) -> StarPipeline:
    """The eager reference in `dtype` over the streamed model (CPU)."""
    if dtype == "float64":
        widen_numerics(loaded.model)  # float32 / float16 runs keep HF's numerics under it (reference.py)
    context = lambda: streamer.active(dtype, transform)  # noqa: E731
    graphs = {
        name: TorchGraph(module, i, o, "cpu", context)
        for name, (module, i, o) in graph_modules(loaded, schedule).items()
    }
    embed = loaded.model.get_input_embeddings().weight.detach().to(TORCH_DTYPES[dtype]).numpy()
    return StarPipeline(graphs, embed, schedule, decoder_layout(loaded, dtype))


def scaled_eager(truth: np.ndarray, eager: np.ndarray, ratio: float) -> np.ndarray:
    """An eager run of a narrower dtype, estimated from a wider one: its error against the truth times the ratio
    of the two dtypes' unit roundoffs (first-order rounding-error analysis: errors scale with the unit roundoff)."""
    return truth + ratio * (eager.astype(np.float64) - truth)
