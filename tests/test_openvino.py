"""OpenVINO's CPU plugin running an engine's exported graphs (`--provider openvino`), judged by star-validate in the dtype
it computes in (bfloat16 on a CPU with bfloat16 units, float32 elsewhere), and `auto`'s choice."""

import json
import locale

import numpy as np
import pytest
from test_validate_defects import DEFECTS

from star_export.cli import run_main
from star_export.config import StarSchedule, WeightScheme
from star_export.export.write import write_engine
from star_export.runtime import openvino, sessions
from star_export.runtime.engine import Engine
from star_export.runtime.generate import Sampling
from star_export.runtime.inputs import synthetic_image
from star_export.validate import validate_engine

pytest.importorskip("openvino")
LIMITS = {"max_batch_size": 2, "max_input_len": 700, "max_new_tokens": 8}
INT4 = WeightScheme(kind="int4", block_size=64, symmetric=False, accuracy_level=4)  # not OpenVINO's default group (32)


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


@pytest.mark.parametrize("defect", ["suffix-unmasked"])
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


def test_auto_picks_openvino_for_quantized_engines_on_bfloat16_cpus(monkeypatch):
    monkeypatch.delenv(sessions.PROVIDER_ENV, raising=False)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(openvino, "missing", lambda: None)
    monkeypatch.setattr(openvino, "bfloat16_units", lambda: True)
    assert sessions.auto_provider(quantized=True) == "openvino"
    assert sessions.resolve_providers("auto", quantized=True) == [openvino.OPENVINO]
    assert sessions.auto_provider(quantized=False) == "cpu"  # a float engine: 1.7x the memory on OpenVINO
    monkeypatch.setattr(openvino, "bfloat16_units", lambda: False)
    assert sessions.auto_provider(quantized=True) == "cpu"
    monkeypatch.setattr(openvino, "bfloat16_units", lambda: True)
    monkeypatch.setattr(openvino, "missing", lambda: "not installed")
    assert sessions.auto_provider(quantized=True) == "cpu"
    monkeypatch.setenv(sessions.PROVIDER_ENV, "cpu")
    monkeypatch.setattr(openvino, "missing", lambda: None)
    assert sessions.auto_provider(quantized=True) == "cpu"
    monkeypatch.setenv(sessions.PROVIDER_ENV, "gpu")
    with pytest.raises(sessions.ProviderError, match="STAR_PROVIDER='gpu'"):
        sessions.auto_provider(quantized=False)


def test_openvino_missing_is_exit_2_naming_the_extra(monkeypatch):
    monkeypatch.setattr(openvino, "missing", lambda: "the Python package 'openvino' is not installed: pip install x")
    with pytest.raises(sessions.ProviderError, match="not installed.*use --provider cpu"):
        sessions.resolve_providers("openvino")
    assert sessions.resolve_providers("openvino", allow_fallback=True) == ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def int4_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino-int4") / "tiny"
    schedule = StarSchedule.from_spec(tiny.spec, keep=58, defaults=tiny.defaults)
    write_engine(tiny, schedule, out, dtype="float32", backend="onnx", limits=LIMITS, weights=INT4, decode_graphs=True)
    return out


def test_int4_engine_on_openvino_passes_with_int8_activations_and_onnx_runtime_decode_graphs(int4_dir, tiny):
    """OpenVINO quantizes the segments' activations per block of the weights (probed to be the reference's int8
    model); the engine's decode graphs still run on ONNX Runtime and are checked too."""
    engine = Engine(int4_dir, provider="openvino")
    assert {"decode0", "decode1"} <= set(engine.graphs) and engine.graphs["decode0"].provider == "CPUExecutionProvider"
    report = validate_engine(int4_dir, loaded=tiny, engine=engine, max_new_tokens=4)
    assert report.ok, report.table()
    assert report.dtype == expected_dtype()
    assert any("computes in int8 on OpenVINO" in n for n in report.notes), report.notes
    assert any(c.name.startswith("decode1[decode]") for c in report.checks)


def test_planted_defect_is_caught_on_an_int4_engine_on_openvino(tiny, tmp_path, monkeypatch):
    """Stage-2 scores from layer P - 1: caught on OpenVINO's int4 path too (a looser eager sampling let it pass)."""
    dtype, plant, name_words, cause_words = DEFECTS["pivot-off-by-one"]
    with monkeypatch.context() as m:
        plant(m)
        schedule = StarSchedule.from_spec(tiny.spec, keep=58, defaults=tiny.defaults)
        write_engine(tiny, schedule, tmp_path, dtype=dtype, backend="onnx", limits=LIMITS, weights=INT4)
    report = validate_engine(tmp_path, loaded=tiny, provider="openvino", max_new_tokens=4)
    failed = [c for c in report.checks if not c.ok]
    assert any(name_words in c.name and cause_words in c.cause for c in failed), report.table()


