"""The generation loop over the four graphs (vision, segment 0, pivot, segment 1) with two KV caches.

One loop serves both backends: the eager reference runs it over `TorchGraph`s, the engine over
`OrtGraph`s. Positions and caches follow STAR.md: the decoder sees `[prefix | k1 visual | suffix]`
(n tokens, positions 0..n-1 per row); after the pivot, segment 1 sees n' = n - k1 + keep tokens that
keep their positions; each generated token takes the next position of the unpruned sequence and is
appended to both caches. The caches are buffers written in place (kvcache.py): a step copies no cache.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..config import DecoderLayout, StarSchedule
from ..errors import UserError
from ..manifest import decode_graph_names
from .device_ops import HostOps
from .kvcache import NEW, KVCache

CACHE_LENGTH = (
    "cache_length"  # a feed key, not a graph input: the filled slots of the caches fed (decode graphs read it)
)


class InputError(UserError, ValueError):
    """Bad request (image, prompt, batch); the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Greedy when `temperature == 0`; else temperature + top-p with a seeded numpy generator."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens={self.max_new_tokens!r}: allowed a whole number >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature={self.temperature}: allowed a finite number >= 0 (0 is greedy)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"top_p={self.top_p}: allowed 0 < top_p <= 1")
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**63:
            raise InputError(f"seed={self.seed!r}: allowed a whole number 0 <= seed < 2**63")


@dataclass(frozen=True)
class Forcing:
    """Another run's choices, imposed on this one (teacher forcing): the validator runs the eager
    reference on the engine's kept indices and tokens, so every value is compared between the same
    computations. Graphs that cannot take a forced selection (ONNX) ignore it."""

    stage1_indices: np.ndarray  # (B, k1)
    stage2_indices: np.ndarray  # (B, keep)
    token_ids: list[list[int]]  # per row, as generated


@dataclass
class Generation:
    token_ids: list[list[int]]  # per row: new tokens, up to and including EOS
    logits: list[np.ndarray]  # per step: (B, vocab) float32 (float64 for a float64 reference)
    stage1_indices: np.ndarray  # (B, k1) patch indices, ascending
    stage2_indices: np.ndarray  # (B, keep) offsets into the k1 visual tokens, ascending
    kv_bytes_after_prefill: int
    seq_lens: dict[str, int]  # n (segment 0) and n' (segment 1) at prefill
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeState:
    """What a batch carries from one decode step to the next: both segments' KV caches (segment 0: n + t, segment 1:
    n' + t slots filled per row, left padded), each row's next position (B, 1) and last logits (B, vocab). A step
    writes into the caches in place: the state it was given is spent."""

    cache0: KVCache
    cache1: KVCache
    next_pos: np.ndarray
    logits: np.ndarray


# The query rows whose attention at the pivot ranks the visual tokens (graphs/select.py stage2_scores), by the
# schedule's stage-2 scorer: STAR's suffix text after the image, or FastV's last prompt token (rows are left padded, so
# the last column is each row's last token). "none" keeps every token: its TopK keeps them all, whatever it ranks.
STAGE2_ROWS = {
    "star": lambda index, image_end, mask: ((index >= image_end[:, None]) & (mask > 0)).astype(np.int64),
    "last": lambda index, image_end, mask: np.broadcast_to(index == index.shape[1] - 1, mask.shape).astype(np.int64),
}
STAGE2_ROWS["none"] = STAGE2_ROWS["star"]


