"""star_export/processor.py, the engine's processor read without transformers, against transformers' own
(`AutoProcessor` of the same saved directory): token ids, masks and pixel values bitwise equal, the chat template
rendered to the same text, token ids decoded to the same text; on the tiny model's processor, another model's, and
one in the published llava-hf layout (a trained sentencepiece Llama tokenizer, llava-hf's chat template)."""

import json
import random
import sys

import numpy as np
import pytest
from PIL import Image

from star_export import checkpoints
from star_export.processor import normalize_processor, read_processor, resize_target
from star_export.runtime.inputs import format_prompt, prepare_inputs, synthetic_image

PROMPTS = [
    "What is in the image?",
    "Describe   the picture,\twith tabs\nand newlines.  ",
    "Ünïcödé: 猫が2匹、テーブルの上に。 😺 ¿Qué hay? 1234567890 3.14",
    "special tokens as text: </s> <s> <pad> <unk> [INST]",
    "<image>\nA prompt that places the image itself.",
    " ",
    "x" * 300,
]
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the shape? 🟦"}]},
    ],
]
SIZES = [(336, 336), (640, 480), (480, 640), (337, 5000), (5000, 337), (100, 37), (1, 1), (335, 336), (1023, 767)]


def picture(size, seed):
    rng = np.random.default_rng(seed)
    base = np.asarray(synthetic_image(seed, 64).resize(size, Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-40, 40, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def saved(processor, directory):
    """`processor` as star-export writes it into an engine's processor/, after a padded, truncated batch call (its
    tokenizer.json then holds that call's padding and truncation, which no later call may inherit)."""
    processor.tokenizer(["a b", "a b c d e f"], padding="max_length", max_length=9, truncation=True)
    prepare_inputs(processor, [synthetic_image(0)] * 2, ["a b", "a b c d e f"])  # padding=True, through LlavaProcessor
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def published_processor(tmp_path_factory):
    """A processor in the llava-hf/llava-1.5-7b-hf layout (checkpoints.py), loaded by transformers as star-export
    loads a checkpoint's, then saved as an engine's."""
    from transformers import AutoProcessor

    from star_export.models import spec_from_name

    source = tmp_path_factory.mktemp("published")
    checkpoints.train_tokenizer(source, seed=3)
    (source / "preprocessor_config.json").write_text(json.dumps(checkpoints.PREPROCESSOR))
    (source / "processor_config.json").write_text(json.dumps(checkpoints.PROCESSOR))
    (source / "chat_template.json").write_text(json.dumps({"chat_template": checkpoints.CHAT_TEMPLATE}))
    processor = normalize_processor(AutoProcessor.from_pretrained(source), spec_from_name("llava-1.5-7b")[0])
    return saved(processor, tmp_path_factory.mktemp("published-engine-processor")), "llava-1.5-7b"


@pytest.fixture(scope="module", params=["tiny", "other", "published"])
def pair(request, tmp_path_factory):
    """(star_export.processor.Processor, transformers' processor) of one saved directory."""
    from transformers import AutoProcessor

    if request.param == "published":
        directory, name = request.getfixturevalue("published_processor")
        from star_export.models import spec_from_name

        spec = spec_from_name(name)[0]
    else:
        loaded = request.getfixturevalue(request.param)
        directory, spec = saved(loaded.processor, tmp_path_factory.mktemp(request.param)), loaded.spec
    ours = read_processor(directory, spec)
    assert ours is not None, "this module reads the processors star-export writes"
    theirs = normalize_processor(AutoProcessor.from_pretrained(directory, local_files_only=True), spec)
    return ours, theirs


def test_inputs_are_bitwise_equal(pair):
    ours, theirs = pair
    for size_index, size in enumerate(SIZES):
        images = [picture(size, size_index), picture(SIZES[-1 - size_index], 100 + size_index)]
        for start in range(0, len(PROMPTS), 2):
            prompts = (PROMPTS[start : start + 2] * 2)[:2]
            a = prepare_inputs(ours, images, prompts)
            b = prepare_inputs(theirs, images, prompts)
            for key in ("input_ids", "attention_mask", "pixel_values"):
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (key, size, prompts)
                assert np.array_equal(a[key], b[key]), (key, size, prompts)


def test_chat_template_and_decoding_are_equal(pair):
    ours, theirs = pair
    for conversation in CONVERSATIONS:
        for generation_prompt in (True, False):
            assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == (
                theirs.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
            )
    for prompt in PROMPTS:
        assert format_prompt(ours, prompt) == format_prompt(theirs, prompt)
    vocab = len(theirs.tokenizer.get_vocab())
    assert len(ours.tokenizer.get_vocab()) == vocab
    rng = random.Random(0)
    sequences = [[rng.randrange(vocab) for _ in range(rng.randint(0, 40))] for _ in range(200)]
    sequences += [theirs.tokenizer(p)["input_ids"] for p in PROMPTS]
    for ids in sequences:
        for skip in (True, False):
            assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == theirs.tokenizer.decode(
                ids, skip_special_tokens=skip
            ), ids
    for token in ("<image>", "<s>", "</s>", "<pad>"):
        assert ours.tokenizer.convert_tokens_to_ids(token) == theirs.tokenizer.convert_tokens_to_ids(token)


def test_resize_target_is_transformers_computation():
    from transformers.image_transforms import get_resize_output_image_size
    from transformers.image_utils import ChannelDimension

    rng = random.Random(1)
    sizes = [(rng.randint(1, 9000), rng.randint(1, 9000)) for _ in range(3000)] + [(w, 336) for w in range(1, 800)]
    for edge in (224, 336, 384):
        for width, height in sizes:
            h, w = get_resize_output_image_size(
                np.broadcast_to(np.uint8(0), (1, height, width)),
                size=edge,
                default_to_square=False,
                input_data_format=ChannelDimension.FIRST,
            )
            assert resize_target((width, height), edge) == (w, h), (width, height, edge)


def test_unreproduced_processors_fall_back_to_transformers(tmp_path, tiny):
    """Another image processor class, or clean-up of token spaces on decode: None (the engine loads transformers')."""
    directory = saved(tiny.processor, tmp_path / "p")
    config = json.loads((directory / "processor_config.json").read_text())
    config["image_processor"]["image_processor_type"] = "SiglipImageProcessor"
    (directory / "processor_config.json").write_text(json.dumps(config))
    assert read_processor(directory, tiny.spec) is None
    directory = saved(tiny.processor, tmp_path / "q")
    tok = json.loads((directory / "tokenizer_config.json").read_text())
    tok |= {
        "clean_up_tokenization_spaces": True,
        "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok))
    assert read_processor(directory, tiny.spec) is None


def test_a_cpu_engine_loads_and_runs_without_torch_or_transformers(tiny_engine):
    """The runtime's import and a CPU run stay clear of torch and transformers (3-6 s of a load)."""
    import subprocess

    code = (
        "import sys\n"
        "from star_export.runtime.engine import Engine\n"
        "from star_export.runtime.generate import Sampling\n"
        "from star_export.runtime.inputs import synthetic_image\n"
        f"engine = Engine({str(tiny_engine)!r})\n"
        "out = engine.generate([synthetic_image(0)], ['What is in the image?'], Sampling(max_new_tokens=2))\n"
        "print(engine.decode(out.token_ids[0]) is not None, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"], result.stdout
