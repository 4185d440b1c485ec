"""OpenVINO's CPU plugin running an engine's exported graphs (`--provider openvino`), judged by star-validate in the dtype
it computes in (bfloat16 on a CPU with bfloat16 units, float32 elsewhere), and `auto`'s choice."""

import json

import pytest
from test_validate_defects import DEFECTS

from star_export.cli import run_main
from star_export.config import StarSchedule
from star_export.export.write import write_engine
from star_export.runtime import openvino, sessions
from star_export.runtime.engine import Engine
from star_export.runtime.inputs import synthetic_image
from star_export.validate import validate_engine

pytest.importorskip("openvino")
LIMITS = {"max_batch_size": 2, "max_input_len": 700, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def engine_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino") / "tiny"
    schedule = StarSchedule.from_spec(tiny.spec, keep=58, defaults=tiny.defaults)
    write_engine(tiny, schedule, out, dtype="float32", backend="onnx", limits=LIMITS)
    return out


def expected_dtype() -> str:
    return "bfloat16" if openvino.bfloat16_units() else "float32"


def test_openvino_engine_passes_star_validate_in_its_compute_dtype(engine_dir, tiny):
    report = validate_engine(engine_dir, loaded=tiny, provider="openvino", max_new_tokens=4)
    assert report.ok, report.table()
    assert report.dtype == expected_dtype()
    assert len(report.checks) > 15 and any(c.name.startswith("segment1[decode]") for c in report.checks)


def test_bfloat16_outputs_fail_the_float32_rule(engine_dir, tiny):
    """The bfloat16 twin is what lets OpenVINO's outputs pass: judged as float32 (eager float32's error, 1e-7), the same
    outputs fail. Without bfloat16 units OpenVINO computes in float32 and there is nothing to show."""
    if not openvino.bfloat16_units():
        pytest.skip("this CPU has no bfloat16 units: OpenVINO computes in float32 here")
    engine = Engine(engine_dir, provider="openvino")
    engine.compute_dtype = "float32"
    report = validate_engine(engine_dir, loaded=tiny, engine=engine, max_new_tokens=4)
    assert not report.ok and any("> budget" in c.cause for c in report.checks if not c.ok), report.table()


@pytest.mark.parametrize("defect", ["kv-swapped", "new-positions", "suffix-unmasked"])
def test_planted_defect_is_caught_on_openvino(defect, tiny, tmp_path, monkeypatch):
    """The wider bfloat16 budget still catches what a wrong graph does (the defects of test_validate_defects.py)."""
    dtype, plant, name_words, cause_words = DEFECTS[defect]
    with monkeypatch.context() as m:
        plant(m)
        schedule = StarSchedule.from_spec(tiny.spec, keep=58, defaults=tiny.defaults)
        write_engine(tiny, schedule, tmp_path, dtype=dtype, backend="onnx", limits=LIMITS)
    report = validate_engine(tmp_path, loaded=tiny, provider="openvino", max_new_tokens=4)
    failed = [c for c in report.checks if not c.ok]
    assert any(name_words in c.name and cause_words in c.cause for c in failed), report.table()


def test_star_run_records_the_provider_and_compute_dtype(engine_dir, capsys):
    image = str(engine_dir.parent / "image.png")
    synthetic_image(0).save(image)
    argv = [str(engine_dir), "--image", image, "--prompt", "Describe.", "--max-new-tokens", "4", "--json"]
    assert run_main([*argv, "--provider", "openvino"]) == 0
    timings = json.loads(capsys.readouterr().out)["timings"]
    assert timings["provider"].startswith("OpenVINO-CPU") and timings["compute_dtype"] == expected_dtype()
    assert not timings["decode_graphs"]
    assert run_main([*argv, "--provider", "cpu"]) == 0
    timings = json.loads(capsys.readouterr().out)["timings"]
    assert timings["provider"] == "CPUExecutionProvider" and timings["compute_dtype"] == "float32"


def test_auto_picks_openvino_for_unquantized_engines_on_bfloat16_cpus(monkeypatch):
    monkeypatch.delenv(sessions.PROVIDER_ENV, raising=False)
    monkeypatch.setattr(sessions.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(openvino, "missing", lambda: None)
    monkeypatch.setattr(openvino, "bfloat16_units", lambda: True)
    assert sessions.auto_provider(quantized=False) == "openvino"
    assert sessions.resolve_providers("auto") == [openvino.OPENVINO]
    assert sessions.auto_provider(quantized=True) == "cpu"
    monkeypatch.setattr(openvino, "bfloat16_units", lambda: False)
    assert sessions.auto_provider(quantized=False) == "cpu"
    monkeypatch.setattr(openvino, "bfloat16_units", lambda: True)
    monkeypatch.setattr(openvino, "missing", lambda: "not installed")
    assert sessions.auto_provider(quantized=False) == "cpu"
    monkeypatch.setenv(sessions.PROVIDER_ENV, "cpu")
    assert sessions.auto_provider(quantized=False) == "cpu"
    monkeypatch.setenv(sessions.PROVIDER_ENV, "gpu")
    with pytest.raises(sessions.ProviderError, match="STAR_PROVIDER='gpu'"):
        sessions.auto_provider(quantized=False)


def test_openvino_refuses_quantized_engines_and_names_the_way_out(monkeypatch):
    with pytest.raises(sessions.ProviderError, match="--provider openvino: it runs unquantized .* use --provider cpu"):
        sessions.resolve_providers("openvino", quantized=True)
    assert sessions.resolve_providers("openvino", allow_fallback=True, quantized=True) == ["CPUExecutionProvider"]
    monkeypatch.setattr(openvino, "missing", lambda: "the Python package 'openvino' is not installed: pip install x")
    with pytest.raises(sessions.ProviderError, match="not installed"):
        sessions.resolve_providers("openvino")
