"""star-export: LLaVA with two-stage STAR visual-token pruning inside compiled engines."""

__version__ = "0.1.0"
