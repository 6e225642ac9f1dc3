"""What every kind's evaluation shares: the :class:`Report` it returns and the header lines it
starts with.

Apart from the package's ``__init__`` so that the kinds' modules import it without importing the
package that dispatches to them (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.infer.card import ModelCard


@dataclass(frozen=True)
class Report:
    """What an evaluation found."""

    #: The table printed on stdout.
    text: str
    #: Every compared metric within its tolerance of the card's (True when nothing to compare).
    agrees: bool
    #: Everything measured, as written to metrics.json.
    metrics: dict[str, Any] = field(default_factory=dict)
    #: Files written under --out.
    files: tuple[Path, ...] = ()


def header(card: ModelCard, data: Path, cases: int, skipped: list[str]) -> list[str]:
    """The first lines of every report: model, data, cases, what the card measured on."""
    lines = [f"{card.name} {card.version} ({card.kind}) on {data}: {cases} case(s)"
             + (f", {len(skipped)} skipped" if skipped else "")]
    lines += [f"  skipped: {reason}" for reason in skipped[:10]]
    if len(skipped) > 10:
        lines.append(f"  … and {len(skipped) - 10} more")
    measured = card.metrics if card.kind != "report" else getattr(card, "evaluation", None)
    if measured is not None:
        lines.append(f"card: {measured.split}, {measured.samples} samples")
    else:
        lines.append("card: no [evaluation] to compare with" if card.kind == "report" else
                     "card: no [metrics] to compare with")
    return lines
