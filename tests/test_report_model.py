"""report-drafter: the shipped card and weights load; drafts on fixed findings mention every
positive finding and assert no absent one; the consistency check catches contradicting drafts
and repairs them; the pipeline turns a job into one report SR."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.errors import ModelError
from dicom_node.infer import report
from dicom_node.infer.card import ReportCard, load_card
from dicom_node.infer.report import NO_FINDINGS_TEXT, describe_network, draft_report
from dicom_node.infer.report_check import (
    LEXICONS,
    check,
    check_and_repair,
    expectations,
    find_mentions,
    finish_draft,
)
from dicom_node.infer.report_input import concept_table, encode_input
from dicom_node.infer.report_tokens import tokenize
from dicom_node.messages import CodedConcept, FindingRecord, Measurement, PipelineInput
from dicom_node.pipelines import run_pipeline
from dicom_node.pipelines.report import study_context

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models" / "report-drafter"
CHEST_DIR = REPO / "models" / "chest-xray-cnn"
CARDIOMEGALY = CodedConcept("8186001", "SCT", "Cardiomegaly")
EFFUSION = CodedConcept("60046008", "SCT", "Pleural effusion")
NODULE = CodedConcept("786838002", "SCT", "Pulmonary nodule")
HEMORRHAGE = CodedConcept("1386000", "SCT", "Intracranial hemorrhage")
PNEUMOTHORAX = CodedConcept("36118008", "SCT", "Pneumothorax")
MM = CodedConcept("mm", "UCUM", "millimeter")
MM3 = CodedConcept("mm3", "UCUM", "cubic millimeter")
DIAMETER = CodedConcept("81827009", "SCT", "Diameter")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
CHEST_CR = {"Modality": "CR", "BodyPartExamined": "CHEST", "StudyDescription": "XR CHEST PA"}
CHEST_CT = {"Modality": "CT", "BodyPartExamined": "CHEST", "StudyDescription": "CT THORAX"}
HEAD_CT = {"Modality": "CT", "BodyPartExamined": "HEAD", "StudyDescription": "CT HEAD WO"}


def _cnn(concept: CodedConcept, present: bool, p: float) -> FindingRecord:
    return FindingRecord("chest-xray-cnn", "1.0.0", concept, present, p)


def _nodule(diameter: float, volume: float, lobe: str, p: float = 0.95) -> FindingRecord:
    return FindingRecord("lung-nodule-unet", "1.0.0", NODULE, True, p, (
        Measurement(DIAMETER, diameter, MM), Measurement(VOLUME, volume, MM3)), lobe)


#: What chest-xray-cnn says on RG1_UNCR.dcm (its card's notes).
RG1_FINDINGS = (_cnn(CARDIOMEGALY, False, 0.0), _cnn(EFFUSION, True, 0.888),
                _cnn(NODULE, True, 1.0))


@pytest.fixture(scope="module")
def card() -> ReportCard:
    loaded = load_card(MODEL_DIR)
    assert isinstance(loaded, ReportCard)
    return loaded


def test_shipped_card_loads_as_a_report_card_with_its_evaluation(card: ReportCard) -> None:
    assert card.kind == "report" and card.name == "report-drafter"
    assert [o.name for o in card.outputs] == [
        "cardiomegaly", "pleural_effusion", "pulmonary_nodule", "intracranial_hemorrhage"]
    assert (MODEL_DIR / card.input.source_vocabulary).is_file()
    assert (MODEL_DIR / card.input.target_vocabulary).is_file()
    assert card.synthetic_training_data and "NOT FOR CLINICAL USE" in card.intended_use
    assert card.training is not None and card.training.duration_seconds is not None
    assert card.training.duration_seconds <= 300
    evaluation = card.evaluation
    assert evaluation is not None and evaluation.text.bleu > 0
    for rate in evaluation.after_check.model_dump().values():
        assert rate == 1.0
    assert evaluation.stress_after_check is not None
    assert evaluation.stress_after_check.cases_no_absent_asserted == 1.0
    assert describe_network(card, MODEL_DIR).startswith("weights loaded: ")


def _assert_consistent(findings: tuple[FindingRecord, ...], texts: tuple[str, str],
                       card: ReportCard) -> None:
    issues = check(texts, expectations(findings, concept_table(card)))
    assert issues == [], (issues, texts)


@pytest.mark.parametrize(("findings", "context", "expected"), [
    (RG1_FINDINGS, CHEST_CR, ["effusion", "nodule"]),
    ((_cnn(CARDIOMEGALY, True, 0.97), _cnn(EFFUSION, False, 0.02), _cnn(NODULE, False, 0.1)),
     CHEST_CR, ["cardi"]),
    ((_cnn(CARDIOMEGALY, False, 0.1), _cnn(EFFUSION, False, 0.02), _cnn(NODULE, False, 0.1)),
     CHEST_CR, []),
    ((_nodule(8.3, 270, "right upper lobe"), _nodule(5.2, 60, "left lower lobe", 0.8)),
     CHEST_CT, ["8.3 mm", "right upper lobe", "5.2 mm", "left lower lobe", "270 mm3"]),
    ((FindingRecord("head-ct-ich", "1.0.0", HEMORRHAGE, True, 0.96, (
        Measurement(VOLUME, 12.0, CodedConcept("mL", "UCUM", "milliliter")),), "left frontal"),),
     HEAD_CT, ["hemorrhage", "left frontal", "12 mL"]),
    ((FindingRecord("head-ct-ich", "1.0.0", HEMORRHAGE, False, 0.03),), HEAD_CT, []),
    ((_cnn(EFFUSION, False, 0.05), FindingRecord("extra", "2.0", PNEUMOTHORAX, True, 0.92)),
     CHEST_CR, ["neumothorax"]),
], ids=["rg1", "cardiomegaly", "all-absent", "ct-nodules", "hemorrhage", "no-hemorrhage",
        "unknown-concept"])
def test_draft_mentions_every_positive_and_asserts_no_absent_finding(
        card: ReportCard, findings: tuple[FindingRecord, ...], context: dict[str, str],
        expected: list[str]) -> None:
    draft = draft_report(card, MODEL_DIR, findings, context)
    _assert_consistent(findings, (draft.findings, draft.impression), card)
    # The shipped model needs no repair on these: its own text is consistent.
    assert draft.consistency.passed, draft.consistency.issues
    assert (draft.model_findings, draft.model_impression) == (draft.findings, draft.impression)
    text = f"{draft.findings} {draft.impression}"
    for fragment in expected:
        assert fragment.lower() in text.lower(), text
    assert "<" not in text  # every slot filled


def test_without_findings_the_draft_says_so_and_runs_no_model(
        card: ReportCard, tmp_path: Path) -> None:
    draft = draft_report(card, tmp_path, (), CHEST_CR)  # tmp_path has no weights
    assert draft.no_findings and draft.findings == NO_FINDINGS_TEXT
    assert "no statement about the images" in draft.impression


def test_check_catches_a_contradicting_draft_and_repairs_it(card: ReportCard) -> None:
    table = concept_table(card)
    kept_f, kept_i, added_f, added_i, info = check_and_repair(
        "No pleural effusion. The heart is enlarged. A pulmonary nodule is seen.",
        "No acute cardiopulmonary abnormality.", RG1_FINDINGS, table)
    kinds = {(i.kind, i.key) for i in info.issues}
    assert ("contradicted", "pleural_effusion") in kinds
    assert ("asserted_absent", "cardiomegaly") in kinds
    assert ("contradicted", "pulmonary_nodule") in kinds  # the global "no abnormality"
    assert info.removed == ("No pleural effusion.", "The heart is enlarged.",
                            "No acute cardiopulmonary abnormality.")
    assert kept_f == "A pulmonary nodule is seen." and kept_i == ""
    assert added_f == ("Pleural effusion: reported present by chest-xray-cnn 1.0.0 "
                       "(probability 0.89).",)
    assert added_i == ("Reported present by the AI models: Pleural effusion, "
                       "Pulmonary nodule.",)
    _assert_consistent(RG1_FINDINGS, (" ".join((kept_f, *added_f)), " ".join(added_i)), card)


def test_a_contradicting_model_output_is_not_sent_as_is(
        card: ReportCard, monkeypatch: pytest.MonkeyPatch) -> None:
    def contradicting(*_args: object) -> list[tuple[list[str], list[str]]]:
        return [(tokenize("The heart is enlarged. No pleural effusion."),
                 tokenize("Cardiomegaly."))]

    monkeypatch.setattr(report, "generate", contradicting)
    draft = draft_report(card, MODEL_DIR, RG1_FINDINGS, CHEST_CR)
    assert not draft.consistency.passed
    assert draft.model_findings == "The heart is enlarged. No pleural effusion."
    assert draft.findings_text == "" and draft.impression_text == ""
    assert any(s.startswith("Pleural effusion: reported present") for s in draft.findings_added)
    assert any(s.startswith("Pulmonary nodule: reported present") for s in draft.findings_added)
    _assert_consistent(RG1_FINDINGS, (draft.findings, draft.impression), card)


def test_a_sentence_mixing_two_findings_values_is_removed(card: ReportCard) -> None:
    findings = (_nodule(8.3, 270, "right upper lobe"), _nodule(5.2, 60, "left lower lobe"))
    table = concept_table(card)
    encoded = encode_input(findings, CHEST_CT, table)
    sections = (tokenize("Two pulmonary nodules are identified. A <f1.diam> nodule in the "
                         "<f1.det>. A <f2.diam> nodule in the <f2.det>, volume <f1.vol>."),
                tokenize("Multiple pulmonary nodules, the largest measuring <f1.diam>."))
    draft = finish_draft(sections, encoded, findings, CHEST_CT, table)
    assert [i.kind for i in draft.consistency.issues] == ["slot_mismatch", "undescribed"]
    assert draft.consistency.removed == (
        "A 5.2 mm nodule in the left lower lobe, volume 270 mm3.",)
    assert "5.2 mm" not in draft.findings_text
    assert draft.findings_added == ("Pulmonary nodule: reported present by lung-nodule-unet "
                                    "1.0.0 (probability 0.95, longest diameter 5.2 mm, volume "
                                    "60 mm3, left lower lobe).",)


def test_a_sentence_the_extractor_cannot_read_is_not_sent(card: ReportCard) -> None:
    kept_f, _, _, _, info = check_and_repair(
        "The cardiac contour bulges. A pulmonary nodule is seen. Probable pleural effusion.",
        "Pleural effusion. Pulmonary nodule.", RG1_FINDINGS, concept_table(card))
    assert [(i.kind, i.key) for i in info.issues] == [("unparsed", "cardiomegaly")]
    assert kept_f == "A pulmonary nodule is seen. Probable pleural effusion."


@pytest.mark.parametrize(("sentence", "mentions"), [
    ("No pleural effusion.", [("pleural_effusion", False)]),
    ("There is a right pleural effusion.", [("pleural_effusion", True)]),
    ("The heart size is normal.", [("cardiomegaly", False)]),
    ("The heart is not enlarged.", [("cardiomegaly", False)]),
    ("The heart may be enlarged.", [("cardiomegaly", True)]),
    ("Cardiomegaly without pleural effusion.",
     [("cardiomegaly", True), ("pleural_effusion", False)]),
    ("No cardiomegaly, pleural effusion or pulmonary nodule.",
     [("cardiomegaly", False), ("pleural_effusion", False), ("pulmonary_nodule", False)]),
    ("No pleural effusion, but cardiomegaly is present.",
     [("pleural_effusion", False), ("cardiomegaly", True)]),
    ("Pleural effusion is not seen, a nodule is present.",
     [("pleural_effusion", False), ("pulmonary_nodule", True)]),
    ("A pleural effusion cannot be excluded.", [("pleural_effusion", True)]),
    ("The costophrenic angles are sharp.", [("pleural_effusion", False)]),
    ("The lungs are clear.", [("pulmonary_nodule", False)]),
    ("There is no evidence of intracranial hemorrhage.", [("intracranial_hemorrhage", False)]),
    ("No acute cardiopulmonary abnormality.", [("*", False)]),
    ("No other abnormality.", []),
    ("No pericardial effusion.", []),
    ("No midline shift or mass effect.", []),
])
def test_mention_extractor_handles_negation(sentence: str,
                                            mentions: list[tuple[str, bool]]) -> None:
    assert [(m.key, m.affirmed) for m in find_mentions(sentence, LEXICONS)] == mentions


def test_card_of_another_kind_is_refused() -> None:
    with pytest.raises(ModelError, match="is a classifier, not a report model"):
        draft_report(load_card(CHEST_DIR), CHEST_DIR, RG1_FINDINGS, CHEST_CR)


def test_pipeline_drafts_one_report_sr_in_the_study_without_patient_data_in_the_context(
        card: ReportCard) -> None:
    header = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    context = study_context([header])
    assert set(context) == {"Modality", "BodyPartExamined", "StudyDescription"}
    assert str(header.PatientName) not in context.values()
    output = run_pipeline(card, MODEL_DIR, PipelineInput(
        study_instance_uid=header.StudyInstanceUID, generation=0, route_name="chest",
        sources=(header,), prior_findings=RG1_FINDINGS, timestamp=datetime(2024, 5, 6, 7, 8)))
    (sr,) = output.objects
    assert sr.StudyInstanceUID == header.StudyInstanceUID
    assert sr.SeriesDescription.startswith("AI draft report")
    assert output.findings == ()
    assert output.summary["prior_findings"] == 3 and output.summary["positive_findings"] == 2
