"""Frozen configuration objects: the model's architecture numbers, the STAR schedule, the weight scheme, the
decoder layout the runtime needs, and an engine's limits.

`ModelSpec` is what a plan needs about a model (no weights); `StarSchedule` is one pruning schedule (STAR.md
"Budgets and defaults"), validated at construction; `WeightScheme` how the decoder's weights are stored;
`DecoderLayout` what the generation loop needs to build feeds and caches; `Limits` what one call may ask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from .errors import UserError


class ScheduleError(UserError, ValueError):
    """A schedule outside its allowed range; the message names the range."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Architecture numbers of a LLaVA-1.5 model (vision tower, projector, Llama decoder)."""

    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    vision_feature_layer: int
    vision_feature_select_strategy: str
    text_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 0
    head_dim: int = 0
    num_patches: int = dataclasses.field(init=False)
    num_vision_tokens: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ScheduleError(
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}: allowed 'default' or 'full'"
            )
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        patches = (self.image_size // self.patch_size) ** 2
        # "default" drops CLS (LLaVA-1.5); "full" keeps it as a visual token.
        tokens = patches if self.vision_feature_select_strategy == "default" else patches + 1
        object.__setattr__(self, "num_patches", patches)
        object.__setattr__(self, "num_vision_tokens", tokens)

    @property
    def kv_width(self) -> int:
        """Width of one layer's key (or value) per token: kv heads x head dim."""
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, config) -> "ModelSpec":
        """From a `LlavaConfig` (its `vision_config` and `text_config`)."""
        v, t = config.vision_config, config.text_config
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ScheduleError(f"vision_feature_layer {layer!r}: STAR needs one feature layer (an int)")
        return cls(
            vision_layers=v.num_hidden_layers,
            vision_hidden=v.hidden_size,
            vision_heads=v.num_attention_heads,
            vision_intermediate=v.intermediate_size,
            image_size=v.image_size,
            patch_size=v.patch_size,
            vision_feature_layer=layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            text_layers=t.num_hidden_layers,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
            vocab_size=t.vocab_size,
            head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        )

    @property
    def vision_layers_run(self) -> int:
        """How many CLIP layers produce `hidden_states[vision_feature_layer]` (HF counts the embeddings as entry 0)."""
        n = self.vision_feature_layer % (self.vision_layers + 1)
        if n < 1:
            raise ScheduleError(
                f"vision_feature_layer {self.vision_feature_layer} selects the embeddings; allowed: a layer output "
                f"(1..{self.vision_layers} or -{self.vision_layers}..-1)"
            )
        return n


