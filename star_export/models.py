"""Model loading: recipe aliases (`engines/*.json`), local Hugging Face directories, the offline HF cache,
and the embedded random `tiny-llava` (real transformers classes, fixed seed, offline tokenizer/processor).

Every loaded model runs eager attention: STAR reads attention probabilities, and HF's default `sdpa`
silently returns none. Weights load from safetensors only.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .config import ModelSpec
from .errors import UserError, user_error_from
from .processor import CHAT_TEMPLATE, normalize_processor


# Text the tiny tokenizer's BPE merges are learnt from (offline, deterministic).
_TOKENIZER_CORPUS = """
USER: ASSISTANT: What is in the image? Describe the picture in detail. How many objects are there?
What color is the car? Is there a person in this photo? Where was this picture taken?
The image shows a red car parked on a street next to a tall building with many windows.
A dog is running across a green field while two children play with a ball near the trees.
There are three cats sitting on a wooden table in a bright kitchen with white walls.
The sky is blue and the sun is shining over the mountains and the calm lake below.
A man wearing a black jacket is holding an umbrella in the rain at night in the city.
What is the person doing? What time of day is it? Is the weather sunny or cloudy?
Answer the question using a single word or phrase. Yes, no, one, two, three, four, five.
""".strip()


class ModelLoadError(UserError):
    """Base class: the model could not be loaded; the message says how to fix it."""


class UnknownModelError(ModelLoadError):
    pass


class MissingWeightsError(ModelLoadError):
    pass


@dataclass(frozen=True)
class Recipe:
    alias: str
    spec: ModelSpec
    defaults: dict[str, int]
    hf_id: str | None = None
    builder: str | None = None
    seed: int = 0


TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def cast_module(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` in place, except that floating buffers are never narrowed: Hugging Face keeps RoPE's
    `inv_freq` in float32 for float16 / bfloat16 models (`from_pretrained(dtype=torch.float16)` does) and computes the
    angles from it in float32. Narrowed, it rounds the frequencies to float16 and turns the angle at position 600 by
    up to ~0.3 rad (found by the self-check of a real-width float16 engine: its keys 30x further from float64 than
    eager float16's)."""
    keep = {
        n: b.detach().clone()
        for n, b in model.named_buffers()
        if b.is_floating_point() and b.element_size() > torch.finfo(dtype).bits // 8
    }
    model.to(dtype)
    for name, value in keep.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = value
    return model


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy of `model` whose floating parameters are made in `dtype` one at a time, never as a full-width copy
    first (`copy.deepcopy(...).to(dtype)` holds one for a moment: 4 bytes per parameter more when the self-check casts
    its float64 quantized reference to float32). Buffers, hooks and tied parameters copy as deepcopy copies them."""
    memo = {
        id(p): torch.nn.Parameter(
            p.detach().to(dtype) if p.is_floating_point() else p.detach().clone(), requires_grad=p.requires_grad
        )
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


@dataclass
class LoadedModel:
    model: Any  # LlavaForConditionalGeneration, eval mode, eager attention
    processor: Any  # LlavaProcessor, left padding
    spec: ModelSpec
    defaults: dict[str, int]
    source: dict[str, Any] = field(default_factory=dict)
    _casts: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    def cast(self, dtype: str) -> "LoadedModel":
        """This model in `dtype` (a copy, made once and kept; the original is unchanged)."""
        if dtype == self.dtype:
            return self
        if dtype not in self._casts:
            model = cast_module(cast_copy(self.model, TORCH_DTYPES[dtype]), TORCH_DTYPES[dtype])
            self._casts[dtype] = LoadedModel(model, self.processor, self.spec, self.defaults, self.source)
        return self._casts[dtype]


# ---------------------------------------------------------------- recipes


def _recipe_files() -> dict[str, Any]:
    try:  # installed wheel: engines/ ships as the package `star_export.engines`
        root = resources.files("star_export.engines")
    except ModuleNotFoundError:  # source checkout / editable install: the top-level engines/ folder
        root = Path(__file__).resolve().parent.parent / "engines"
    return {p.name[: -len(".json")]: p for p in root.iterdir() if p.name.endswith(".json")}


def known_aliases() -> list[str]:
    return sorted(_recipe_files())


def recipe_from_alias(alias: str) -> Recipe:
    files = _recipe_files()
    if alias not in files:
        raise UnknownModelError(
            f"unknown model {alias!r}: known aliases are {', '.join(sorted(files))}; "
            "or pass a local Hugging Face directory, or a model id already in the local HF cache"
        )
    d = json.loads(files[alias].read_text())
    return Recipe(
        alias=alias,
        spec=ModelSpec.from_dict(d["architecture"] | {"vocab_size": d["architecture"].get("vocab_size", 0)}),
        defaults=dict(d.get("defaults", {})),
        hf_id=d.get("hf_id"),
        builder=d.get("builder"),
        seed=int(d.get("seed", 0)),
    )


def _resolve(name: str) -> tuple[Recipe | None, Path | None, str | None]:
    """What `name` names, without reading weights: (recipe, None, None) for an alias, (None, directory, hf_id)
    for a local directory or a model id already in the local HF cache; anything else raises."""
    path = Path(name)
    if path.is_dir():
        return None, path, None
    if name in _recipe_files():
        return recipe_from_alias(name), None, None
    if name.count("/") == 1 and not _looks_like_path(name):
        snap = _from_hf_cache(name)
        if snap is None:
            raise _missing_weights(f"{name!r} is neither a local directory nor in the local Hugging Face cache", name)
        return None, snap, name
    raise _unknown(name)


def spec_from_name(name: str) -> tuple[ModelSpec, dict[str, int]]:
    """Architecture and schedule defaults without loading weights (for `--dry-run` and early checks)."""
    recipe, directory, hf_id = _resolve(name)
    if recipe is not None:
        return recipe.spec, recipe.defaults
    return ModelSpec.from_hf(config_from_directory(directory, hf_id)), {}


# ---------------------------------------------------------------- tiny random models


def build_tokenizer():
    """A real byte-level BPE tokenizer with Llama's special tokens and `<image>`, learnt offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=4096,
    )


