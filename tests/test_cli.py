"""The console entry points (cli/): --dry-run, bad input (exit 2, nothing written),
and the engine directory as a product: export a local HF directory, run it, validate it, tamper with it."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import QUESTIONS
from star_export.cli import export_main, run_main, validate_main
from star_export.config import StarSchedule
from star_export.manifest import MANIFEST, sha256_file
from star_export.validate.reference import generate
from star_export.runtime.generate import Sampling
from star_export.runtime.inputs import synthetic_image

PAPER_TABLE3_RATIO = {288: 15223.38 / 21353.56, 58: 11434.42 / 21353.56, 29: 10965.06 / 21353.56}  # 0.713, 0.535, 0.513


# ------------------------------------------------------------------ --dry-run


@pytest.mark.parametrize("keep", [288, 58, 29])
def test_dry_run_flops_ratio_matches_paper(keep, capsys):
    assert export_main(["--model", "llava-1.5-7b", "--keep", str(keep), "--dry-run", "--text-tokens", "52", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert abs(plan["flops"]["ratio"] - PAPER_TABLE3_RATIO[keep]) <= 0.03
    assert plan["schedule"] | {} == plan["schedule"] and plan["schedule"]["stage1_keep"] == 490 and plan["schedule"]["pivot_layer"] == 15
    assert plan["visual_tokens"] == {"vision_tower": 576, "after_stage1": 490, "after_stage2": keep}
    kv = plan["kv_cache_bytes_per_sequence"]["float16"]
    # 32 layers x (K+V) x 4096 wide x 2 bytes: 16 layers at 52 + 490 tokens, 16 at 52 + keep
    assert kv["baseline"] == 32 * 2 * 628 * 4096 * 2
    assert kv["star"] == 16 * 2 * (52 + 490) * 4096 * 2 + 16 * 2 * (52 + keep) * 4096 * 2


def test_dry_run_text_for_13b(capsys):
    assert export_main(["--model", "llava-1.5-13b", "--keep", "58", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pivot_layer=19" in out and "576 -> stage 1 -> 490 -> stage 2 -> 58" in out


def test_dry_run_reads_a_local_directory(other_dir, capsys):
    assert export_main(["--model", str(other_dir), "--keep", "29", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["schedule"]["num_layers"] == 6 and plan["schedule"]["pivot_layer"] == 2


# ------------------------------------------------------------------ bad input: exit 2, clear message, nothing written


@pytest.mark.parametrize(
    "args, words",
    [
        (["--keep", "0"], "keep=0 is out of range"),
        (["--keep", "577"], "1 <= keep <= 576"),
        (["--keep", "100", "--stage1-keep", "50"], "keep (100) <= stage1_keep"),
        (["--pivot-layer", "31"], "0 <= pivot_layer <= 30"),
        (["--pivot-layer", "-1"], "0 <= pivot_layer"),
        (["--model", "llava-1.5-7x"], "unknown model 'llava-1.5-7x'"),
    ],
)
def test_bad_schedule_or_model_in_dry_run(args, words, capsys):
    assert export_main(["--model", "llava-1.5-7b", "--dry-run", *args]) == 2
    assert words in capsys.readouterr().err


def test_missing_weights_say_how_to_get_them(tmp_path, capsys):
    assert export_main(["--model", "llava-1.5-7b", "--keep", "58", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and "huggingface-cli download llava-hf/llava-1.5-7b-hf" in err
    assert not (tmp_path / "e").exists()


def test_model_path_without_weights(other_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(other_dir / "config.json", bare / "config.json")
    assert export_main(["--model", str(bare), "--out", str(tmp_path / "e")]) == 2
    assert "no *.safetensors weights" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--keep", "0"], "keep=0 is out of range"),
        (["--keep", "58", "--stage1-keep", "600"], "stage1_keep=600 is out of range"),
        (["--pivot-layer", "3"], "0 <= pivot_layer <= 2"),
        (["--dtype", "bfloat16"], "--dtype bfloat16 is not supported by --backend onnx"),
    ],
)
def test_bad_export_writes_nothing(args, words, tmp_path, capsys):
    out = tmp_path / "engine"
    assert export_main(["--model", "tiny-llava", "--out", str(out), *args]) == 2
    assert words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_needs_force(tmp_path, capsys):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert export_main(["--model", "tiny-llava", "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_unwritable_out_dir(tmp_path, capsys):
    if sys.platform == "win32" or __import__("os").geteuid() == 0:
        ro = "/proc/star-export-engine"  # root ignores file modes; /proc refuses new entries even to root
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        ro = str(tmp_path / "ro" / "engine")
    assert export_main(["--model", "tiny-llava", "--out", ro]) == 2
    assert "not writable" in capsys.readouterr().err


def test_tensorrt_backend_fails_clearly(tmp_path, capsys):
    assert export_main(["--model", "tiny-llava", "--backend", "tensorrt", "--out", str(tmp_path / "e")]) == 2
    assert "--backend tensorrt" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------ the product flow on a local directory unlike tiny-llava


@pytest.fixture(scope="module")
def engine_dir(other_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "other-58"
    rc = export_main(["--model", str(other_dir), "--keep", "58", "--out", str(out), "--max-batch-size", "3", "--max-input-len", "620", "--max-new-tokens", "32"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def example_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "example.png"
    synthetic_image(11).save(path)
    return path


def test_engine_directory_is_self_contained(engine_dir, other_dir):
    manifest = json.loads((engine_dir / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["source"]["kind"] == "path"
    assert manifest["source"]["fingerprint"].startswith("sha256-sampled:")
    assert manifest["schedule"]["keep"] == 58 and manifest["schedule"]["num_layers"] == 6
    for name in ("vision", "segment0", "pivot", "segment1"):
        io = manifest["graphs"][name]
        assert (engine_dir / io["file"]).is_file() and io["inputs"] and io["outputs"]
    assert {"new_key_values.0.key", "new_key_values.2.value"} <= {o["name"] for o in manifest["graphs"]["segment0"]["outputs"]}
    for rel, entry in manifest["files"].items():
        assert sha256_file(engine_dir / rel) == entry["sha256"]
    assert (engine_dir / "processor" / "tokenizer.json").is_file() and {"torch", "onnx", "onnxruntime", "transformers", "star-export"} <= set(manifest["versions"])
    assert not list(engine_dir.parent.glob(".*tmp*")), "no temporary directory left behind"


def test_star_run_json_equals_reference(engine_dir, other, example_png, images, capsys, tmp_path):
    second = tmp_path / "second.png"
    images[1].save(second)
    assert run_main([str(engine_dir), "--image", str(example_png), "--prompt", QUESTIONS[0], "--image", str(second), "--prompt", QUESTIONS[1], "--max-new-tokens", "16", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert isinstance(results, list) and len(results) == 2
    schedule = StarSchedule.from_spec(other.spec, keep=58, defaults=other.defaults)
    ref = generate(other, schedule, [str(example_png), str(second)], QUESTIONS[:2], Sampling(max_new_tokens=16))
    for row, r in enumerate(results):
        assert set(r) == {"text", "token_ids", "stage1_indices", "stage2_indices", "timings"}
        assert r["token_ids"] == ref.token_ids[row]
        assert r["stage1_indices"] == ref.stage1_indices[row].tolist() and r["stage2_indices"] == ref.stage2_indices[row].tolist()
        assert isinstance(r["text"], str)


def test_star_run_streams(engine_dir, example_png, capsys):
    assert run_main([str(engine_dir), "--image", str(example_png), "--prompt", "Describe.", "--max-new-tokens", "8", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)["text"]
    assert run_main([str(engine_dir), "--image", str(example_png), "--prompt", "Describe.", "--max-new-tokens", "8", "--stream"]) == 0
    assert capsys.readouterr().out == whole + "\n"


def test_star_validate_passes(engine_dir, example_png, capsys):
    assert validate_main([str(engine_dir), "--image", str(example_png), "--prompt", "What colour is the square?", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["checks"]) > 15


def test_star_validate_cuda_without_a_gpu_is_refused_unless_fallback_is_allowed(engine_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: this checks what happens without one")
    assert validate_main([str(engine_dir), "--device", "cuda", "--max-new-tokens", "2"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
    assert validate_main([str(engine_dir), "--device", "cuda", "--allow-fallback", "--max-new-tokens", "2"]) == 0
    assert "the reference ran on the CPU (--allow-fallback)" in capsys.readouterr().err


def test_cli_module_imports_nothing_heavy():
    """--help answers at once because the CLI imports torch / transformers / onnx only after parsing."""
    code = "import sys, star_export.cli; print([m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("main, prog", [(export_main, "star-export"), (run_main, "star-run"), (validate_main, "star-validate")])
def test_version(main, prog, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"{prog} 0.")


def _refresh_manifest(engine: str) -> None:
    manifest = json.loads((engine / MANIFEST).read_text())
    for rel in manifest["files"]:
        manifest["files"][rel]["sha256"] = sha256_file(engine / rel)
    (engine / MANIFEST).write_text(json.dumps(manifest))


def test_star_validate_fails_on_a_tampered_graph(engine_dir, tmp_path, capsys):
    """A weight changed and the manifest hash updated: only parity can catch it, and it must."""
    import onnx
    from onnx import numpy_helper

    bad = tmp_path / "tampered"
    shutil.copytree(engine_dir, bad)
    model = onnx.load(str(bad / "segment1.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight (lm_head)
    array = numpy_helper.to_array(init).copy()
    array[..., :4] *= 1.5
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    for p in bad.glob("segment1.onnx*"):
        p.unlink()
    onnx.save_model(model, str(bad / "segment1.onnx"), save_as_external_data=True, location="segment1.onnx.data")
    _refresh_manifest(bad)
    assert validate_main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "segment1[" in out and "logits" in out


# ------------------------------------------------------------------ bad engine directories and requests: exit 2


def _corrupt(engine_dir, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(engine_dir, bad)
    if how == "missing":
        (bad / "pivot.onnx").unlink()
    elif how == "hash":
        with open(bad / "embed_tokens.npy", "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\x00\x01\x02\x03")
    elif how in ("newer", "older"):
        m = json.loads((bad / MANIFEST).read_text())
        m["format_version"] = 99 if how == "newer" else 1
        (bad / MANIFEST).write_text(json.dumps(m))
    return bad


@pytest.mark.parametrize("how, words", [("missing", "is missing pivot.onnx"), ("hash", "embed_tokens.npy"), ("newer", "format_version 99"), ("older", "format_version 1, written by an older")])
@pytest.mark.parametrize("tool", ["run", "validate"])
def test_bad_engine_dir(engine_dir, example_png, tmp_path, capsys, how, words, tool):
    bad = _corrupt(engine_dir, tmp_path, how)
    args = [str(bad), "--image", str(example_png), "--prompt", "Hi"]
    assert (run_main(args) if tool == "run" else validate_main(args)) == 2
    assert words in capsys.readouterr().err


def test_not_an_engine_dir(tmp_path, example_png, capsys):
    assert run_main([str(tmp_path), "--image", str(example_png), "--prompt", "Hi"]) == 2
    assert "not an engine directory" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "unreadable", "not-an-image"])
def test_bad_image(engine_dir, tmp_path, capsys, case):
    path = tmp_path / "img.png"
    if case == "unreadable":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG header, then garbage
    elif case == "not-an-image":
        path.write_text("this is text")
    assert run_main([str(engine_dir), "--image", str(path), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and ("does not exist" in err if case == "missing" else "not a readable image" in err)


def test_prompt_longer_than_max_input_len(engine_dir, example_png, capsys):
    assert run_main([str(engine_dir), "--image", str(example_png), "--prompt", "tell me more " * 40]) == 2
    assert "exceeds this engine's max input length 620" in capsys.readouterr().err


def test_more_prompts_than_max_batch_size(engine_dir, example_png, capsys):
    args = [str(engine_dir)]
    for _ in range(4):
        args += ["--image", str(example_png), "--prompt", "Hi"]
    assert run_main(args) == 2
    assert "exceed this engine's max batch size 3" in capsys.readouterr().err


def test_console_scripts_are_installed():
    out = subprocess.run([sys.executable, "-m", "pip", "show", "-f", "star-export"], capture_output=True, text=True).stdout
    assert "star-export" in out
    help_text = subprocess.run([str(__import__("pathlib").Path(sys.executable).parent / "star-export"), "--help"], capture_output=True, text=True)
    words = " ".join(help_text.stdout.split())
    assert help_text.returncode == 0 and "--stage1-keep" in words and "default 58, or the --recipe's" in words
    calibrate = subprocess.run([str(__import__("pathlib").Path(sys.executable).parent / "star-calibrate"), "--help"], capture_output=True, text=True)
    assert calibrate.returncode == 0 and "--flops-budget" in calibrate.stdout


def test_force_replaces_and_failed_self_check_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "engine"
    assert export_main(["--model", "tiny-llava", "--keep", "29", "--out", str(out), "--no-validate"]) == 0
    first = json.loads((out / MANIFEST).read_text())
    assert first["schedule"]["keep"] == 29
    # a self-check that fails: the export fails (exit 1) and the existing engine is untouched
    import star_export.build as build

    class Failed:
        ok = False

        def table(self):
            return "segment1[prefill] logits  max abs 9.9e-01  FAIL"

        def summary(self):
            return "FAILED: 21/22 checks"

    monkeypatch.setattr(build, "validate_engine", lambda *a, **k: Failed())
    assert export_main(["--model", "tiny-llava", "--keep", "58", "--out", str(out), "--force"]) == 1
    assert "does not match the eager reference" in capsys.readouterr().err
    assert json.loads((out / MANIFEST).read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"], "no temporary directory left behind"
    monkeypatch.undo()
    assert export_main(["--model", "tiny-llava", "--keep", "58", "--out", str(out), "--force", "--no-validate"]) == 0
    assert json.loads((out / MANIFEST).read_text())["schedule"]["keep"] == 58


def test_float16_engine_passes_its_self_check(other_dir, tmp_path, capsys):
    out = tmp_path / "fp16"
    assert export_main(["--model", str(other_dir), "--keep", "29", "--dtype", "float16", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dtype"] == "float16" and manifest["layout"]["dtype"] == "float16"
    assert np.load(out / "embed_tokens.npy").dtype == np.float16
    assert "PASSED" in capsys.readouterr().err


def test_star_validate_refuses_a_model_of_another_architecture(engine_dir, capsys):
    assert validate_main([str(engine_dir), "--model", "tiny-llava"]) == 2
    err = capsys.readouterr().err
    assert "does not have the engine's architecture" in err and "text_layers 4 vs engine 6" in err
    assert "ModelSpec(" not in err and "image_size" not in err, "only the differing fields are named"


def test_star_validate_refuses_other_weights_of_the_same_architecture(engine_dir, tmp_path, capsys):
    from star_export.testing import OTHER_SPEC, save_random_llava

    twin = save_random_llava(OTHER_SPEC, tmp_path / "twin", seed=8)  # same architecture, other weights
    assert validate_main([str(engine_dir), "--model", str(twin)]) == 2
    assert "this is not the model the engine was built from" in capsys.readouterr().err
