"""Routing rules: keys AND, values OR, regex form, calling AE; reasons for every decision."""

from __future__ import annotations

from pydicom import dcmread

from dicom_node.config import Route, parse_config
from dicom_node.route import route_study, summarize
from tests.conftest import sample_file


def _routes(*tables: dict[str, object]) -> tuple[Route, ...]:
    config = parse_config({
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}],
        "models": [{"name": "m", "path": "."}],
        "routes": [{"models": ["m"], "send_to": ["pacs"], **t} for t in tables],
    })
    return config.routes


def _ct_summary(calling_ae: str = "CT01"):  # type: ignore[no-untyped-def]
    ds = dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    return summarize(ds.StudyInstanceUID, [ds], [calling_ae])


def test_modality_route_fires_and_says_why() -> None:
    routes = _routes({"name": "ct", "match": {"Modality": ["CT", "MR"]}},
                     {"name": "cr", "match": {"Modality": "CR"}})
    ct, cr = route_study(_ct_summary(), routes)
    assert ct.fires and "Modality: 'CT' matches 'CT' or 'MR'" in ct.reasons
    assert not cr.fires and "Modality: 'CT' does not match 'CR'" in cr.reasons


def test_keys_are_anded() -> None:
    (decision,) = route_study(_ct_summary(), _routes(
        {"name": "r", "match": {"Modality": "CT", "Manufacturer": "NOBODY"}}))
    assert not decision.fires


def test_regex_and_calling_ae_match() -> None:
    (decision,) = route_study(_ct_summary("CT_SCANNER_7"), _routes(
        {"name": "r", "match": {"Manufacturer": {"regex": "(?i)^ge"},
                                "CallingAETitle": {"regex": "^CT_"}}}))
    assert decision.fires, decision.reasons


def test_multi_valued_attribute_matches_any_value() -> None:
    (decision,) = route_study(_ct_summary(), _routes(
        {"name": "r", "match": {"ImageType": "AXIAL"}}))
    assert decision.fires, decision.reasons


def test_route_without_match_accepts_everything() -> None:
    (decision,) = route_study(_ct_summary(), _routes({"name": "all"}))
    assert decision.fires
