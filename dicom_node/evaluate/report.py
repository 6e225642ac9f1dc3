"""Evaluate a report model on held-out cases with reference reports (``cases.jsonl``).

``cases.jsonl`` (``models/report-drafter/train.py --export-eval DIR`` writes it): one JSON object
per line, one case each::

    {"case": 0,
     "context": {"Modality": "CT", "BodyPartExamined": "CHEST", "StudyDescription": "CT THORAX"},
     "findings": [{"model": …, "model_version": …, "concept": {…}, "present": true,
                   "probability": 0.93, "measurements": […], "detail": "right upper lobe"}, …],
     "references": [{"findings": "There is a <f1.diam> nodule …", "impression": "…"}, …]}

``findings`` are FindingRecords as :func:`dicom_node.messages.findings_to_json` writes them;
``references`` are reference reports whose numbers and locations are slots (``<f1.diam>``), as
in the training corpus: they are filled from the case's findings, as the drafter fills its own.

Each case goes through the node's own code: :func:`~dicom_node.infer.report_input.encode_input`
with the card's concept table, :func:`~dicom_node.infer.report.generate` (the network loaded
once, cases decoded in batches of :data:`BATCH` as the training script decodes its test split,
so the numbers are the same), then :func:`~dicom_node.infer.report_check.finish_draft`, the slot
and consistency checks of every draft the node sends. It measures, as the card's
``[evaluation]`` does (this module is the one implementation; train.py imports it):

* ``before_check``: the consistency of the model's own text with the findings;
* ``after_check``: the same of the text that is sent (after the check's repairs);
* ``extractor_on_references``: the mention extractor on the first reference of each case;
* ``stress_before_check`` / ``stress_after_check``: each case's findings with the text the model
  wrote for the next case (text that does not fit its findings);
* ``cases_repaired``: the share of cases whose text the check changed;
* corpus BLEU (sacrebleu) and mean ROUGE-L F1 (rouge-score, best reference per case) of the
  model's text before the check, when those packages are installed (the ``eval`` extra).

Comparison with the card, as the other evaluators do: a rate within 3 standard errors
(binomial, the card's value taken as the truth, over the cases or the findings it counts), at
least 0.005; ROUGE-L within 3 standard errors of the mean, at least 0.005; BLEU within 3
bootstrap standard errors (sacrebleu's resampling), at least 0.5 points. With as many cases as
the card's ``samples`` (taken as the card's own set) only the floors apply, and the case and
finding counts must be equal.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dicom_node.errors import DicomNodeError, ModelError
from dicom_node.evaluate.common import Report, header
from dicom_node.evaluate.metrics import TOLERANCE_FLOOR, Z
from dicom_node.evaluate.progress import progress_bar
from dicom_node.infer.card import ModelCard, ReportCard, ReportEvaluation
from dicom_node.infer.report_check import (
    ReportDraft,
    check,
    expectations,
    finish_draft,
    slot_check,
)
from dicom_node.infer.report_input import (
    ConceptTable,
    EncodedInput,
    concept_table,
    encode_input,
)
from dicom_node.infer.report_tokens import Sections, detokenize, render, tokenize
from dicom_node.messages import FindingRecord

CASES_FILE = "cases.jsonl"
#: Cases decoded per call of generate(), from the first case on: the batches of train.py.
BATCH = 200
#: The study context the drafter reads (draft_report keeps these keys only).
CONTEXT_KEYS = ("Modality", "BodyPartExamined", "StudyDescription")
#: The consistency rates of a card's [evaluation.<section>] tables.
RATE_NAMES = ("cases_all_positives_mentioned", "cases_no_absent_asserted",
              "cases_no_unsupported_statement", "cases_values_attributed",
              "positive_findings_mentioned", "absent_findings_not_asserted")
#: The card's [evaluation.<section>] tables of consistency rates, in the order they are shown.
SECTIONS = ("before_check", "after_check", "extractor_on_references", "stress_before_check",
            "stress_after_check")
#: Smallest tolerance of BLEU (0–100): TOLERANCE_FLOOR on BLEU's scale.
BLEU_FLOOR = 100 * TOLERANCE_FLOOR
#: Bootstrap resamples for BLEU's standard error on a subset of the card's cases.
BOOTSTRAP = 1000
NOT_MEASURED = "not measured (install dicom-node[eval])"


# --------------------------------------------------------------------------------------------
# the cases


@dataclass(frozen=True)
class EvalCase:
    """One held-out case: findings, study context, reference reports (with slots)."""

    findings: tuple[FindingRecord, ...]
    context: dict[str, str]
    #: (findings text, impression text) per reference, numbers and locations as slots.
    references: tuple[tuple[str, str], ...]
    #: The source the drafter makes of the findings and context.
    encoded: EncodedInput


class _Reference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    findings: str
    impression: str


class _Case(BaseModel):
    """A line of cases.jsonl, checked."""

    model_config = ConfigDict(extra="forbid")

    case: int | None = None
    context: dict[str, str] = {}
    findings: tuple[FindingRecord, ...] = Field(min_length=1)
    references: tuple[_Reference, ...] = Field(min_length=1)


def case_json(index: int, findings: Sequence[FindingRecord], context: Mapping[str, str],
              references: Sequence[tuple[str, str]]) -> str:
    """One line of cases.jsonl (without the newline)."""
    from dicom_node.messages import findings_to_json

    return json.dumps({"case": index, "context": dict(context),
                       "findings": json.loads(findings_to_json(tuple(findings))),
                       "references": [{"findings": f, "impression": i} for f, i in references]})


def read_cases(path: Path, table: ConceptTable, limit: int | None = None) -> list[EvalCase]:
    """The cases of a cases.jsonl (the first ``limit``); an error names the file and line."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DicomNodeError(f"{path}: cannot read: {exc.strerror}") from None
    cases: list[EvalCase] = []
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if limit is not None and len(cases) >= limit:
                break
            if not line.strip():
                continue
            try:
                raw = _Case.model_validate_json(line)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"])
                raise DicomNodeError(f"{path}:{line_no}: {where + ': ' if where else ''}"
                                     f"{error['msg']}") from None
            context = {k: raw.context.get(k, "") for k in CONTEXT_KEYS}
            cases.append(EvalCase(raw.findings, context,
                                  tuple((r.findings, r.impression) for r in raw.references),
                                  encode_input(raw.findings, context, table)))
    if not cases:
        raise DicomNodeError(f"{path}: no cases")
    return cases


