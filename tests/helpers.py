"""Test helpers: ONNX exports cached per session, and parity assertions with reports."""

from __future__ import annotations

import numpy as np

from star_export.validate import ValidationReport, compare_graph


def assert_graph_parity(graph: str, ref: dict, got: dict, dtype: str = "float32") -> ValidationReport:
    """Every output of `graph` within the validator's tolerance table; raises listing every failing output."""
    report = ValidationReport(engine=graph, reference_device="cpu", dtype=dtype)
    compare_graph(report, graph, "call", {k: np.asarray(v) for k, v in ref.items()}, {k: np.asarray(v) for k, v in got.items()})
    assert report.ok, "\n" + report.table()
    return report
