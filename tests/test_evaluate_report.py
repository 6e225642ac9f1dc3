"""``dicom-node evaluate`` of report-drafter: train.py exports its held-out test cases as
cases.jsonl; the evaluator reads them back unchanged, drafts them through the node's own code and
measures what train.py measures (one implementation), compares with the card's [evaluation]
within tolerances, and refuses a missing or garbled cases file naming the file and line."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from dicom_node.cli import main
from dicom_node.errors import DicomNodeError
from dicom_node.evaluate import evaluate
from dicom_node.evaluate.report import (
    NOT_MEASURED,
    RATE_NAMES,
    SECTIONS,
    rate_tolerance,
    read_cases,
)
from dicom_node.infer.card import ReportCard, load_card
from dicom_node.infer.report_input import concept_table
from dicom_node.messages import findings_from_json
from tests.support.evaluate_runs import export_eval, run_evaluate

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "report-drafter"
SUBSET = 40


@pytest.fixture(scope="module")
def train() -> types.ModuleType:
    """models/report-drafter/train.py as a module (it imports corpus.py from its folder)."""
    spec = importlib.util.spec_from_file_location("report_drafter_train_eval",
                                                  MODEL_DIR / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def card() -> ReportCard:
    loaded = load_card(MODEL_DIR)
    assert isinstance(loaded, ReportCard) and loaded.evaluation is not None
    return loaded


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 40 of report-drafter's 600 test cases, exported by train.py."""
    folder = tmp_path_factory.mktemp("rd-test")
    stdout = export_eval(MODEL_DIR, folder, SUBSET)
    assert f"wrote {SUBSET} of the 600 test cases" in stdout
    return folder