def build_processor(spec: ModelSpec, tokenizer=None):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_random_llava(
    spec: ModelSpec, *, seed: int = 0, text_init_std: float = 0.2, qk_scale: float = 4.0, text_qk_scale: float = 1.0
):
    """A `LlavaForConditionalGeneration` with random weights and its processor.

    Two deliberate changes to plain random init: CLIP q/k projections are scaled by
    `qk_scale` so stage-1 attention rankings are not near-ties, and the Llama decoder is drawn with a
    wide init (`text_init_std`) so greedy output depends on the question. `text_qk_scale` sharpens the
    decoder's attention the same way (tests sweep it).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    processor = build_processor(spec)
    tok = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_intermediate,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            projection_dim=spec.vision_hidden,
        ),
        text_config=LlamaConfig(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            vocab_size=len(tok),
            max_position_embeddings=4096,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=spec.num_vision_tokens,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
        for module in model.model.language_model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * text_init_std)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=gen) * text_init_std)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(text_qk_scale)
            layer.self_attn.k_proj.weight.mul_(text_qk_scale)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return _prepare(model), processor


# ---------------------------------------------------------------- loading


def _prepare(model):
    model.set_attn_implementation("eager")
    return model.eval().requires_grad_(False)


FINGERPRINT_SAMPLES = 32  # blocks of tensor data read per safetensors file
FINGERPRINT_BLOCK = 1 << 16


def fingerprint_directory(path: Path) -> str:
    """sha256 over config.json and, per safetensors file, its name, size, header (tensor names, shapes, dtypes,
    offsets) and 32 evenly spaced 64 KiB blocks of its tensor data: about 2 MiB read per file, cheap for a 14 GB
    checkpoint, and two models of one architecture with other weights differ. (The scheme is the prefix: a
    fingerprint of another scheme is not comparable.)"""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + str(size).encode() + fh.read(min(n, 1 << 24)))
            start, span = 8 + n, max(0, size - 8 - n - FINGERPRINT_BLOCK)
            for i in range(FINGERPRINT_SAMPLES):
                fh.seek(start + span * i // max(1, FINGERPRINT_SAMPLES - 1))
                h.update(fh.read(FINGERPRINT_BLOCK))
    return "sha256-sampled:" + h.hexdigest()


def fingerprint_weights(model) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: for in-memory (random) models, which are small."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode() + t.view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256-weights:" + h.hexdigest()


def _missing_weights(what: str, hf_id: str | None) -> MissingWeightsError:
    repo = hf_id or "<org>/<model>"
    return MissingWeightsError(
        f"{what}. Weights are not downloaded here. On a connected machine run "
        f"`huggingface-cli download {repo} --local-dir ./{repo.split('/')[-1]}` (safetensors), copy that directory "
        "over, and pass it with --model PATH"
    )


def config_from_directory(path: Path, hf_id: str | None = None):
    """The directory's `LlavaConfig`, or a ModelLoadError naming what is wrong with `config.json`."""
    from transformers import AutoConfig

    file = path / "config.json"
    if not file.is_file():
        raise _missing_weights(f"{path} has no config.json (not a Hugging Face model directory)", hf_id)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{file} is not valid JSON ({e}): re-copy the model directory") from e
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(
            f"{file} has no 'model_type': not a Hugging Face model config; star-export needs a LLaVA-1.5 model "
            "('llava')"
        )
    if data["model_type"] != "llava":
        raise UnknownModelError(
            f"{path}: model_type {data['model_type']!r}; star-export supports LLaVA-1.5 models ('llava')"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        ModelSpec.from_hf(config)  # every number a plan needs is there
    except UserError:
        raise
    except (
        Exception
    ) as e:  # transformers validates configs with exception types of its own; any failure here is the file's
        raise ModelLoadError(
            f"{file} is not a usable LLaVA config ({type(e).__name__}: {e}): re-copy the model directory"
        ) from e
    return config


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint declares (`torch_dtype` / `dtype`), float32 when it declares none we run."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else "float32"
    return TORCH_DTYPES.get(name, torch.float32) if name != "float64" else torch.float32


def load_from_directory(path: str | Path, *, source: dict | None = None, hf_id: str | None = None) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    config = config_from_directory(path, hf_id)
    if not any(path.glob("*.safetensors")):
        raise _missing_weights(f"{path} has no *.safetensors weights", hf_id)
    spec = ModelSpec.from_hf(config)
    try:
        # The checkpoint's own dtype: safetensors stay memory-mapped (a 14 GB float16 checkpoint opens in 0.4 GiB);
        # export casts tensor by tensor, the reference makes its own copies.
        model, info = LlavaForConditionalGeneration.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation="eager",
            dtype=checkpoint_dtype(config),
            output_loading_info=True,
        )
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        if user_error_from(e):
            raise
        raise ModelLoadError(
            f"the weights in {path} could not be read ({type(e).__name__}: {str(e)[:300]}): a file may be truncated or "
            "corrupt; re-copy the model directory"
        ) from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values, and say so only in a warning
        raise ModelLoadError(
            f"the weights in {path} lack {len(missing)} tensor(s) the model needs (e.g. {', '.join(missing[:3])}): "
            "an incomplete or foreign checkpoint; re-copy the model directory"
        )
    try:
        processor = normalize_processor(AutoProcessor.from_pretrained(path, local_files_only=True), spec)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ModelLoadError(
            f"{path} has no usable tokenizer / processor ({type(e).__name__}: {str(e)[:300]}): copy tokenizer.json, "
            "tokenizer_config.json, preprocessor_config.json and processor_config.json from the model's repository"
        ) from e
    src = source or {"kind": "path", "name": str(path.resolve())}
    src.setdefault("fingerprint", fingerprint_directory(path))
    return LoadedModel(_prepare(model), processor, spec, {}, src)


