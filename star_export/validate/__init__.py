"""The validator: an engine against the eager PyTorch reference of its source model, by measured error budgets
(`run.py` for the loop and its modes, `checks.py` for the checks, `budget.py` for the rule, `reference.py` and
`streaming.py` for the references, `quantized.py` for what a quantized engine computes)."""

from .checks import check_graph_call
from .report import Check, ValidationReport
from .run import BUILTIN_QUESTIONS, MODES, validate_engine

__all__ = ["BUILTIN_QUESTIONS", "MODES", "Check", "ValidationReport", "check_graph_call", "validate_engine"]
