"""Model loading (models.py) (alias, local directory, offline HF cache), recipes in a built wheel, schedules."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from star_export.config import ScheduleError, StarSchedule
from star_export.models import MissingWeightsError, UnknownModelError, known_aliases, load_model, recipe_from_alias


def test_aliases_and_recipes():
    assert {"tiny-llava", "llava-1.5-7b", "llava-1.5-13b"} <= set(known_aliases())
    r7 = recipe_from_alias("llava-1.5-7b")
    assert r7.hf_id == "llava-hf/llava-1.5-7b-hf" and r7.spec.num_vision_tokens == 576 and r7.spec.text_layers == 32
    assert StarSchedule.from_spec(r7.spec, keep=58, defaults=r7.defaults) == StarSchedule(
        keep=58, stage1_keep=490, pivot_layer=15, vision_feature_layer=-2, num_vision_tokens=576, num_layers=32
    )
    with pytest.raises(UnknownModelError, match="known aliases are"):
        load_model("llava-1.5-7x")


def test_tiny_llava_is_deterministic_and_eager(tiny):
    again = load_model("tiny-llava")
    for (name, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert (a == b).all(), name
    assert tiny.model.config._attn_implementation == "eager"
    assert tiny.model.config.text_config._attn_implementation == "eager"
    prompt = tiny.processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}], add_generation_prompt=True)
    assert prompt == "USER: <image>\nHi? ASSISTANT:"


def test_schedule_validation_names_the_range():
    spec = recipe_from_alias("llava-1.5-7b").spec
    with pytest.raises(ScheduleError, match=r"1 <= keep <= 576"):
        StarSchedule.from_spec(spec, keep=577)
    with pytest.raises(ScheduleError, match=r"keep \(100\) <= stage1_keep <= 576"):
        StarSchedule.from_spec(spec, keep=100, stage1_keep=99)
    with pytest.raises(ScheduleError, match=r"0 <= pivot_layer <= 30"):
        StarSchedule.from_spec(spec, keep=58, pivot_layer=31)
    assert StarSchedule.from_spec(spec, keep=576).is_identity  # the default k1 rises to keep


def test_load_from_offline_hf_cache(other_dir, tmp_path, monkeypatch):
    """A model id already in the local Hugging Face cache loads offline, its revision recorded."""
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "hub" / "models--acme--llava-mini"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(other_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("acme/llava-mini")
    assert loaded.source["kind"] == "hf-cache" and loaded.source["revision"] == snapshot.name
    assert loaded.spec.text_layers == 6 and loaded.spec.num_key_value_heads == 3
    with pytest.raises(MissingWeightsError, match="huggingface-cli download acme/not-there"):
        load_model("acme/not-there")


def test_weights_only_from_safetensors(other_dir, tmp_path):
    pt_only = tmp_path / "pt"
    pt_only.mkdir()
    for f in other_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, pt_only / f.name)
    (pt_only / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MissingWeightsError, match="no \\*.safetensors weights"):
        load_model(str(pt_only))


def test_recipes_ship_in_the_wheel(tmp_path):
    """Aliases must resolve after a non-editable install: the wheel carries engines/*.json as star_export.engines."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("star_export-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"star_export/engines/llava-1.5-7b.json", "star_export/engines/tiny-llava.json", "star_export/assets/example.png"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import star_export.models as m; print(m.__file__); print(','.join(m.known_aliases()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True, text=True, check=True).stdout
    assert str(site) in out.splitlines()[0] and "llava-1.5-7b" in out.splitlines()[1]