# --------------------------------------------------------------------------------------------
# consistency of one text with its findings, and rates over cases


class CaseConsistency(NamedTuple):
    """How one report text agrees with its case's findings."""

    positives: int
    positives_mentioned: int
    absents: int
    absents_not_asserted: int
    all_positives_mentioned: bool
    no_absent_asserted: bool
    no_unsupported_statement: bool
    values_attributed: bool


def consistency(findings: Sequence[FindingRecord], table: ConceptTable,
                texts: tuple[str, str], values_ok: bool) -> CaseConsistency:
    """Consistency of report ``texts`` (findings, impression) with ``findings``, by the mention
    extractor of the check; ``values_ok``: the slot check found nothing."""
    expected = expectations(findings, table)
    issues = check(texts, expected)
    failed_pos = {i.key for i in issues if i.kind in ("missing", "contradicted")}
    asserted = {i.key for i in issues if i.kind == "asserted_absent"}
    unsupported = any(i.kind == "unsupported" for i in issues)
    return CaseConsistency(len(expected.positive), len(set(expected.positive) - failed_pos),
                           len(expected.absent), len(set(expected.absent) - asserted),
                           not failed_pos, not asserted, not unsupported, values_ok)


def rates(results: Sequence[CaseConsistency]) -> dict[str, float]:
    """The card's consistency rates: per case, and per finding (over the positive or absent
    findings of all cases)."""
    n = len(results)
    positives = sum(r.positives for r in results)
    absents = sum(r.absents for r in results)
    return {
        "cases_all_positives_mentioned": sum(r.all_positives_mentioned for r in results) / n,
        "cases_no_absent_asserted": sum(r.no_absent_asserted for r in results) / n,
        "cases_no_unsupported_statement": sum(r.no_unsupported_statement for r in results) / n,
        "cases_values_attributed": sum(r.values_attributed for r in results) / n,
        "positive_findings_mentioned": sum(r.positives_mentioned for r in results)
        / max(positives, 1),
        "absent_findings_not_asserted": sum(r.absents_not_asserted for r in results)
        / max(absents, 1),
    }