def default_pivot(text_layers: int) -> int:
    """The middle of the stack: 15 for 32 layers (STAR.md), 19 for 40, 1 for 4."""
    return max(0, text_layers // 2 - 1)


def default_stage1_keep(num_tokens: int) -> int:
    """About 85 % of the visual tokens: 490 of 576 (STAR.md)."""
    return round(0.85 * num_tokens)


STAGE1_SCORERS = ("star", "cls", "none")
STAGE2_SCORERS = ("star", "last", "none")


@dataclass(frozen=True)
class Method:
    """A pruning method as a schedule of this engine: its scorers and the budgets it fixes (None: from the user or the
    recipe). Explicit flags override these."""

    stage1_scorer: str
    stage2_scorer: str
    stage1_keep: str | None = None  # "all": every visual token; "keep": the final keep
    pivot_layer: int | None = None


METHODS = {
    "star": Method("star", "star"),
    # FastV (Chen et al. 2024): no pruning in the vision tower; after decoder layer K = 2, the last prompt token's
    # attention ranks the image tokens: layers 0-1 see all of them, pivot P = 1.
    "fastv": Method("none", "last", stage1_keep="all", pivot_layer=1),
    # FasterVLM (Zhang et al. 2024): [CLS] attention in the vision tower keeps `keep` tokens; nothing in the decoder.
    "fastervlm": Method("cls", "none", stage1_keep="keep"),
}


@dataclass(frozen=True, kw_only=True)
class StarSchedule:
    """One STAR schedule: `keep <= stage1_keep <= num_vision_tokens`, `0 <= pivot_layer < num_layers - 1`.

    Decoder layers `0..pivot_layer` see `stage1_keep` visual tokens; layers `pivot_layer+1..` see `keep`.
    """

    keep: int
    stage1_keep: int
    pivot_layer: int
    vision_feature_layer: int
    num_vision_tokens: int
    num_layers: int
    # What each stage ranks by (graphs/select.py): stage 1 "star" (the column mean of the vision layer's attention) or
    # "cls" (FasterVLM: the [CLS] row) or "none" (nothing pruned: stage1_keep = every visual token); stage 2 "star"
    # (the suffix-text rows at the pivot) or "last" (FastV: the last prompt token's row) or "none" (keep = stage1_keep).
    stage1_scorer: str = "star"
    stage2_scorer: str = "star"

    def __post_init__(self) -> None:
        n, L = self.num_vision_tokens, self.num_layers
        for stage, scorer, allowed in (
            (1, self.stage1_scorer, STAGE1_SCORERS),
            (2, self.stage2_scorer, STAGE2_SCORERS),
        ):
            if scorer not in allowed:
                raise ScheduleError(f"stage-{stage} scorer {scorer!r}: allowed {', '.join(allowed)}")
        if self.stage1_scorer == "none" and self.stage1_keep != n:
            raise ScheduleError(
                f"stage 1 prunes nothing (scorer none) but stage1_keep={self.stage1_keep}: it must be {n}"
            )
        if self.stage2_scorer == "none" and self.keep != self.stage1_keep:
            raise ScheduleError(
                f"stage 2 prunes nothing (scorer none) but keep={self.keep} < stage1_keep={self.stage1_keep}: "
                "they must be equal"
            )
        if not 1 <= self.keep <= n:
            raise ScheduleError(
                f"keep={self.keep} is out of range: allowed 1 <= keep <= {n} (visual tokens of this model)"
            )
        if not self.keep <= self.stage1_keep <= n:
            raise ScheduleError(
                f"stage1_keep={self.stage1_keep} is out of range: allowed keep ({self.keep}) <= stage1_keep <= {n}"
            )
        if L < 2:
            raise ScheduleError(f"the decoder has {L} layer(s); a two-segment decoder needs at least 2")
        if not 0 <= self.pivot_layer < L - 1:
            raise ScheduleError(
                f"pivot_layer={self.pivot_layer} is out of range: allowed 0 <= pivot_layer <= {L - 2} "
                f"(the decoder has {L} layers and segment 1 needs at least one)"
            )

    @property
    def is_identity(self) -> bool:
        """Nothing is pruned: the schedule must reproduce the unpruned model."""
        return self.keep == self.stage1_keep == self.num_vision_tokens

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        *,
        keep: int,
        stage1_keep: int | None = None,
        pivot_layer: int | None = None,
        defaults: Mapping[str, int] | None = None,
        method: str = "star",
    ) -> "StarSchedule":
        """Recipe defaults (or the generic ones) overridden by the method's budgets, then by the user's values, then
        validated.

        A default stage-1 budget below `keep` is raised to `keep` (stage 1 must be the milder one);
        an explicit `stage1_keep` is never changed.
        """
        if method not in METHODS:
            raise ScheduleError(f"--method {method!r}: allowed {', '.join(METHODS)}")
        m = METHODS[method]
        if stage1_keep is None and m.stage1_keep is not None:
            stage1_keep = spec.num_vision_tokens if m.stage1_keep == "all" else keep
        if pivot_layer is None and m.pivot_layer is not None:
            pivot_layer = min(m.pivot_layer, spec.text_layers - 2)
        defaults = dict(defaults or {})
        if stage1_keep is None:
            stage1_keep = defaults.get("stage1_keep", default_stage1_keep(spec.num_vision_tokens))
            stage1_keep = min(max(stage1_keep, keep), spec.num_vision_tokens)
        if pivot_layer is None:
            pivot_layer = defaults.get("pivot_layer", default_pivot(spec.text_layers))
        return cls(
            keep=keep,
            stage1_keep=stage1_keep,
            pivot_layer=pivot_layer,
            vision_feature_layer=spec.vision_feature_layer,
            num_vision_tokens=spec.num_vision_tokens,
            num_layers=spec.text_layers,
            stage1_scorer=m.stage1_scorer,
            stage2_scorer=m.stage2_scorer,
        )

    @property
    def method(self) -> str | None:
        """The method whose scorers this schedule uses (None: a combination of none of them)."""
        scorers = (self.stage1_scorer, self.stage2_scorer)
        return next((name for name, m in METHODS.items() if (m.stage1_scorer, m.stage2_scorer) == scorers), None)

    def asdict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


