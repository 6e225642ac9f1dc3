"""Routing: a pure function from a study summary and the configured routes to decisions.

A route's ``match`` table maps a DICOM keyword (or ``CallingAETitle``) to accepted values. Keys are
ANDed, values ORed; a value is an exact string or ``{ regex = "..." }`` (``re.search``). A route
with an empty ``match`` accepts every study. Its ``order`` table does the same on the attributes
of the worklist order matched to the study (config.ORDER_KEYS); a route with order keys never
fires for a study without a matched order. ``dicom-node route --dry-run`` calls the same function.
No user text is ever evaluated as code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

from dicom_node.config import CALLING_AE_KEY, RegexMatch, Route
from dicom_node.errors import UnreadableInstanceError
from dicom_node.log import IDENTIFYING_KEYS
from dicom_node.messages import StudySummary
from dicom_node.store.readback import read_instance
from dicom_node.worklist.order import Order


@dataclass(frozen=True)
class RouteDecision:
    """Whether one route fires for a study, and why (one reason per match key)."""

    route: Route
    fires: bool
    reasons: tuple[str, ...]


def _element_values(element: DataElement) -> list[str]:
    if element.VR == "SQ" or element.value is None:
        return []
    values = element.value if isinstance(element.value, MultiValue | list) else [element.value]
    return [str(v).strip() for v in values if str(v).strip()]


def summarize(study_uid: str, datasets: Iterable[Dataset], calling_aes: Iterable[str],
              instance_count: int | None = None) -> StudySummary:
    """Collect keyword → values from representative instances (one per series is enough)."""
    values: dict[str, set[str]] = {}
    series: set[str] = set()
    count = 0
    for ds in datasets:
        count += 1
        series.add(str(ds.get("SeriesInstanceUID", "")))
        for element in ds.iterall():
            if not element.keyword or element.tag.is_private:
                continue
            found = _element_values(element)
            if found:
                values.setdefault(element.keyword, set()).update(found)
    return StudySummary(
        study_instance_uid=study_uid,
        values={k: frozenset(v) for k, v in values.items()},
        calling_ae_titles=frozenset(a.strip() for a in calling_aes),
        instance_count=instance_count if instance_count is not None else count,
        series_count=len(series),
    )


def summarize_files(paths: Sequence[Path], calling_aes: Iterable[str] = (),
                    on_unreadable: Callable[[str, UnreadableInstanceError], None] | None = None
                    ) -> StudySummary:
    """Summarize a study from files (headers only). Used by the dry-run on a folder.

    Each file is read as the completion sweep reads a stored instance (store.readback); with
    ``on_unreadable``, one that cannot be read is left out and handed to it with its path,
    without, the error is raised."""
    datasets = []
    for path in paths:
        try:
            datasets.append(read_instance(path, headers_only=True))
        except UnreadableInstanceError as exc:
            if on_unreadable is None:
                raise
            on_unreadable(str(path), exc)
    study_uids = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
    return summarize(",".join(sorted(study_uids)), datasets, calling_aes)


def _accepts(accepted: RegexMatch | str, found: str) -> bool:
    return accepted.matches(found) if isinstance(accepted, RegexMatch) else accepted == found


def _show(accepted: RegexMatch | str) -> str:
    return f"/{accepted.regex}/" if isinstance(accepted, RegexMatch) else repr(accepted)


def _check(key: str, found: frozenset[str], accepted: tuple[RegexMatch | str, ...],
           label: str) -> tuple[bool, str]:
    hits = sorted(f for f in found if any(_accepts(a, f) for a in accepted))
    # Reasons end up in logs: never spell out a value that identifies a patient.
    hidden = key in IDENTIFYING_KEYS
    wanted = "the configured value(s)" if hidden else " or ".join(map(_show, accepted))
    if hits:
        shown = "the value" if hidden else ", ".join(map(repr, hits))
        return True, f"{label}{key}: {shown} matches {wanted}"
    seen = ("the value" if hidden else ", ".join(map(repr, sorted(found)))) if found \
        else "absent"
    return False, f"{label}{key}: {seen} does not match {wanted}"


def evaluate_route(summary: StudySummary, route: Route,
                   order: Order | None = None) -> RouteDecision:
    """Check one route's match and order keys against the study, keeping a reason for each."""
    reasons = []
    fires = True
    for key in route.match:
        found = summary.calling_ae_titles if key == CALLING_AE_KEY else summary.values.get(key,
                                                                                            frozenset())
        ok, reason = _check(key, found, route.accepted(key), "")
        fires &= ok
        reasons.append(reason)
    if route.order and order is None:
        fires = False
        reasons.append("order: no worklist order is matched to the study")
    elif route.order and order is not None:
        values = order.route_values()
        for key in route.order:
            ok, reason = _check(key, values.get(key, frozenset()),
                                route.accepted(key, "order"), "order.")
            fires &= ok
            reasons.append(reason)
    if not route.match and not route.order:
        reasons.append("no match keys: accepts every study")
    return RouteDecision(route=route, fires=fires, reasons=tuple(reasons))


def route_study(summary: StudySummary, routes: Sequence[Route],
                order: Order | None = None) -> list[RouteDecision]:
    """Evaluate every route, in config order."""
    return [evaluate_route(summary, route, order) for route in routes]
