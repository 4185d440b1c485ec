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

