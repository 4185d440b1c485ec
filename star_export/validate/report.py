"""A validation report: one row per check (the engine's error, its budget, the multiplier it needed), notes, and
what quantization costs against the unquantized model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import budget


@dataclass
class Check:
    name: str
    measured: str  # the engine's error, or what was compared
    budget: str  # what it had to meet
    ok: bool
    multiplier: str = ""  # engine error / eager error, for budgeted values
    cause: str = ""  # why it failed, in words
    numbers: dict[str, float] = field(default_factory=dict)


@dataclass
class ValidationReport:
    engine: str
    reference_device: str
    dtype: str
    multiplier: float = budget.MULTIPLIER
    floor: float = 0.0
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quality: dict[str, dict] = field(default_factory=dict)  # quantized engines: vs the unquantized model, per batch

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, check: Check) -> None:
        self.checks.append(check)

    def add_budget(self, name: str, b: budget.Budget) -> None:
        self.add(
            Check(
                name,
                f"{b.error:.2e} (max abs {b.max_abs:.1e})",
                f"{b.limit:.2e}",
                b.ok,
                f"{b.ratio:.2f}",
                b.cause,
                {
                    "error": b.error,
                    "eager_error": b.eager_error,
                    "limit": b.limit,
                    "ratio": b.ratio,
                    "max_abs": b.max_abs,
                },
            )
        )

    def add_selection(self, name: str, s: budget.Selection) -> None:
        self.add(
            Check(
                name,
                s.describe(),
                "top-k within 2 x score budget",
                s.ok,
                cause=s.cause,
                numbers={"swaps": s.swaps, "gap": s.gap, "limit": s.limit},
            )
        )

    def table(self) -> str:
        w = max([len(c.name) for c in self.checks] + [5])
        head = f"{'check':<{w}}  {'engine error':<30}  {'budget':<28}  {'x eager':>7}  result"
        lines = [head]
        for c in self.checks:
            lines.append(
                f"{c.name:<{w}}  {c.measured:<30}  {c.budget:<28}  {c.multiplier:>7}  {'ok' if c.ok else 'FAIL'}"
            )
        lines.append(
            f"rule: relative error ||engine - float64|| / ||float64|| <= {self.multiplier:g} x that of eager "
            f"{self.dtype} + {budget.FLOOR_ULPS} ulp ({self.floor:.1e}); 'x eager' is the multiplier each output needed"
        )
        lines += [f"note: {n}" for n in self.notes]
        failed = [c for c in self.checks if not c.ok]
        lines += [f"cause: {c.name}: {c.cause}" for c in failed]
        lines.append(f"{'PASSED' if self.ok else 'FAILED'}: {len(self.checks) - len(failed)}/{len(self.checks)} checks")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the verdict, and the largest multiplier any value needed against the one allowed."""
        ratios = [c.numbers["ratio"] for c in self.checks if "ratio" in c.numbers]
        worst = f"; largest multiplier {max(ratios):.2f} of {self.multiplier:g} allowed" if ratios else ""
        ok = sum(c.ok for c in self.checks)
        return (
            f"{'PASSED' if self.ok else 'FAILED'}: {ok}/{len(self.checks)} checks against the float64 reference{worst}"
        )

    def asdict(self) -> dict:
        return asdict(self) | {"ok": self.ok}
