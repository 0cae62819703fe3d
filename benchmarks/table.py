"""One row of the benchmark table (DESIGN §8) and its Markdown / JSON forms.

A row is a measurement of ours against a baseline taken back to back in the same process (ratio =
ours / theirs), or a single figure (theirs is None). `target` is ("≥" or "≤", bound), applied to
the ratio when there is a baseline and to the figure otherwise; None means "reported".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Row:
    what: str
    ours: float
    unit: str
    against: str = "—"
    theirs: float | None = None
    target: tuple[str, float] | None = None

    @property
    def ratio(self) -> float | None:
        return None if not self.theirs else self.ours / self.theirs  # a zero baseline gives no ratio

    @property
    def met(self) -> bool | None:
        if self.target is None or self.theirs == 0:  # nothing to judge, or a zero baseline
            return None
        direction, bound = self.target
        value = self.ours if self.ratio is None else self.ratio
        return value >= bound if direction == "≥" else value <= bound

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def figure(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def markdown(rows: list[Row]) -> str:
    lines = ["| what | ours | against | theirs | ratio | target | met |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        target = "reported" if row.target is None else f"{row.target[0]} {row.target[1]:g}" + ("×" if row.theirs else "")
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}×"
        met = {None: "", True: "yes", False: "**no**"}[row.met]
        lines.append(f"| {row.what} | {figure(row.ours)} {row.unit} | {row.against} | {figure(row.theirs)} "
                     f"| {ratio} | {target} | {met} |")
    return "\n".join(lines)
