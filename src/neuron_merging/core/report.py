"""Reports: what a compression run did, for people (Markdown) and machines (dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .groups import SkippedLayer


@dataclass(frozen=True)
class GroupReport:
    """The outcome for one merge group."""

    producer: str
    bn: str | None
    consumer: str
    neurons: int
    kept: int
    pruned: int
    merged: int


@dataclass
class MergeReport:
    """Per-group counts, skipped layers with reasons, parameter counts and timings."""

    mode: str
    config: dict[str, Any]
    groups: list[GroupReport]
    skipped: list[SkippedLayer]
    params_before: int
    params_after: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """Fraction of parameters removed."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view of the report."""
        return {
            "mode": self.mode,
            "config": self.config,
            "groups": [asdict(g) for g in self.groups],
            "skipped": [asdict(s) for s in self.skipped],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "timings": dict(self.timings),
        }

    def to_markdown(self) -> str:
        """A Markdown summary: one row per group, then the skipped layers."""
        lines = [
            f"**{self.mode}**: {self.params_before:,} → {self.params_after:,} parameters "
            f"({100 * self.compression:.1f}% removed)",
            "",
            "| producer | bn | consumer | neurons | kept | pruned | merged |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for g in self.groups:
            lines.append(
                f"| {g.producer} | {g.bn or '—'} | {g.consumer} | {g.neurons} | {g.kept} "
                f"| {g.pruned} | {g.merged} |"
            )
        if self.skipped:
            lines += ["", "| left intact | reason |", "|---|---|"]
            lines += [f"| {s.name} | {s.reason} |" for s in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()