SCHEMES = ("float", "int8", "int4")
QUANTIZED_GRAPHS = ("segment0", "segment1")  # a quantized --weights scheme applies to these; vision stays float


class SchemeError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class WeightScheme:
    """`float`: weights in the engine's dtype. `int8` / `int4`: weight-only, blockwise along K."""

    kind: str = "float"
    block_size: int = 128  # MatMulNBitsQuantizer's default
    symmetric: bool = True  # no zero points: q - 2^(bits-1)
    # MatMulNBits' attribute. 0: unset (float compute); 4: int8 compute where the runtime has it (ONNX Runtime's CPU
    # kernels: measured here 6.5x faster at one row, 2x at 622 rows). 4 is onnxruntime-genai's default for CPU.
    accuracy_level: int = 4

    def __post_init__(self):
        if self.kind not in SCHEMES:
            raise SchemeError(f"--weights {self.kind!r}: allowed {', '.join(SCHEMES)}")
        if self.quantized and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise SchemeError(f"--block-size {self.block_size}: allowed a power of two >= 16 (default 128)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise SchemeError(f"--accuracy-level {self.accuracy_level}: allowed 0-4 (0: unset, float compute)")

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}[self.kind]

    def bytes_per_weight(self, dtype_bytes: int) -> float:
        """Stored bytes per weight element: packed values + one scale (in the activation dtype) per block."""
        if not self.quantized:
            return float(dtype_bytes)
        return self.bits / 8 + dtype_bytes / self.block_size + (0 if self.symmetric else 0.5 / self.block_size)

    def asdict(self) -> dict:
        d = asdict(self)
        return d if self.quantized else {"kind": "float"}

    @classmethod
    def from_dict(cls, d: dict | None) -> "WeightScheme":
        return cls(**(d or {"kind": "float"}))


@dataclass(frozen=True, kw_only=True)
class DecoderLayout:
    """What the loop needs to know about the decoder to build feeds and empty caches."""

    num_layers: int
    num_key_value_heads: int
    head_dim: int
    image_token_id: int
    num_vision_tokens: int
    eos_token_id: int | None
    pad_token_id: int
    dtype: str  # numpy dtype name of activations and caches


LIMIT_FIELDS = ("max_batch_size", "max_input_len", "max_new_tokens")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one call of an engine may ask: rows per call, prompt tokens (image tokens included), generated tokens."""

    max_batch_size: int
    max_input_len: int
    max_new_tokens: int

    def asdict(self) -> dict[str, int]:
        return asdict(self)


# ONNX Runtime execution providers by short name, and OpenVINO's CPU plugin (runtime/openvino.py); auto: the fastest
# measured that this machine has (runtime/sessions.auto_provider)
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt", "openvino")
THREAD_POOLS = ("shared", "per-session")  # runtime/threads.py
CPU_ARENAS = ("shared", "session", "off")  # runtime/sessions.py `cpu_arena`


class RuntimeOptionsError(UserError, ValueError):
    """A runtime option outside its allowed values; the message names them."""


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """How an engine's ONNX Runtime sessions run (the star-run / star-validate / star-serve flags of the same names).

    `thread_pool` and `cpu_arena` None: the environment's choice ($STAR_ORT_THREAD_POOL, $STAR_ORT_CPU_ARENA), else the
    default (a pool per session for a program that imports the package, the shared pool in star-* commands; one shared
    CPU arena). The thread pool is the process's, fixed by its first session (runtime/threads.py)."""

    provider: str = "auto"
    allow_fallback: bool = False  # run on the CPU where the asked-for GPU provider is missing
    thread_pool: str | None = None
    cpu_arena: str | None = None
    decode_graphs: bool = True  # decode with the engine's ONNX Runtime decode graphs where it has them (CPU provider)
    prefill_graphs: bool = True  # its prefill graphs (fused attention) in place of the segment graphs (CPU provider)

    def __post_init__(self):
        for name, value, allowed in (
            ("provider", self.provider, PROVIDERS),
            ("thread_pool", self.thread_pool, THREAD_POOLS),
            ("cpu_arena", self.cpu_arena, CPU_ARENAS),
        ):
            if value is not None and value not in allowed:
                flag = "--" + name.replace("_", "-")
                raise RuntimeOptionsError(f"{flag} {value!r}: allowed {', '.join(allowed)}")