def _from_hf_cache(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def require_weights(name: str) -> None:
    """Raise now (before plans and checks that assume them) when `name` has no weights to load here."""
    recipe, directory, hf_id = _resolve(name)
    if recipe is not None and recipe.builder != "random" and _from_hf_cache(recipe.hf_id) is None:
        raise _missing_weights(f"{name} ({recipe.hf_id}) is not in the local Hugging Face cache", recipe.hf_id)
    if directory is not None and not any(directory.glob("*.safetensors")):
        raise _missing_weights(f"{directory} has no *.safetensors weights", hf_id)


def load_model(name: str) -> LoadedModel:
    """`name`: a recipe alias (`tiny-llava`, `llava-1.5-7b`, ...), a local HF directory, or an HF id in the local
    cache."""
    recipe, directory, hf_id = _resolve(name)
    if recipe is None:
        source = {"kind": "hf-cache", "name": name, "revision": directory.name} if hf_id else None
        return load_from_directory(directory, source=source, hf_id=hf_id)
    if recipe.builder == "random":
        model, processor = build_random_llava(recipe.spec, seed=recipe.seed)
        spec = ModelSpec.from_hf(model.config)
        source = {
            "kind": "alias",
            "name": name,
            "seed": recipe.seed,
            "random_weights": True,
            "fingerprint": fingerprint_weights(model),
        }
        return LoadedModel(model, processor, spec, recipe.defaults, source)
    snap = _from_hf_cache(recipe.hf_id)
    if snap is None:
        raise _missing_weights(f"{name} ({recipe.hf_id}) is not in the local Hugging Face cache", recipe.hf_id)
    loaded = load_from_directory(
        snap, source={"kind": "alias", "name": name, "hf_id": recipe.hf_id, "revision": snap.name}, hf_id=recipe.hf_id
    )
    loaded.defaults = recipe.defaults
    return loaded


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _unknown(name: str) -> ModelLoadError:
    if Path(name).exists():
        return UnknownModelError(
            f"--model {name!r} is a file, not a model directory: pass a local Hugging Face directory or an alias"
        )
    if _looks_like_path(name):
        return UnknownModelError(
            f"model directory {name!r} does not exist: pass an existing local Hugging Face directory"
        )
    return UnknownModelError(
        f"unknown model {name!r}: known aliases are {', '.join(known_aliases())}; "
        "or pass a local Hugging Face directory, or a model id already in the local HF cache"
    )