@pytest.fixture(scope="module")
def evaluated(exported: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[int, str, str, Path]:
    """``dicom-node evaluate`` on the export, once for the module: (exit code, stdout, stderr,
    --out folder)."""
    return run_evaluate(MODEL_DIR, exported, tmp_path_factory.mktemp("rd-eval"))


def _metrics(evaluated: tuple[int, str, str, Path]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((evaluated[3] / "metrics.json").read_text())
    return result


# --------------------------------------------------------------------------------------------
# the export


def test_export_writes_the_first_test_cases_train_py_evaluates_on(
        exported: Path, train: types.ModuleType, tmp_path: Path) -> None:
    cases = train.make_cases(train.SEED + 2, train.TEST, references=train.REFERENCES)[:SUBSET]
    lines = (exported / "cases.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == SUBSET
    for index, (line, case) in enumerate(zip(lines, cases, strict=True)):
        row = json.loads(line)
        assert row["case"] == index
        assert findings_from_json(json.dumps(row["findings"])) == case.findings
        assert row["context"] == case.context
        assert [(r["findings"], r["impression"]) for r in row["references"]] == list(
            case.references)
        assert len(row["references"]) == train.REFERENCES
    assert "dicom-node evaluate report-drafter DIR" in (exported / "README.txt").read_text()
    train.export_eval(tmp_path, SUBSET)  # deterministic: the same bytes again
    assert (tmp_path / "cases.jsonl").read_bytes() == (exported / "cases.jsonl").read_bytes()


def test_reading_the_export_gives_the_source_tokens_and_slots_train_py_drafts_from(
        exported: Path, train: types.ModuleType, card: ReportCard) -> None:
    cases = train.make_cases(train.SEED + 2, SUBSET, references=train.REFERENCES)
    read = read_cases(exported / "cases.jsonl", concept_table(card))
    assert [c.encoded for c in read] == [c.encoded for c in cases]
    assert [c.references for c in read] == [c.references for c in cases]
    assert len(read_cases(exported / "cases.jsonl", concept_table(card), limit=7)) == 7


# --------------------------------------------------------------------------------------------
# evaluate on the export


def test_evaluate_measures_what_train_py_measures_on_the_same_cases(
        evaluated: tuple[int, str, str, Path], train: types.ModuleType) -> None:
    cases = train.make_cases(train.SEED + 2, SUBSET, references=train.REFERENCES)
    expected = train.evaluate(MODEL_DIR, cases)  # what train.py writes into the card
    metrics = _metrics(evaluated)
    sections = metrics["sections"]
    for name, key in (("before_check", "before"), ("after_check", "after"),
                      ("extractor_on_references", "references"),
                      ("stress_before_check", "stress_before"),
                      ("stress_after_check", "stress_after")):
        assert sections[name]["measured"] == expected[key], name
    assert metrics["cases_repaired"]["measured"] == expected["repaired"]
    assert (metrics["positive_findings"], metrics["absent_findings"]) == (
        expected["positives"], expected["absents"])
    assert round(metrics["text"]["bleu"], 2) == expected["bleu"]
    assert round(metrics["text"]["rouge_l"], 4) == expected["rouge_l"]
    assert metrics["text"]["bleu_signature"] == expected["bleu_signature"]


def test_sent_drafts_are_consistent_and_the_subset_agrees_with_the_card(
        evaluated: tuple[int, str, str, Path], card: ReportCard) -> None:
    code, out, err, _ = evaluated
    assert code == 0, out + err
    assert "every metric agrees with the card within its tolerance" in out
    metrics = _metrics(evaluated)
    assert metrics["agrees"] is True and metrics["cases"] == SUBSET
    for name in ("after_check", "stress_after_check", "extractor_on_references"):
        assert metrics["sections"][name]["measured"] == dict.fromkeys(RATE_NAMES, 1.0), name
    assert metrics["cases_unrepairable"] == 0
    # a subset: 3 binomial standard errors around the card's value, over the cases counted
    assert card.evaluation is not None
    ref = card.evaluation.before_check.cases_values_attributed
    tol = metrics["sections"]["before_check"]["tolerance"]["cases_values_attributed"]
    assert tol == pytest.approx(3 * math.sqrt(ref * (1 - ref) / SUBSET))
    assert metrics["text"]["tolerance"]["bleu"] > 0.5  # bootstrap, wider than the floor


def test_metrics_json_and_drafts_jsonl_hold_every_case_and_the_comparison(
        evaluated: tuple[int, str, str, Path]) -> None:
    _, out, _, folder = evaluated
    metrics = _metrics(evaluated)
    assert {"model", "version", "kind", "data", "cases", "card_samples", "sections", "text",
            "cases_repaired", "positive_findings", "absent_findings", "agrees"} <= set(metrics)
    assert (metrics["model"], metrics["kind"], metrics["card_samples"]) == (
        "report-drafter", "report", 600)
    assert list(metrics["sections"]) == list(SECTIONS)
    for entry in metrics["sections"].values():
        assert set(entry) == {"measured", "card", "difference", "tolerance", "agrees"}
        assert set(entry["measured"]) == set(RATE_NAMES)
    assert metrics["counts"] == {}  # case and finding counts are compared on the full set only
    assert metrics["text"]["references_per_case"] == 4
    assert metrics["text"]["bleu_signature"].startswith("nrefs:4|")
    drafts = [json.loads(line) for line in (folder / "drafts.jsonl").read_text().splitlines()]
    assert [d["case"] for d in drafts] == list(range(SUBSET))
    assert sum(d["repaired"] for d in drafts) == round(
        metrics["cases_repaired"]["measured"] * SUBSET)
    assert all(d["sent_findings"] and d["after_check"]["all_positives_mentioned"]
               for d in drafts)
    assert f"wrote {folder / 'metrics.json'}" in out and f"wrote {folder / 'drafts.jsonl'}" in out


def test_the_table_goes_to_stdout_and_the_progress_bar_to_stderr(
        evaluated: tuple[int, str, str, Path]) -> None:
    _, out, err, _ = evaluated
    assert "SECTION" in out and "MEASURED" in out and "TOLERANCE" in out
    assert "before_check" in out and "rouge_l" in out
    assert "drafting" not in out
    assert "drafting" in err and f"{SUBSET}/{SUBSET}" in err


def test_a_card_value_beyond_its_tolerance_is_reported_as_differing(
        exported: Path, card: ReportCard) -> None:
    assert card.evaluation is not None
    wrong = card.evaluation.before_check.model_copy(update={"cases_values_attributed": 0.5})
    changed = card.model_copy(update={"evaluation": card.evaluation.model_copy(
        update={"before_check": wrong})})
    report = evaluate(changed, MODEL_DIR, exported, limit=10, progress=False)
    assert report.agrees is False
    assert "DIFFERS" in report.text and "SOME METRICS DIFFER" in report.text
    assert report.metrics["sections"]["before_check"]["agrees"] is False
    assert report.metrics["sections"]["after_check"]["agrees"] is True


def test_without_sacrebleu_bleu_and_rouge_are_not_measured_and_it_says_how_to_get_them(
        exported: Path, card: ReportCard, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)  # import fails
    report = evaluate(card, MODEL_DIR, exported, limit=5, progress=False)
    assert NOT_MEASURED in report.text and "install dicom-node[eval]" in NOT_MEASURED
    assert report.metrics["text"] == {"measured": False, "reason": NOT_MEASURED}
    assert report.agrees is True  # the consistency rates are still compared


def test_rate_tolerance_is_three_standard_errors_or_the_floor_on_the_cards_own_set() -> None:
    assert rate_tolerance(0.91, 40, same_set=True) == 0.005
    assert rate_tolerance(0.91, 40, same_set=False) == pytest.approx(
        3 * math.sqrt(0.91 * 0.09 / 40))
    assert rate_tolerance(1.0, 40, same_set=False) == 0.005
    assert rate_tolerance(0.91, 400, same_set=False) < rate_tolerance(0.91, 40, same_set=False)


# --------------------------------------------------------------------------------------------
# bad data


def _run(*args: str) -> tuple[int, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["evaluate", str(MODEL_DIR), *args, "--no-progress"])
    return code, stderr.getvalue()


def test_a_folder_without_cases_jsonl_is_refused_naming_the_file(tmp_path: Path) -> None:
    code, err = _run(str(tmp_path))
    assert code == 1
    assert f"{tmp_path / 'cases.jsonl'}: cannot read" in err


@pytest.mark.parametrize(("bad_line", "message"), [
    ('{"case": 2, "findings": [', ":3: Invalid JSON"),
    ('{"context": {}, "findings": [{"model": "m"}], "references": []}',
     ":3: findings.0.model_version: Field required"),
    ('{"context": {}, "findings": [], "references": [{"findings": "", "impression": ""}]}',
     ":3: findings: Tuple should have at least 1 item"),
    ('{"findings": {}, "references": [], "extra": 1}', ":3: findings: Input should be"),
])
def test_a_garbled_line_is_refused_naming_the_file_and_line(
        exported: Path, tmp_path: Path, bad_line: str, message: str) -> None:
    good = (exported / "cases.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join([*good, bad_line]) + "\n", encoding="utf-8")
    code, err = _run(str(tmp_path))
    assert code == 1
    assert f"{path}{message}" in err, err


def test_a_cases_file_with_no_cases_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DicomNodeError, match=f"{path}: no cases"):
        read_cases(path, {})
