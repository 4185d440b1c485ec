"""The GPU paths, on a machine with a CUDA GPU and onnxruntime-gpu in place of onnxruntime (skipped elsewhere, so
never in CI): `.venv/bin/python -m pytest -m gpu tests/test_gpu.py -n 8` (not scripts/test.sh, whose setup reinstalls
the CPU onnxruntime).

Every case of the validation sweep (tests/test_validate_sweep.py: widths 64-512 and real 7B widths, 2-8 layers, MHA /
GQA / MQA, init std 0.02-0.3, sharpened attention, float32 / float16, keep 576-29) is exported and passes
`star-validate` with the engine on ONNX Runtime's CUDA provider and the eager reference (float64 truth, engine-dtype
eager run) on the GPU, under the same budgets as on the CPU (budget.py): nothing here is loosened for the GPU. The
engine's KV buffers are torch tensors on the GPU, written in place (runtime/kvcache.py); one case decodes past
kvcache.GROWTH, so the buffers are regrown there too.
"""

import json

import numpy as np
import pytest
import torch

from star_export.cli import export_main, validate_main
from star_export.testing import real_width_case, save_random_llava, validation_sweep


def _cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU"),
    pytest.mark.skipif(not _cuda_provider(), reason="this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu in its place)"),
]

CASES = validation_sweep(24) + [real_width_case("float32", keep=58), real_width_case("float16", keep=29)]
LONG = 80  # new tokens for the first case: past kvcache.GROWTH (64), so the GPU buffers are regrown mid-decode


def _export(case, tmp_path, max_new_tokens: int, *extra: str, capsys=None) -> str:
    model_dir = save_random_llava(case.spec, tmp_path / "model", seed=case.seed, **case.init)
    out = tmp_path / "engine"
    args = ["--model", str(model_dir), "--keep", str(case.keep), "--dtype", case.dtype, "--out", str(out), "--max-new-tokens", str(max_new_tokens),
            "--no-validate", "--quiet", *extra]
    assert export_main(args) == 0
    if capsys is not None:
        capsys.readouterr()  # "engine written to ..."
    return str(out)


def _validate(engine: str, capsys, *args: str) -> dict:
    rc = validate_main([engine, "--json", *args])
    report = json.loads(capsys.readouterr().out)
    failed = "\n".join(f"{c['name']}: {c['cause']}" for c in report["checks"] if not c["ok"])
    assert rc == 0 and report["ok"], f"star-validate {' '.join(args)} failed\n{failed}"
    return report


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_engine_on_cuda_passes_the_validator_with_the_reference_on_cuda(case, tmp_path, capsys):
    tokens = LONG if case is CASES[0] else 8
    engine = _export(case, tmp_path, tokens, capsys=capsys)
    report = _validate(engine, capsys, "--provider", "cuda", "--device", "cuda", "--max-new-tokens", str(tokens))
    assert report["reference_device"] == "cuda"


@pytest.mark.parametrize("case", CASES[:4], ids=[c.name for c in CASES[:4]])
def test_each_side_on_cuda_alone(case, tmp_path, capsys):
    """The engine on the GPU against a CPU reference, and a GPU reference against the engine on the CPU."""
    engine = _export(case, tmp_path, 8, capsys=capsys)
    _validate(engine, capsys, "--provider", "cuda", "--device", "cpu", "--max-new-tokens", "8")
    _validate(engine, capsys, "--provider", "cpu", "--device", "cuda", "--max-new-tokens", "8")


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_weight_only_engine_on_cuda_passes_the_validator(weights, tmp_path, capsys):
    """MatMulNBits on the CUDA provider (its own kernels; accuracy_level is a CPU setting)."""
    engine = _export(CASES[1], tmp_path, 8, "--weights", weights, "--block-size", "16", capsys=capsys)
    _validate(engine, capsys, "--provider", "cuda", "--device", "cuda", "--max-new-tokens", "8")


def test_kv_buffers_stay_on_the_gpu(tmp_path, images):
    from star_export.runtime.engine import Engine
    from star_export.runtime.generate import Sampling

    engine = Engine.from_dir(_export(CASES[1], tmp_path, 8), provider="cuda")
    assert engine.provider == "CUDAExecutionProvider"
    inputs = engine.prepare(images[:2], ["What is in the image?", "Describe the picture in a few words."])
    state, _ = engine.pipeline.prefill(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], reserve=4)
    for cache in (state.cache0, state.cache1):
        assert all(torch.is_tensor(b) and b.is_cuda for b in cache.buffers.values())
    before = {k: v.clone() for k, v in state.cache1.buffers.items()}
    pointers = {k: v.data_ptr() for k, v in state.cache1.buffers.items()}
    after = engine.pipeline.step(state, np.asarray(state.logits.argmax(-1)))
    for name, buffer in after.cache1.buffers.items():
        assert buffer.data_ptr() == pointers[name]  # written in place, not reallocated
        filled = after.cache1.length - 1
        assert torch.equal(buffer[:, :, :filled], before[name][:, :, :filled])
        assert buffer[:, :, filled].abs().sum() > 0
    result = engine.generate(images[:1], ["What is in the image?"], Sampling(max_new_tokens=4, stop_at_eos=False))
    assert len(result.token_ids[0]) == 4 and result.timings["decode_steps"] == 3
