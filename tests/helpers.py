"""Test helpers: parity of one exported graph by the validator's own rule (error budget against float64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from star_export.validate.reference import reference_pipeline
from star_export.validate import ValidationReport, check_graph_call


def assert_graph_parity(loaded, schedule, name: str, engine_graph, feed: dict, dtype: str = "float32") -> ValidationReport:
    """Graph `name` of the engine on `feed` against the eager float64 truth and eager `dtype` (validate.py's rule);
    raises listing every failing output."""
    truth = reference_pipeline(loaded, schedule, dtype="float64").graphs[name]
    eager = reference_pipeline(loaded, schedule, dtype=dtype).graphs[name]
    report = ValidationReport(engine=name, reference_device="cpu", dtype=dtype)
    check_graph_call(report, name, name, engine_graph, truth, eager, {k: np.asarray(v) for k, v in feed.items()})
    assert report.ok, "\n" + report.table()
    return report


def script(name: str):
    """scripts/NAME.py as a module (a script, not part of the package), with scripts/ on sys.path as when it is run,
    so that it imports its neighbours."""
    import importlib.util
    import sys

    folder = str(Path(__file__).resolve().parent.parent / "scripts")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    path = Path(folder) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module



def planted_defect_fails(engine_dir: Path, graph_file: str, plant, loaded, check_prefix: str, tmp_path: Path) -> None:
    """Copy the engine, change graph `graph_file` with `plant(model)` (an onnx.ModelProto, changed in place), re-sign
    star.json, and assert that star-validate fails a check named `check_prefix...`."""
    import json
    import shutil

    import onnx

    from star_export.manifest import MANIFEST, file_table
    from star_export.validate import validate_engine

    broken = tmp_path / "broken"
    shutil.copytree(engine_dir, broken)
    model = onnx.load(str(broken / graph_file), load_external_data=False)
    plant(model)
    onnx.save(model, str(broken / graph_file))
    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["files"] = file_table(broken)
    (broken / MANIFEST).write_text(json.dumps(manifest))
    report = validate_engine(broken, loaded=loaded, max_new_tokens=4)
    assert not report.ok
    failed = {c.name for c in report.checks if not c.ok}
    assert any(name.startswith(check_prefix) for name in failed), report.table()
