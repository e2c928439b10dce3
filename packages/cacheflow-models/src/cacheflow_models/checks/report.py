"""The verdict table of ``cacheflow-models check``: one row per check, plain text."""

from __future__ import annotations

from dataclasses import dataclass, field

PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"


@dataclass
class Row:
    """One check: what was checked, its verdict (PASS, FAIL, WARN or SKIP) and the evidence."""

    check: str
    verdict: str
    detail: str


@dataclass
class Report:
    """The rows of one run, in the order they were checked."""

    title: str
    rows: list[Row] = field(default_factory=list)

    def add(self, check: str, verdict: str, detail: str) -> Row:
        """Appends a row and returns it."""
        row = Row(check, verdict, detail)
        self.rows.append(row)
        return row

    @property
    def failed(self) -> bool:
        """Whether any check failed."""
        return any(row.verdict == FAIL for row in self.rows)

    def render(self) -> str:
        """The table as text, with an overall verdict on the last line."""
        width = max([len("check")] + [len(r.check) for r in self.rows])
        lines = [self.title, "", f"{'check':<{width}}  verdict  detail",
                 f"{'-' * width}  -------  {'-' * 40}"]
        for row in self.rows:
            detail = row.detail.replace("\n", "\n" + " " * (width + 11))
            lines.append(f"{row.check:<{width}}  {row.verdict:<7}  {detail}")
        failures = [r.check for r in self.rows if r.verdict == FAIL]
        lines += ["", f"verdict: FAIL ({', '.join(failures)})" if failures else "verdict: PASS"]
        return "\n".join(lines)