def test_openvino_float_engine_is_refused_where_its_memory_is_not(engine_dir, int4_dir):
    """OpenVINO holds a float engine's float32 weights and its bfloat16 copies: the run-fits check counts 1.75x (a
    budget between the two estimates passes ONNX Runtime and refuses OpenVINO); a quantized engine is counted as on
    ONNX Runtime."""
    from star_export.manifest import EngineManifest
    from star_export.memory import OPENVINO_FLOAT_FACTOR, RUNTIME_OVERHEAD, MemoryPlanError, check_run_fits, memory_plan

    m = EngineManifest.read(engine_dir, verify=False)
    run = memory_plan(m.model, m.schedule, m.dtype, m.weights, bool(m.decode_graphs)).run_bytes
    budget = int(run * (1 + OPENVINO_FLOAT_FACTOR) / 2) - RUNTIME_OVERHEAD
    check_run_fits(m, budget)
    with pytest.raises(MemoryPlanError, match="to run on OpenVINO"):
        check_run_fits(m, budget, openvino=True)
    q = EngineManifest.read(int4_dir, verify=False)
    run = memory_plan(q.model, q.schedule, q.dtype, q.weights, bool(q.decode_graphs)).run_bytes
    check_run_fits(q, run - RUNTIME_OVERHEAD, openvino=True)


def test_auto_falls_back_to_onnx_runtime_where_openvino_cannot_compile(engine_dir, monkeypatch, capsys):
    """An engine graph OpenVINO cannot compile: `auto` runs the engine on ONNX Runtime with a warning; an explicit
    `--provider openvino` is exit 2 naming `--provider cpu`."""
    import star_export.runtime.engine as engine_module

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported operation")

    monkeypatch.setattr(sessions, "auto_provider", lambda quantized: "openvino")
    monkeypatch.setattr(engine_module, "OvGraph", broken)
    engine = Engine(engine_dir, provider="auto")
    assert engine.provider == "CPUExecutionProvider" and engine.compute_dtype == "float32"
    assert "could not be compiled by OpenVINO" in capsys.readouterr().err
    with pytest.raises(engine_module.OpenVinoError, match="run the engine with --provider cpu"):
        Engine(engine_dir, provider="openvino")


def test_engine_validated_one_graph_at_a_time_compiles_each_openvino_graph_per_call(engine_dir, tiny):
    report = validate_engine(engine_dir, loaded=tiny, provider="openvino", mode="streamed-lazy", max_new_tokens=2)
    assert report.ok, report.table()
    assert report.dtype == expected_dtype()
    engine = Engine(engine_dir, provider="openvino", lazy=True)
    assert all(isinstance(g, openvino.LazyOvGraph) for g in engine.graphs.values())


def test_compiled_graphs_are_cached_and_imported_to_the_same_results(int4_dir, tmp_path, monkeypatch):
    """The compile cache: a first load writes OpenVINO's blobs and our markers, a second load imports them (its blobs
    memory-mapped) and generates exactly what a load without the cache generates (tokens, kept indices, every step's
    logits bit for bit); a cache directory that cannot be written is left out, not an error."""
    image = synthetic_image(3)
    sampling = Sampling(max_new_tokens=4)

    def generate(cache: str):
        monkeypatch.setenv(openvino.CACHE_ENV, cache)
        engine = Engine(int4_dir, provider="openvino")
        assert engine.provider.startswith("OpenVINO")
        return engine.generate([image], ["What is in the picture?"], sampling)

    def same(a, b):
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(a.stage1_indices, b.stage1_indices)
        np.testing.assert_array_equal(a.stage2_indices, b.stage2_indices)
        for x, y in zip(a.logits, b.logits, strict=True):
            np.testing.assert_array_equal(x, y)

    encoding = locale.getpreferredencoding(False)
    reference = generate("off")
    cache = tmp_path / "cache"
    calls = []
    compile_model = openvino.core().compile_model
    monkeypatch.setattr(openvino.core(), "compile_model", lambda *a: calls.append(a[2]) or compile_model(*a))
    same(generate(str(cache)), reference)  # cold: compiles, writes the cache
    blobs, markers = sorted(cache.glob("*.blob")), list(cache.glob("star-*.compiled"))
    assert calls and len(markers) == len(calls) and len(blobs) >= len(calls)  # one marker per OpenVINO graph
    assert all(c["CACHE_DIR"] == str(cache) and c["ENABLE_MMAP"] is False for c in calls)
    cold = len(calls)
    calls.clear()
    same(generate(str(cache)), reference)  # warm: imports, mapped
    assert len(calls) == cold and all(c["ENABLE_MMAP"] is True for c in calls)
    assert sorted(cache.glob("*.blob")) == blobs  # nothing compiled again
    # OpenVINO's cache switches the C locale and back: concurrent compiles once left the process at "C" (ASCII)
    assert locale.getpreferredencoding(False) == encoding
    locked = tmp_path / "locked"
    locked.write_text("a file where the cache directory would be")
    assert openvino.cache_dir() is not None
    monkeypatch.setenv(openvino.CACHE_ENV, str(locked / "sub"))
    assert openvino.cache_dir() is None
    same(generate(str(locked / "sub")), reference)
