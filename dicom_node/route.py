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

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

from dicom_node.config import CALLING_AE_KEY, RegexMatch, Route
from dicom_node.log import IDENTIFYING_KEYS
from dicom_node.messages import StudySummary
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


def dataset_values(ds: Dataset) -> dict[str, set[str]]:
    """Keyword → values of every public element of one data set, nested ones too. Raises what
    pydicom raises for an element it cannot convert (a wrong VR or length, deep nesting…)."""
    values: dict[str, set[str]] = {}
    for element in ds.iterall():
        if not element.keyword or element.tag.is_private:
            continue
        found = _element_values(element)
        if found:
            values.setdefault(element.keyword, set()).update(found)
    return values


def summarize(study_uid: str, datasets: Iterable[Dataset], calling_aes: Iterable[str],
              instance_count: int | None = None,
              on_unreadable: Callable[[Dataset, Exception], None] | None = None
              ) -> StudySummary:
    """Collect keyword → values from representative instances (one per series is enough).

    A data set whose elements cannot be converted is left out and handed to ``on_unreadable``
    (with what went wrong); without it, the error propagates."""
    values: dict[str, set[str]] = {}
    series: set[str] = set()
    count = 0
    for ds in datasets:
        try:
            found = dataset_values(ds)
            series_uid = str(ds.get("SeriesInstanceUID", ""))
        except Exception as exc:  # any conversion failure of one data set
            if on_unreadable is None:
                raise
            on_unreadable(ds, exc)
            continue
        count += 1
        series.add(series_uid)
        for keyword, found_values in found.items():
            values.setdefault(keyword, set()).update(found_values)
    return StudySummary(
        study_instance_uid=study_uid,
        values={k: frozenset(v) for k, v in values.items()},
        calling_ae_titles=frozenset(a.strip() for a in calling_aes),
        instance_count=instance_count if instance_count is not None else count,
        series_count=len(series),
    )


def summarize_files(paths: Sequence[Path], calling_aes: Iterable[str] = (),
                    on_unreadable: Callable[[str, Exception], None] | None = None
                    ) -> StudySummary:
    """Summarize a study from files (headers only). Used by the dry-run on a folder.

    With ``on_unreadable``, a file that cannot be read or converted is left out and handed to it
    (with its path); without, the error is raised."""
    datasets = []
    for path in paths:
        try:
            datasets.append(dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # any failure to read one file: left out, as in completion
            if on_unreadable is None:
                raise
            on_unreadable(str(path), exc)
    study_uids = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}

    def unconvertible(ds: Dataset, exc: Exception) -> None:
        assert on_unreadable is not None
        on_unreadable(str(ds.filename), exc)

    return summarize(",".join(sorted(study_uids)), datasets, calling_aes,
                     on_unreadable=None if on_unreadable is None else unconvertible)


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