class Checked(NamedTuple):
    """A decoded text measured as the model wrote it and as the node would send it."""

    before: CaseConsistency
    after: CaseConsistency
    #: The checked draft; None when the check could not repair the text (the node sends
    #: nothing then: ``after`` counts the case as failing every check).
    draft: ReportDraft | None

    @property
    def repaired(self) -> bool:
        """Whether the check changed the model's text (or refused it)."""
        return self.draft is None or not self.draft.consistency.passed


def before_and_after(sections: Sections, case: EvalCase, table: ConceptTable) -> Checked:
    """Consistency of decoded ``sections`` with ``case``'s findings before and after the check
    (:func:`~dicom_node.infer.report_check.finish_draft`, what the node sends)."""
    _, slot_issues, _, _ = slot_check(sections, case.encoded)
    before = consistency(case.findings, table, render(sections, case.encoded.slots),
                         not slot_issues)
    try:
        draft = finish_draft(sections, case.encoded, case.findings, case.context, table)
    except ModelError:
        failed = CaseConsistency(before.positives, 0, before.absents, 0, False, False, False,
                                 False)
        return Checked(before, failed, None)
    after = consistency(case.findings, table, (draft.findings, draft.impression), True)
    return Checked(before, after, draft)


def on_reference(case: EvalCase, table: ConceptTable) -> CaseConsistency:
    """The extractor on the case's first reference (whose labels are the findings)."""
    findings, impression = case.references[0]
    sections = (tokenize(findings), tokenize(impression))
    values_ok = not slot_check(sections, case.encoded)[1]
    return consistency(case.findings, table, render(sections, case.encoded.slots), values_ok)


# --------------------------------------------------------------------------------------------
# text similarity (sacrebleu, rouge-score: optional)


@dataclass(frozen=True)
class TextScores:
    #: Corpus BLEU (0–100) over all cases, and sacrebleu's signature of how it was computed.
    bleu: float
    bleu_signature: str
    #: Half-width of sacrebleu's 95 % bootstrap interval of BLEU (None when not resampled).
    bleu_ci95: float | None
    #: Mean ROUGE-L F1 (best reference per case), and its value per case.
    rouge_l: float
    rouge_l_per_case: tuple[float, ...]


def text_libraries() -> tuple[Any, Any] | None:
    """sacrebleu's BLEU class and rouge-score's scorer module, or None when not installed."""
    try:
        bleu = importlib.import_module("sacrebleu.metrics").BLEU
        rouge = importlib.import_module("rouge_score.rouge_scorer")
    except ImportError:
        return None
    return bleu, rouge


def hypothesis_text(texts: tuple[str, str]) -> str:
    """The whole draft (findings + impression), as BLEU and ROUGE-L see it."""
    return f"{texts[0]} {texts[1]}".strip()


def reference_texts(case: EvalCase) -> list[str]:
    """The case's references with their slots filled, as the drafter fills its own."""
    slots = case.encoded.slots
    return [" ".join((detokenize(tokenize(f), slots), detokenize(tokenize(i), slots)))
            for f, i in case.references]


def text_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *,
                bootstrap: int = 0) -> TextScores | None:
    """Corpus BLEU and mean best-reference ROUGE-L F1; None without sacrebleu/rouge-score.

    Every case needs the same number of references. ``bootstrap`` > 1: also sacrebleu's
    bootstrap interval of BLEU (resampled cases, fixed seed).
    """
    libraries = text_libraries()
    if libraries is None:
        return None
    bleu_class, rouge = libraries
    metric = bleu_class()
    streams = [list(r) for r in zip(*references, strict=True)]
    bleu = metric.corpus_score(list(hypotheses), streams)
    ci = None
    if bootstrap > 1:  # a second metric, so that the signature is the card's (no "bs:")
        resampled = bleu_class().corpus_score(list(hypotheses), streams, n_bootstrap=bootstrap)
        ci = getattr(resampled, "_ci", None)  # set by sacrebleu's Score.estimate_ci()
    scorer = rouge.RougeScorer(["rougeL"])
    per_case = tuple(max(scorer.score(r, h)["rougeL"].fmeasure for r in refs)
                     for h, refs in zip(hypotheses, references, strict=True))
    return TextScores(float(bleu.score), str(metric.get_signature()),
                      float(ci) if ci is not None and ci >= 0 else None,
                      float(np.mean(per_case)), per_case)