def _cache_read(graph):
    """How the KV cache reads a graph's new keys and values into its buffers: where the graph computed them (an ONNX
    Runtime graph on the CPU provider: host memory, not a transfer; on a GPU they are torch tensors on the device)."""
    return getattr(graph, "cache_read", graph.to_numpy)


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def sample_next(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """(B, vocab) -> (B,) token ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    p = softmax64(logits.astype(np.float64) / sampling.temperature)
    out = np.empty(len(p), dtype=np.int64)
    for b, row in enumerate(p):
        order = np.argsort(-row, kind="stable")
        cum = np.cumsum(row[order])
        cut = int(np.searchsorted(cum, sampling.top_p)) + 1  # smallest prefix with mass >= top_p
        top = order[:cut]
        out[b] = rng.choice(top, p=row[top] / row[top].sum())
    return out


# Dtypes numpy lacks, and the one their values are held in between graphs (losslessly: every bfloat16 value is a
# float32 value). A bfloat16 pipeline is the validator's eager twin of an engine that computes in bfloat16
# (runtime/openvino.py); each of its graphs casts what it is fed to bfloat16 (eager.TorchGraph).
HELD_AS = {"bfloat16": "float32"}


def held_as(dtype: str) -> np.dtype:
    """The numpy dtype a pipeline of `dtype` holds its values in."""
    return np.dtype(HELD_AS.get(dtype, dtype))


class StarPipeline:
    """vision -> merge -> segment 0 -> pivot -> segment 1, then decode steps through both segments."""

    def __init__(
        self,
        graphs: dict[str, Any],
        embed_tokens: np.ndarray,
        schedule: StarSchedule,
        layout: DecoderLayout,
        ops: Any = None,
    ):
        """`ops`: where the embedding lookup and the image merge run (runtime/device_ops.py; None: NumPy)."""
        self.graphs, self.embed_tokens, self.schedule, self.layout = graphs, embed_tokens, schedule, layout
        self.np_dtype = held_as(layout.dtype)
        self.ops = ops or HostOps(embed_tokens, self.np_dtype)
        self.logits_dtype = np.promote_types(self.np_dtype, np.float32)  # float64 stays float64 (the validator's truth)

    # ------------------------------------------------------------ helpers
    def _empty_past(self, batch: int, layers: range) -> dict[str, np.ndarray]:
        shape = (batch, self.layout.num_key_value_heads, 0, self.layout.head_dim)
        empty = np.zeros(shape, dtype=self.np_dtype)
        return {f"past_key_values.{i}.{kind}": empty for i in layers for kind in ("key", "value")}

    @staticmethod
    def _new(outputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in outputs.items() if k.startswith(NEW)}

    def _cache(self, graph, outputs: dict[str, Any], mask: np.ndarray, reserve: int) -> KVCache:
        device = getattr(graph.device, "type", graph.device)  # torch.device or "cpu" / "cuda"
        return KVCache.from_prefill(self._new(outputs), mask, reserve, self.np_dtype, device, _cache_read(graph))

    def merge(self, input_ids: np.ndarray, attention_mask: np.ndarray, image_features: Any):
        """Replace each row's span of `num_vision_tokens` image tokens by its k1 stage-1 features: the ids and mask on
        the host, the embeddings where `ops` computes them (the features are not read on the host there).

        Returns inputs_embeds (B, n, d), attention_mask (B, n), image_start (B,).
        """
        L, k1 = self.layout, self.schedule.stage1_keep
        is_image = input_ids == L.image_token_id
        counts = is_image.sum(-1)
        if not (counts == L.num_vision_tokens).all():
            raise InputError(
                f"each prompt needs exactly one image ({L.num_vision_tokens} image tokens after the processor), "
                f"got {counts.tolist()}: put one '<image>' in each prompt"
            )
        starts = is_image.argmax(-1)
        if not all(is_image[b, s : s + L.num_vision_tokens].all() for b, s in enumerate(starts)):
            raise InputError("the image tokens of a prompt are not contiguous: put one '<image>' in each prompt")
        rows_ids, rows_mask = [], []
        for b, s in enumerate(starts):
            e = s + L.num_vision_tokens
            rows_ids.append(np.concatenate([input_ids[b, :s], np.full(k1, L.image_token_id), input_ids[b, e:]]))
            rows_mask.append(
                np.concatenate([attention_mask[b, :s], np.ones(k1, attention_mask.dtype), attention_mask[b, e:]])
            )
        ids, mask, starts = (
            np.stack(rows_ids).astype(np.int64),
            np.stack(rows_mask).astype(np.int64),
            starts.astype(np.int64),
        )
        embeds = self.ops.merge(ids, image_features, starts, self.graphs["vision"].to_numpy)
        return embeds, mask, starts

    # ------------------------------------------------------------ the loop
    def prefill(
        self,
        pixel_values: np.ndarray,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        force: Forcing | None = None,
        reserve: int = 0,
    ) -> tuple[DecodeState, Generation]:
        """Vision, merge, segment 0, pivot, segment 1 over the prompt. Returns the state the decode steps carry
        (with the first logits; its caches have room for `reserve` decode steps) and a `Generation` holding the kept
        indices (no tokens yet)."""
        g, L, S = self.graphs, self.layout, self.schedule
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        vision = g["vision"].run(
            {"pixel_values": pixel_values.astype(self.np_dtype), "stage1_indices": force and force.stage1_indices}
        )
        image_features = vision["image_features"]  # where the vision graph left it
        stage1_indices = g["vision"].to_numpy(vision["stage1_indices"])
        timings["vision_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        embeds, mask0, image_start = self.merge(input_ids, attention_mask, image_features)
        batch, n = mask0.shape
        positions = np.where(mask0 > 0, np.cumsum(mask0, -1) - 1, 1).astype(np.int64)  # HF generate's rule
        index = np.arange(n)[None, :]
        suffix_rows = STAGE2_ROWS[S.stage2_scorer](index, image_start + S.stage1_keep, mask0)

        seg0 = g["segment0"].run(
            {"inputs_embeds": embeds, "attention_mask": mask0, "position_ids": positions, "suffix_rows": suffix_rows}
            | self._empty_past(batch, range(0, S.pivot_layer + 1))
        )
        pivot = g["pivot"].run(
            {
                "hidden_states": seg0["hidden_states"],
                "stage2_scores": seg0["stage2_scores"],
                "attention_mask": mask0,
                "position_ids": positions,
                "image_start": image_start,
                "stage2_indices": force and force.stage2_indices,
            }
        )
        mask1 = g["pivot"].to_numpy(pivot["pruned_attention_mask"]).astype(np.int64)
        seg1 = g["segment1"].run(
            {
                "hidden_states": pivot["pruned_hidden_states"],
                "attention_mask": mask1,
                "position_ids": pivot["pruned_position_ids"],
            }
            | self._empty_past(batch, range(S.pivot_layer + 1, L.num_layers))
        )
        state = DecodeState(
            cache0=self._cache(g["segment0"], seg0, mask0, reserve),
            cache1=self._cache(g["segment1"], seg1, mask1, reserve),
            next_pos=positions.max(-1, keepdims=True) + 1,  # (B, 1): the unpruned length per row
            logits=g["segment1"].to_numpy(seg1["logits"])[:, -1].astype(self.logits_dtype),
        )
        timings["prefill_s"] = time.perf_counter() - t1
        result = Generation(
            token_ids=[[] for _ in range(batch)],
            logits=[],
            stage1_indices=stage1_indices,
            stage2_indices=g["pivot"].to_numpy(pivot["stage2_indices"]),
            kv_bytes_after_prefill=state.cache0.nbytes() + state.cache1.nbytes(),
            seq_lens={"segment0": n, "segment1": mask1.shape[1]},
            timings=timings,
        )
        return state, result

    def step(self, state: DecodeState, tokens: np.ndarray) -> DecodeState:
        """One decode step: each row's token (B,) through both segments at the row's next position, written into
        both caches in place."""
        g = self.graphs
        batch = len(tokens)
        embeds = self.ops.embed(np.asarray(tokens, np.int64)[:, None])  # (B, 1, d)
        ones = np.ones((batch, 1), np.int64)
        c0, c1 = state.cache0, state.cache1
        in_place = bool(
            decode_graph_names(g)
        )  # ONNX Runtime decode graphs (runtime/decode.py): they write the new slot themselves
        if in_place:
            c0.make_room(1)
            c1.make_room(1)
        first, second = (g["decode0"], g["decode1"]) if in_place else (g["segment0"], g["segment1"])
        seg0 = first.run(
            {
                "inputs_embeds": embeds,
                "attention_mask": c0.attention_mask(1),
                "position_ids": state.next_pos,
                "suffix_rows": np.zeros((batch, 1), np.int64),
                CACHE_LENGTH: c0.length,
            }
            | c0.buffers
        )
        seg1 = second.run(
            {
                "hidden_states": seg0["hidden_states"],
                "attention_mask": c1.attention_mask(1),
                "position_ids": state.next_pos,
                CACHE_LENGTH: c1.length,
            }
            | c1.buffers
        )
        if in_place:
            c0.advance(ones)
            c1.advance(ones)
        else:
            c0.append(self._new(seg0), ones, _cache_read(first))
            c1.append(self._new(seg1), ones, _cache_read(second))
        return DecodeState(
            cache0=c0,
            cache1=c1,
            next_pos=state.next_pos + 1,
            logits=second.to_numpy(seg1["logits"])[:, -1].astype(self.logits_dtype),
        )

    def stream(
        self,
        pixel_values: np.ndarray,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        sampling: Sampling,
        force: Forcing | None = None,
    ) -> Iterator[tuple[np.ndarray, Generation]]:
        """Yields (tokens of this step (B,), the Generation so far) after prefill and after every step.
        `force`: take these kept indices and tokens instead of choosing (reference graphs only)."""
        L = self.layout
        state, result = self.prefill(
            pixel_values, input_ids, attention_mask, force, reserve=sampling.max_new_tokens - 1
        )
        batch = len(state.logits)
        rng = np.random.default_rng(sampling.seed)
        finished = np.zeros(batch, dtype=bool)
        decode_s = 0.0
        for step in range(sampling.max_new_tokens):
            result.logits.append(state.logits)
            if force is None:
                tokens = sample_next(state.logits, sampling, rng)
            else:
                tokens = np.array(
                    [row[step] if step < len(row) else L.pad_token_id for row in force.token_ids], dtype=np.int64
                )
            tokens = np.where(finished, L.pad_token_id, tokens)
            for b in np.flatnonzero(~finished):
                result.token_ids[b].append(int(tokens[b]))
            if force is not None:
                finished |= np.array([step + 1 >= len(row) for row in force.token_ids])
            elif sampling.stop_at_eos and L.eos_token_id is not None:
                finished |= tokens == L.eos_token_id
            yield tokens, result
            if finished.all() or step == sampling.max_new_tokens - 1:
                break
            t = time.perf_counter()
            state = self.step(state, tokens)
            decode_s += time.perf_counter() - t
        result.timings["decode_s"] = decode_s
        result.timings["decode_steps"] = len(result.logits) - 1

    def generate(
        self, pixel_values, input_ids, attention_mask, sampling: Sampling, force: Forcing | None = None
    ) -> Generation:
        result = None
        for _, result in self.stream(pixel_values, input_ids, attention_mask, sampling, force):
            pass
        return result
