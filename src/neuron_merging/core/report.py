"""Reports: what a compression run did, for people (Markdown) and machines (dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .groups import FirstOfEach, SkippedLayer

if TYPE_CHECKING:
    from .build import GroupPlan


@dataclass(frozen=True)
class GroupReport(FirstOfEach):
    """The outcome for one channel group.

    Attributes:
        producers, bns, consumers: the group's layers (``bns`` aligned with ``producers``).
        passthrough: layers in between whose per-channel weights were sliced.
        neurons, kept, pruned, merged: channel counts.
        mergeable: whether the group could be merged; ``reason`` says why not.
        method: ``"merged"``, ``"approximate"`` (merged through a non-homogeneous
            activation with least-squares scales) or ``"pruned"``.
        coupled: whether the group joins a residual add, a concat or several consumers.
    """

    producers: tuple[str, ...]
    bns: tuple[str | None, ...]
    consumers: tuple[str, ...]
    neurons: int
    kept: int
    pruned: int
    merged: int
    passthrough: tuple[str, ...] = ()
    mergeable: bool = True
    reason: str | None = None
    method: str = "merged"
    coupled: bool = False

    @classmethod
    def of(cls, plan: GroupPlan, mode: str) -> GroupReport:
        """The report of one executed plan under ``mode``."""
        g = plan.group
        approximate = mode == "merge" and not g.mergeable and plan.approximate
        merges = mode == "merge" and g.mergeable
        reason = g.reason if mode == "merge" and not g.mergeable else None
        if mode == "merge" and not g.checked:
            reason = "explicit group, not checked against a forward pass"
        return cls(
            g.producers,
            g.bns,
            g.consumers,
            g.channels,
            plan.kept.numel(),
            plan.pruned.numel(),
            plan.merged,
            g.passthrough,
            g.mergeable,
            reason,
            "merged" if merges else "approximate" if approximate else "pruned",
            g.coupled,
        )


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
    notes: list[str] = field(default_factory=list)

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
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        """A Markdown summary: one row per group, then the skipped layers."""
        lines = [
            f"**{self.mode}**: {self.params_before:,} → {self.params_after:,} parameters "
            f"({100 * self.compression:.1f}% removed)",
            "",
            "| producers | bn | consumers | neurons | kept | pruned | merged | how |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
        for g in self.groups:
            bns = ", ".join(b or "—" for b in g.bns)
            how = g.method + (f" ({g.reason})" if g.reason else "")
            lines.append(
                f"| {', '.join(g.producers)} | {bns} | {', '.join(g.consumers)} | {g.neurons} "
                f"| {g.kept} | {g.pruned} | {g.merged} | {how} |"
            )
        if self.skipped:
            lines += ["", "| left intact | reason |", "|---|---|"]
            lines += [f"| {s.name} | {s.reason} |" for s in self.skipped]
        if self.notes:
            lines += ["", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()
