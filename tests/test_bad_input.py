"""Bad input to every command is exit 2, a message naming the problem, no traceback, nothing left behind.

One table, one row per distinct bad input. Each row builds what it needs under a fresh directory and runs the
command in-process; `--out` always points into that directory, which must hold afterwards exactly what it held
before the command ran.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from star_export.cli import export_main, run_main, validate_main
from star_export.manifest import MANIFEST
from star_export.models import build_random_llava
from star_export.runtime.inputs import synthetic_image

TOOLS = {"export": export_main, "run": run_main, "validate": validate_main}


@pytest.fixture(scope="module")
def tiny_twin(tmp_path_factory):
    """tiny-llava's architecture with other weights, as a local directory."""
    from star_export.models import load_model

    spec = load_model("tiny-llava").spec
    model, processor = build_random_llava(spec, seed=99)
    d = tmp_path_factory.mktemp("twin")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


class Ctx:
    def __init__(self, root: Path, engine: Path, other_dir: Path, tiny_twin: Path):
        self.root, self.engine, self.other_dir, self.tiny_twin = root, engine, other_dir, tiny_twin
        self.image = root / "image.png"
        synthetic_image(3).save(self.image)
        self.out = root / "out"

    def path(self, name: str) -> Path:
        return self.root / name

    def model_dir(self, config: dict | str | None, weights: bytes | None = None) -> str:
        d = self.path("model")
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        return str(d)

    def model_missing_tensor(self) -> str:
        """tiny_twin with one decoder weight dropped from its safetensors (transformers would fill it randomly)."""
        from safetensors.torch import load_file, save_file

        d = self.path("partial")
        shutil.copytree(self.tiny_twin, d)
        for f in d.glob("*.safetensors"):
            tensors = load_file(f)
            name = next(k for k in tensors if "layers.0.mlp.up_proj" in k)
            del tensors[name]
            save_file(tensors, f, metadata={"format": "pt"})
        return str(d)

    def seven_b(self) -> str:
        """The published llava-1.5-7b-hf config.json alone: the memory check runs before any weight is read."""
        from star_export import checkpoints

        return self.model_dir(checkpoints.config(32, 24), weights=b"\x00" * 16)

    def raw_model_dir(self, config_bytes: bytes) -> str:
        d = self.path("model")
        d.mkdir()
        (d / "config.json").write_bytes(config_bytes)
        return str(d)

    def user_dir(self) -> str:
        """--out holding a user's file (not an engine)."""
        self.out.mkdir()
        (self.out / "mine.txt").write_text("user data")
        return str(self.out)

    def other_config(self, **changes) -> dict:
        return json.loads((self.other_dir / "config.json").read_text()) | changes

    def bad_engine(self, how) -> str:
        bad = self.path("bad-engine")
        shutil.copytree(self.engine, bad)
        how(bad)
        return str(bad)

    def manifest(self, engine_dir: Path, change) -> None:
        m = json.loads((engine_dir / MANIFEST).read_text())
        (engine_dir / MANIFEST).write_text(json.dumps(change(m)))

    def file(self, name: str, data: bytes) -> str:
        p = self.path(name)
        p.write_bytes(data)
        return str(p)

    def bomb_png(self) -> str:
        """A valid PNG header declaring 30000 x 30000 pixels (900 M) with almost no data."""
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
        return self.file("bomb.png", b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))

    def locked_out(self) -> str:
        """--out while another export holds its lock (an open file description of our own stands in for it)."""
        import fcntl
        import os

        self.lock_fd = os.open(self.root / f".{self.out.name}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        return str(self.out)

    def fifo(self) -> str:
        import os

        os.mkfifo(self.path("pipe.png"))
        return str(self.path("pipe.png"))

    def wide_png(self) -> str:
        from PIL import Image

        Image.new("RGB", (5000, 1)).save(self.path("wide.png"))
        return str(self.path("wide.png"))

    def run(self, *args, images=None, prompts=("What is in the image?",)):
        images = [str(self.image)] * len(prompts) if images is None else images
        pairs = [a for i, p in zip(images, prompts) for a in ("--image", i, "--prompt", p)]
        return [str(self.engine), *pairs, *args]


def _rm(name):
    return lambda d: (d / name).unlink()


# (id, tool, argv from ctx, words the message must hold)
CASES = [
    # ---- star-export: schedule and model
    ("keep-0", "export", lambda c: ["--keep", "0", "--out", str(c.out)], "keep=0 is out of range"),
    ("keep-577", "export", lambda c: ["--keep", "577", "--out", str(c.out)], "1 <= keep <= 576"),
    ("keep-negative", "export", lambda c: ["--keep", "-5", "--out", str(c.out)], "keep=-5 is out of range"),
    ("keep-not-a-number", "export", lambda c: ["--keep", "lots", "--out", str(c.out)], "argument --keep: invalid int value"),
    ("stage1-over-576", "export", lambda c: ["--stage1-keep", "600", "--out", str(c.out)], "stage1_keep=600 is out of range"),
    ("stage1-below-keep", "export", lambda c: ["--keep", "100", "--stage1-keep", "50", "--out", str(c.out)], "keep (100) <= stage1_keep"),
    ("pivot-too-deep", "export", lambda c: ["--pivot-layer", "3", "--out", str(c.out)], "0 <= pivot_layer <= 2"),
    ("pivot-negative", "export", lambda c: ["--pivot-layer", "-1", "--out", str(c.out)], "0 <= pivot_layer"),
    ("pivot-too-deep-dry-run", "export", lambda c: ["--model", "llava-1.5-7b", "--pivot-layer", "31", "--dry-run"], "0 <= pivot_layer <= 30"),
    ("unknown-alias", "export", lambda c: ["--model", "llava-1.5-7x", "--out", str(c.out)], "unknown model 'llava-1.5-7x'"),
    ("model-dir-missing", "export", lambda c: ["--model", str(c.path("nope")), "--out", str(c.out)], "does not exist"),
    ("model-is-a-file", "export", lambda c: ["--model", c.file("weights.bin", b"x"), "--out", str(c.out)], "is a file, not a model directory"),
    ("model-dir-without-config", "export", lambda c: ["--model", c.model_dir(None), "--out", str(c.out)], "has no config.json"),
    ("config-not-json", "export", lambda c: ["--model", c.model_dir("{not json"), "--out", str(c.out)], "is not valid JSON"),
    ("config-not-utf8", "export", lambda c: ["--model", c.raw_model_dir(b"\xff\xfe\x00{"), "--out", str(c.out)], "is not valid JSON"),
    ("config-without-model-type", "export", lambda c: ["--model", c.model_dir({"hidden_size": 64}), "--out", str(c.out)], "has no 'model_type'"),
    ("config-a-list", "export", lambda c: ["--model", c.model_dir("[1, 2]"), "--out", str(c.out)], "has no 'model_type'"),
    ("config-not-llava", "export", lambda c: ["--model", c.model_dir({"model_type": "llama"}), "--out", str(c.out)], "model_type 'llama'"),
    ("config-not-llava-dry-run", "export", lambda c: ["--model", c.model_dir({"model_type": "llama"}), "--dry-run"], "model_type 'llama'"),
    ("config-llava-broken", "export", lambda c: ["--model", c.model_dir({"model_type": "llava", "vision_config": 7}), "--dry-run"], "not a usable LLaVA config"),
    ("feature-layer-list", "export", lambda c: ["--model", c.model_dir(c.other_config(vision_feature_layer=[-2, -1])), "--dry-run"], "needs one feature layer"),
    ("feature-strategy-unknown", "export", lambda c: ["--model", c.model_dir(c.other_config(vision_feature_select_strategy="middle")), "--dry-run"], "vision_feature_select_strategy"),
    ("no-safetensors", "export", lambda c: ["--model", c.model_dir(c.other_config()), "--out", str(c.out)], "no *.safetensors weights"),
    ("corrupt-safetensors", "export", lambda c: ["--model", c.model_dir(c.other_config(), b"\xff" * 8 + b"garbage"), "--out", str(c.out)], "could not be read"),
    ("hf-id-not-in-cache", "export", lambda c: ["--model", "some-org/some-llava", "--out", str(c.out)], "nor in the local Hugging Face cache"),
    ("alias-not-in-cache", "export", lambda c: ["--model", "llava-1.5-7b", "--out", str(c.out)], "huggingface-cli download llava-hf/llava-1.5-7b-hf"),
    # ---- star-export: build options and output
    ("dtype-bfloat16-onnx", "export", lambda c: ["--dtype", "bfloat16", "--out", str(c.out)], "--dtype bfloat16 is not supported by --backend onnx"),
    ("dtype-unknown", "export", lambda c: ["--dtype", "int3", "--out", str(c.out)], "argument --dtype: invalid choice"),
    # ---- star-export: weights and memory
    ("weights-unknown", "export", lambda c: ["--weights", "int3", "--out", str(c.out)], "argument --weights: invalid choice"),
    ("block-size-not-power-of-two", "export", lambda c: ["--weights", "int4", "--block-size", "48", "--out", str(c.out)], "--block-size 48: allowed a power of two"),
    ("block-size-without-quantization", "export", lambda c: ["--block-size", "64", "--out", str(c.out)], "apply to --weights int8 / int4 only"),
    ("accuracy-level-out-of-range", "export", lambda c: ["--weights", "int4", "--accuracy-level", "7", "--out", str(c.out)], "argument --accuracy-level: invalid choice"),
    ("quantized-tensorrt", "export", lambda c: ["--weights", "int8", "--backend", "tensorrt", "--out", str(c.out)], "--backend tensorrt needs TensorRT"),
    ("memory-budget-zero", "export", lambda c: ["--memory-budget", "0", "--out", str(c.out)], "allowed a number of GiB > 0"),
    ("checkpoint-missing-a-tensor", "export", lambda c: ["--model", c.model_missing_tensor(), "--out", str(c.out)], "lack 1 tensor(s) the model needs"),
    ("memory-budget-too-small", "export", lambda c: ["--memory-budget", "0.5", "--out", str(c.out)], "needs about"),
    ("float32-7b-does-not-fit", "export", lambda c: ["--model", c.seven_b(), "--memory-budget", "12", "--out", str(c.out)], "Alternatives that fit"),
    ("backend-tensorrt", "export", lambda c: ["--backend", "tensorrt", "--out", str(c.out)], "--backend tensorrt"),
    ("backend-unknown", "export", lambda c: ["--backend", "tvm", "--out", str(c.out)], "argument --backend: invalid choice"),
    ("out-missing", "export", lambda c: [], "--out is required"),
    ("out-is-a-file", "export", lambda c: ["--out", c.file("out", b"x")], "exists and is not a directory"),
    ("out-not-empty", "export", lambda c: ["--out", c.user_dir()], "pass --force"),
    ("force-on-a-user-directory", "export", lambda c: ["--out", c.user_dir(), "--force"], "is not an engine directory"),
    ("out-parent-missing", "export", lambda c: ["--out", str(c.path("a/b/engine"))], "does not exist: create it first"),
    ("out-unwritable", "export", lambda c: ["--out", "/proc/star-export-engine"], "not writable"),
    ("out-is-the-current-directory", "export", lambda c: ["--out", "."], "is the current directory"),
    ("out-name-too-long", "export", lambda c: ["--out", str(c.path("e" * 250))], "use a shorter name"),
    ("out-component-over-255-bytes", "export", lambda c: ["--out", str(c.path("x" * 300) / "engine")], "over the file system's 255"),
    ("out-not-utf8", "export", lambda c: ["--out", str(c.root / "engine-\udcff")], "is not a valid UTF-8 path"),
    ("out-locked-by-another-export", "export", lambda c: ["--out", c.locked_out()], "another star-export is writing --out"),
    ("max-batch-size-0", "export", lambda c: ["--max-batch-size", "0", "--out", str(c.out)], "argument --max-batch-size: 0: allowed >= 1"),
    ("max-input-len-0", "export", lambda c: ["--max-input-len", "0", "--out", str(c.out)], "argument --max-input-len: 0: allowed >= 1"),
    ("max-input-len-below-image", "export", lambda c: ["--max-input-len", "100", "--out", str(c.out)], "leaves no room for a prompt"),
    ("max-input-len-below-template", "export", lambda c: ["--max-input-len", "578", "--out", str(c.out)], "too small for any prompt"),
    ("max-new-tokens-0", "export", lambda c: ["--max-new-tokens", "0", "--out", str(c.out)], "argument --max-new-tokens: 0: allowed >= 1"),
    ("max-new-tokens-text", "export", lambda c: ["--max-new-tokens", "many", "--out", str(c.out)], "'many' is not a whole number"),
    ("text-tokens-0", "export", lambda c: ["--dry-run", "--text-tokens", "0"], "argument --text-tokens: 0: allowed >= 1"),
    ("unknown-flag", "export", lambda c: ["--frobnicate"], "unrecognized arguments: --frobnicate"),
    # ---- star-run: the engine directory
    ("engine-missing", "run", lambda c: [str(c.path("nope")), "--image", str(c.image), "--prompt", "Hi"], "does not exist"),
    ("engine-is-a-file", "run", lambda c: [str(c.engine / MANIFEST), "--image", str(c.image), "--prompt", "Hi"], "is a file, not an engine directory"),
    ("not-an-engine", "run", lambda c: [str(c.root), "--image", str(c.image), "--prompt", "Hi"], "not an engine directory (no star.json)"),
    ("manifest-not-json", "run", lambda c: [c.bad_engine(lambda d: (d / MANIFEST).write_text("{")), "--image", str(c.image), "--prompt", "Hi"], "is not valid JSON"),
    ("manifest-a-list", "run", lambda c: [c.bad_engine(lambda d: (d / MANIFEST).write_text("[1]")), "--image", str(c.image), "--prompt", "Hi"], "not an object"),
    ("manifest-missing-keys", "run", lambda c: [c.bad_engine(lambda d: c.manifest(d, lambda m: {k: v for k, v in m.items() if k != "layout"})), "--image", str(c.image), "--prompt", "Hi"], "lacks or mistypes layout"),
    ("manifest-malformed-schedule", "run", lambda c: [c.bad_engine(lambda d: c.manifest(d, lambda m: m | {"schedule": {"keep": 1}})), "--image", str(c.image), "--prompt", "Hi"], "is malformed"),
    ("manifest-newer", "run", lambda c: [c.bad_engine(lambda d: c.manifest(d, lambda m: m | {"format_version": 99})), "--image", str(c.image), "--prompt", "Hi"], "format_version 99"),
    ("graph-missing", "run", lambda c: [c.bad_engine(_rm("pivot.onnx")), "--image", str(c.image), "--prompt", "Hi"], "is missing pivot.onnx"),
    ("file-corrupted", "run", lambda c: [c.bad_engine(lambda d: (d / "embed_tokens.npy").write_bytes(b"0")), "--image", str(c.image), "--prompt", "Hi"], "does not match the sha256"),
    # ---- star-run: requests
    ("image-missing", "run", lambda c: c.run(images=[str(c.path("nope.png"))]), "does not exist"),
    ("image-is-a-directory", "run", lambda c: c.run(images=[str(c.root)]), "is a directory"),
    ("image-is-text", "run", lambda c: c.run(images=[c.file("notes.png", b"just text")]), "not a readable image"),
    ("image-truncated", "run", lambda c: c.run(images=[c.file("cut.png", c.image.read_bytes()[:200])]), "not a readable image"),
    ("image-decompression-bomb", "run", lambda c: c.run(images=[c.bomb_png()]), "pixels"),
    ("image-is-a-fifo", "run", lambda c: c.run(images=[c.fifo()]), "is not a regular file"),
    ("image-extreme-aspect-ratio", "run", lambda c: c.run(images=[c.wide_png()]), "aspect ratio of 5,000 : 1"),
    ("prompt-not-utf8", "run", lambda c: c.run(prompts=["What is \udcff?"]), "not valid UTF-8"),
    ("engine-schedule-edited", "run", lambda c: [c.bad_engine(lambda d: c.manifest(d, lambda m: m | {"schedule": m["schedule"] | {"keep": m["schedule"]["keep"] // 2}})),
                                                 "--image", str(c.image), "--prompt", "Hi"], "schedule.keep"),
    ("images-and-prompts-differ", "run", lambda c: [str(c.engine), "--image", str(c.image), "--image", str(c.image), "--prompt", "Hi"], "2 image(s) but 1 prompt(s)"),
    ("no-image", "run", lambda c: [str(c.engine), "--prompt", "Hi"], "the following arguments are required: --image"),
    ("two-image-tags", "run", lambda c: c.run(prompts=["<image> left <image> right"]), "2 '<image>' tags"),
    ("prompt-too-long", "run", lambda c: c.run(prompts=["tell me more " * 40]), "exceeds this engine's max input length 620"),
    ("batch-too-large", "run", lambda c: c.run(prompts=["Hi"] * 3), "exceed this engine's max batch size 2"),
    ("max-new-tokens-over-limit", "run", lambda c: c.run("--max-new-tokens", "9"), "exceeds this engine's limit 8"),
    ("temperature-negative", "run", lambda c: c.run("--temperature", "-1"), "temperature=-1.0: allowed a finite number >= 0"),
    ("temperature-inf", "run", lambda c: c.run("--temperature", "inf"), "a finite number is needed"),
    ("temperature-nan", "run", lambda c: c.run("--temperature", "nan"), "a finite number is needed"),
    ("temperature-text", "run", lambda c: c.run("--temperature", "warm"), "'warm' is not a number"),
    ("top-p-0", "run", lambda c: c.run("--top-p", "0"), "top_p=0.0: allowed 0 < top_p <= 1"),
    ("top-p-over-1", "run", lambda c: c.run("--top-p", "1.5"), "top_p=1.5"),
    ("seed-negative", "run", lambda c: c.run("--seed", "-1"), "allowed 0 <= value < 2**63"),
    ("stream-two-prompts", "run", lambda c: c.run("--stream", prompts=["Hi", "Ho"]), "--stream prints one request"),
    ("provider-cuda-missing", "run", lambda c: c.run("--provider", "cuda"), "needs CUDAExecutionProvider"),
    ("provider-tensorrt-missing", "run", lambda c: c.run("--provider", "tensorrt"), "needs TensorrtExecutionProvider"),
    ("provider-unknown", "run", lambda c: c.run("--provider", "tpu"), "argument --provider: invalid choice"),
    # ---- star-validate
    ("validate-engine-missing", "validate", lambda c: [str(c.path("nope"))], "does not exist"),
    ("validate-device-cuda-missing", "validate", lambda c: [str(c.engine), "--device", "cuda"], "torch sees no CUDA GPU"),
    ("validate-other-architecture", "validate", lambda c: [str(c.engine), "--model", str(c.other_dir)], "does not have the engine's architecture"),
    ("validate-other-weights", "validate", lambda c: [str(c.engine), "--model", str(c.tiny_twin)], "this is not the model the engine was built from"),
    ("validate-model-missing", "validate", lambda c: [str(c.engine), "--model", str(c.path("nope"))], "does not exist"),
    ("validate-image-without-prompt", "validate", lambda c: [str(c.engine), "--image", str(c.image)], "give them in pairs"),
    ("validate-image-missing", "validate", lambda c: [str(c.engine), "--image", str(c.path("nope.png")), "--prompt", "Hi"], "does not exist"),
    ("validate-two-image-tags", "validate", lambda c: [str(c.engine), "--image", str(c.image), "--prompt", "<image><image>"], "2 '<image>' tags"),
    ("validate-prompt-not-utf8", "validate", lambda c: [str(c.engine), "--image", str(c.image), "--prompt", "\udcff"], "not valid UTF-8"),
    ("validate-max-new-tokens-0", "validate", lambda c: [str(c.engine), "--max-new-tokens", "0"], "argument --max-new-tokens: 0: allowed >= 1"),
    ("validate-manifest-missing-keys", "validate", lambda c: [c.bad_engine(lambda d: c.manifest(d, lambda m: {k: v for k, v in m.items() if k != "graphs"}))], "lacks or mistypes graphs"),
]


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tiny_engine, other_dir, tiny_twin, tmp_path, capsys):
    name, tool, argv, words = case
    ctx = Ctx(tmp_path, tiny_engine, other_dir, tiny_twin)
    args = argv(ctx)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    try:
        rc = TOOLS[tool](args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, f"{name}: exit {rc}\n{err}"
    assert words in err, f"{name}: {words!r} not in:\n{err}"
    assert "Traceback" not in err and "internal error" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, f"{name}: something was left behind"
