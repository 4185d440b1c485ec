"""Console scripts: `star-export`, `star-run`, `star-validate`, `star-serve`, `star-calibrate` (pyproject.toml's entry
points). Each parses its arguments with nothing heavy imported (so `--help` answers at once), then calls one library
function with the same keyword names; `common.run_command` turns the outcome into the exit code."""

from .calibrate import calibrate_main, calibrate_parser
from .export import export_main, export_parser
from .run import run_main, run_parser, validate_main, validate_parser
from .serve import serve_main, serve_parser

__all__ = [
    "calibrate_main",
    "calibrate_parser",
    "export_main",
    "export_parser",
    "run_main",
    "run_parser",
    "serve_main",
    "serve_parser",
    "validate_main",
    "validate_parser",
]
