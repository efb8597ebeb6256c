"""The result of a conformance check: one row per check, printed as a table.

Every ``check_*`` function of :mod:`minidora.testing` returns a :class:`Report`. ``print(report)``
shows the table; ``report.ok`` says whether every row passed (skipped rows do not fail a
report, nor do robustness rows, shown as ``WARN``, unless the check ran with ``strict=True``);
``report.assert_ok()`` raises ``AssertionError`` listing the failing rows, for use in a test
suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Report", "Row"]

_STATUS = {True: "ok", False: "FAIL", None: "skip"}


@dataclass
class Row:
    """One check.

    Attributes:
        name: what was checked, e.g. ``"golden: packed codes"``.
        ok: True (passed), False (failed) or None (skipped).
        worst: the largest |got - expected| over everything the row compared (codes count in
            code steps), or None when nothing could be compared.
        tolerance: what |got - expected| may be, e.g. ``"exact"`` or ``"1e-13+1e-10|ref|"``.
        note: for a failure, where the first difference is and what it usually means.
        counts: whether a failure of this row fails the report. False for a robustness row
            (an edge the reference libraries themselves get wrong): it fails as ``WARN``.
    """

    name: str
    ok: bool | None
    worst: float | None = None
    tolerance: str = ""
    note: str = ""
    counts: bool = True

    @property
    def status(self) -> str:
        """``"ok"``, ``"FAIL"``, ``"WARN"`` (a failure that does not count) or ``"skip"``."""
        return "WARN" if self.ok is False and not self.counts else _STATUS[self.ok]


def _fmt(worst: float | None) -> str:
    return "-" if worst is None else f"{worst:.2g}"


@dataclass
class Report:
    """Rows of one check, e.g. ``check_dora(my_factory)``.

    Attributes:
        title: what was checked, first line of the printed table.
        rows: the :class:`Row` objects, in the order they ran.
    """

    title: str
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no row failed."""
        return not self.failures

    @property
    def failures(self) -> list[Row]:
        """The failed rows that count (every failed row but the ``WARN`` ones)."""
        return [r for r in self.rows if r.ok is False and r.counts]

    @property
    def warnings(self) -> list[Row]:
        """The failed rows that do not count: robustness rows of a check run without strict."""
        return [r for r in self.rows if r.ok is False and not r.counts]

    def summary(self) -> str:
        """The first line: the title, the number of checks, how many failed, warned, skipped."""
        n, bad, warned = len(self.rows), len(self.failures), len(self.warnings)
        skipped = sum(r.ok is None for r in self.rows)
        tail = f", {warned} WARN" if warned else ""
        tail += f", {skipped} skipped" if skipped else ""
        verdict = "all passed" if not bad else f"{bad} FAILED"
        return f"{self.title}: {n} checks, {verdict}{tail}"

    def table(self, rows: list[Row] | None = None) -> str:
        """The rows (default: all) as an aligned text table."""
        rows = self.rows if rows is None else rows
        head = ("check", "result", "worst", "tolerance", "note")
        cells = [head] + [(r.name, r.status, _fmt(r.worst), r.tolerance, r.note) for r in rows]
        width = [max(len(c[i]) for c in cells) for i in range(4)]
        lines = ["  ".join(c[i].ljust(width[i]) for i in range(4)) + "  " + c[4] for c in cells]
        lines.insert(1, "  ".join("-" * w for w in width) + "  ----")
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` with the failing rows if any row failed."""
        if not self.ok:
            raise AssertionError(self.summary() + "\n" + self.table(self.failures))