# --------------------------------------------------------------------------------------------
# measuring: decode every case, check, score


@dataclass(frozen=True)
class Measured:
    """Everything measured on a list of cases."""

    cases: tuple[EvalCase, ...]
    #: Decoded token sections per case, and the model's text (before the check).
    outputs: tuple[Sections, ...]
    texts: tuple[tuple[str, str], ...]
    checked: tuple[Checked, ...]
    references: tuple[CaseConsistency, ...]
    stress: tuple[Checked, ...]
    #: None when sacrebleu / rouge-score are not installed, or the cases have different
    #: numbers of references.
    text: TextScores | None
    decode_seconds: float

    @property
    def before(self) -> list[CaseConsistency]:
        return [c.before for c in self.checked]

    @property
    def after(self) -> list[CaseConsistency]:
        return [c.after for c in self.checked]

    @property
    def repaired(self) -> int:
        return sum(c.repaired for c in self.checked)

    @property
    def unrepairable(self) -> int:
        return sum(c.draft is None for c in self.checked)

    @property
    def positives(self) -> int:
        return sum(c.before.positives for c in self.checked)

    @property
    def absents(self) -> int:
        return sum(c.before.absents for c in self.checked)

    def sections(self) -> dict[str, dict[str, float]]:
        """The rates of each of the card's [evaluation.<section>] tables."""
        return {"before_check": rates(self.before), "after_check": rates(self.after),
                "extractor_on_references": rates(self.references),
                "stress_before_check": rates([c.before for c in self.stress]),
                "stress_after_check": rates([c.after for c in self.stress])}


def decode(network: Any, card: ReportCard, cases: Sequence[EvalCase],
           advance: Callable[[], None] = lambda: None) -> list[Sections]:
    """Greedy decoding of every case, :data:`BATCH` cases per call (train.py's batches)."""
    from dicom_node.infer.report import generate

    outputs: list[Sections] = []
    for start in range(0, len(cases), BATCH):
        batch = cases[start:start + BATCH]
        try:
            outputs += generate(network, [c.encoded for c in batch],
                                card.input.max_target_tokens, card.input.max_source_tokens)
        except ModelError as exc:
            raise ModelError(f"cases {start}–{start + len(batch) - 1}: {exc}") from exc
        for _ in batch:
            advance()
    return outputs


def measure(card: ReportCard, model_dir: Path, cases: Sequence[EvalCase], *,
            advance: Callable[[], None] = lambda: None, bootstrap: int = 0) -> Measured:
    """Decode ``cases`` with the card's network (loaded once) and measure everything the card's
    ``[evaluation]`` holds. ``advance`` is called once per case decoded."""
    from dicom_node.infer.report import load_network

    table = concept_table(card)
    network = load_network(card, model_dir)
    started = time.perf_counter()
    outputs = decode(network, card, cases, advance)
    decode_s = time.perf_counter() - started
    texts = [render(sections, c.encoded.slots) for c, sections in zip(cases, outputs, strict=True)]
    checked = [before_and_after(sections, case, table)
               for case, sections in zip(cases, outputs, strict=True)]
    stress = [before_and_after(outputs[(n + 1) % len(outputs)], case, table)
              for n, case in enumerate(cases)]
    on_refs = [on_reference(case, table) for case in cases]
    scores = None
    if len({len(c.references) for c in cases}) == 1:
        scores = text_scores([hypothesis_text(t) for t in texts],
                             [reference_texts(c) for c in cases], bootstrap=bootstrap)
    return Measured(tuple(cases), tuple(outputs), tuple(texts), tuple(checked), tuple(on_refs),
                    tuple(stress), scores, decode_s)


# --------------------------------------------------------------------------------------------
# comparing with the card


def rate_tolerance(expected: float, n: int, same_set: bool) -> float:
    """3 binomial standard errors of a rate over ``n`` if its true value were ``expected``,
    at least TOLERANCE_FLOOR; on the card's own set just the floor."""
    if same_set:
        return TOLERANCE_FLOOR
    e = min(max(expected, 0.0), 1.0)
    se = math.sqrt(e * (1 - e) / n) if n > 0 else math.inf
    return max(Z * se, TOLERANCE_FLOOR)


class _Table:
    """Rows of the printed table, and whether every compared value agrees."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.agrees = True

    def compare(self, section: str, metric: str, value: float, ref: float | None, tol: float,
                digits: int = 4) -> dict[str, Any]:
        if ref is None:
            self.rows.append([section, metric, f"{value:.{digits}f}", "-", "-", "-", ""])
            return {}
        diff = value - ref
        shown = diff if abs(diff) >= 0.5 * 10.0 ** -digits else 0.0  # no "-0.0000"
        ok = bool(math.isfinite(value) and abs(diff) <= tol)
        self.agrees &= ok
        self.rows.append([section, metric, f"{value:.{digits}f}", f"{ref:.{digits}f}",
                          f"{shown:+.{digits}f}", f"±{tol:.{digits}f}", "ok" if ok else "DIFFERS"])
        return {"card": ref, "difference": diff, "tolerance": tol, "agrees": ok}

    def count(self, section: str, metric: str, value: int, ref: int) -> dict[str, Any]:
        ok = value == ref
        self.agrees &= ok
        self.rows.append([section, metric, str(value), str(ref), f"{value - ref:+d}", "0",
                          "ok" if ok else "DIFFERS"])
        return {"card": ref, "agrees": ok}

    def lines(self) -> list[str]:
        columns = ["section", "metric", "measured", "card", "difference", "tolerance", ""]
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(columns)]
        out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
               .rstrip()]
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                for r in self.rows]
        return out


def evaluate_report(card: ModelCard, model_dir: Path, data: Path, out: Path | None, *,
                    limit: int | None, progress: bool) -> Report:
    if not isinstance(card, ReportCard):
        raise ModelError(f"model {card.name} is a {card.kind}, not a report model")
    cases = read_cases(data / CASES_FILE, concept_table(card), limit)
    expected = card.evaluation
    same_set = expected is not None and expected.samples == len(cases)
    bootstrap = BOOTSTRAP if expected is not None and not same_set else 0
    with progress_bar(f"{card.name}: drafting", len(cases), progress) as advance:
        measured = measure(card, model_dir, cases, advance=advance, bootstrap=bootstrap)
    n = len(cases)
    positives, absents = measured.positives, measured.absents
    table = _Table()
    sections: dict[str, Any] = {}
    #: what a rate counts: cases, or positive or absent findings
    n_counted = {"positive_findings_mentioned": positives, "absent_findings_not_asserted": absents}
    for name, values in measured.sections().items():
        card_rates = getattr(expected, name, None) if expected is not None else None
        entry: dict[str, Any] = {"measured": values}
        for metric, value in values.items():
            ref = float(getattr(card_rates, metric)) if card_rates is not None else None
            tol = (rate_tolerance(ref, n_counted.get(metric, n), same_set)
                   if ref is not None else math.nan)
            compared = table.compare(name, metric, value, ref, tol)
            if compared:
                for key in ("card", "difference", "tolerance"):
                    entry.setdefault(key, {})[metric] = compared[key]
        if card_rates is not None:
            entry["agrees"] = all(abs(entry["difference"][m]) <= entry["tolerance"][m]
                                  for m in values)
        sections[name] = entry
    repaired = measured.repaired / n
    ref_repaired = expected.cases_repaired if expected is not None else None
    repaired_entry = {"measured": repaired, **table.compare(
        "evaluation", "cases_repaired", repaired, ref_repaired,
        rate_tolerance(ref_repaired, n, same_set) if ref_repaired is not None else math.nan)}
    counts: dict[str, Any] = {}
    if expected is not None and same_set:
        counts = {"samples": table.count("evaluation", "samples", n, expected.samples),
                  "positive_findings": table.count("evaluation", "positive_findings", positives,
                                                   expected.positive_findings),
                  "absent_findings": table.count("evaluation", "absent_findings", absents,
                                                 expected.absent_findings)}
    text, text_note = _text_entry(measured, expected, same_set, table)
    lines = header(card, data, n, [])
    lines.append("")
    lines += table.lines()
    lines.append("")
    if text_note:
        lines.append(text_note)
    lines.append(f"decoded {n} case(s) in {measured.decode_seconds:.1f} s; the check changed "
                 f"{measured.repaired} draft(s)"
                 + (f", could not repair {measured.unrepairable}" if measured.unrepairable
                    else ""))
    if expected is not None:
        lines.append("every metric agrees with the card within its tolerance" if table.agrees
                     else "SOME METRICS DIFFER from the card by more than their tolerance")
    written: list[Path] = []
    if out is not None:
        written.append(_write_drafts(out / "drafts.jsonl", measured))
    metrics = {"model": card.name, "version": card.version, "kind": card.kind,
               "data": str(data), "cases": n, "skipped": [],
               "card_samples": expected.samples if expected is not None else None,
               "positive_findings": positives, "absent_findings": absents,
               "counts": counts, "cases_repaired": repaired_entry,
               "cases_unrepairable": measured.unrepairable, "sections": sections, "text": text,
               "decode_seconds": measured.decode_seconds, "agrees": table.agrees}
    return Report("\n".join(lines), table.agrees, metrics, tuple(written))


def _text_entry(measured: Measured, expected: ReportEvaluation | None, same_set: bool,
                table: _Table) -> tuple[dict[str, Any], str]:
    """metrics.json's "text" and a line for the report (empty when nothing to say)."""
    refs_per_case = sorted({len(c.references) for c in measured.cases})
    card_text = expected.text if expected is not None else None
    scores = measured.text
    if scores is None:
        reason = (NOT_MEASURED if text_libraries() is None else
                  f"not measured (the cases have {'/'.join(map(str, refs_per_case))} references "
                  "each; BLEU needs the same number in every case)")
        for metric in ("bleu", "rouge_l"):
            table.rows.append(["text", metric, reason, "-", "-", "-", ""])
        return {"measured": False, "reason": reason}, f"BLEU and ROUGE-L: {reason}"
    entry: dict[str, Any] = {"measured": True, "bleu": scores.bleu,
                             "bleu_signature": scores.bleu_signature, "rouge_l": scores.rouge_l,
                             "references_per_case": refs_per_case[0]}
    if card_text is not None and card_text.references_per_case != refs_per_case[0]:
        note = (f"BLEU and ROUGE-L not compared: the card's are on {card_text.references_per_case}"
                f" references per case, these cases have {refs_per_case[0]}")
        card_text = None
    else:
        note = ""
    n = len(measured.cases)
    if same_set:
        bleu_tol, rouge_tol = BLEU_FLOOR, TOLERANCE_FLOOR
    else:
        # sacrebleu's 95 % half-width is 1.96 standard errors
        se_bleu = scores.bleu_ci95 / 1.96 if scores.bleu_ci95 is not None else math.inf
        bleu_tol = max(Z * se_bleu, BLEU_FLOOR)
        se_rouge = (float(np.std(scores.rouge_l_per_case, ddof=1)) / math.sqrt(n) if n > 1
                    else math.inf)
        rouge_tol = max(Z * se_rouge, TOLERANCE_FLOOR)
    bleu = table.compare("text", "bleu", scores.bleu,
                         card_text.bleu if card_text is not None else None, bleu_tol, digits=2)
    rouge = table.compare("text", "rouge_l", scores.rouge_l,
                          card_text.rouge_l if card_text is not None else None, rouge_tol)
    if card_text is not None:
        entry.update({"card": {"bleu": card_text.bleu, "rouge_l": card_text.rouge_l},
                      "tolerance": {"bleu": bleu["tolerance"], "rouge_l": rouge["tolerance"]},
                      "agrees": bleu["agrees"] and rouge["agrees"]})
    return entry, note


def _write_drafts(path: Path, measured: Measured) -> Path:
    """Per case: the model's text, the text the node would send, and what the check found."""
    with path.open("w", encoding="utf-8") as handle:
        for index, (texts, result) in enumerate(zip(measured.texts, measured.checked,
                                                    strict=True)):
            draft = result.draft
            row: dict[str, Any] = {
                "case": index, "model_findings": texts[0], "model_impression": texts[1],
                "sent_findings": draft.findings if draft else None,
                "sent_impression": draft.impression if draft else None,
                "repaired": result.repaired,
                "issues": [f"{i.kind}: {i.name}" for i in draft.consistency.issues]
                if draft else ["the check could not repair the draft"],
                "before_check": result.before._asdict(), "after_check": result.after._asdict()}
            handle.write(json.dumps(row) + "\n")
    return path
