"""The checks of the report drafter: a draft is sent only when it agrees with the findings.

* Slot check (on tokens, ``slot_check``): a sentence that mixes two findings' values, names a
  value no finding has, gives a value in the wrong role (a diameter as a volume) or repeats an
  earlier sentence is removed; an itemised finding whose values no sentence gives is
  "undescribed".
* Consistency check (on text, ``check``, ``check_and_repair``): a mention extractor (a
  ``Lexicon`` per observation, NegEx-style negation with pre-cues, post-cues, scope ends and
  pseudo-negations: ``find_mentions``) reads every sentence. A sentence that negates a positive
  finding, asserts a finding the models reported absent, speaks about an observation no model
  reported, or uses an observation's words in a way the extractor cannot read is removed; a
  positive finding that is then not affirmed, and an undescribed finding, gets a deterministic
  template sentence (``template_sentence``), marked as added by the check. The repaired text is
  checked again; a draft that still fails raises ModelError instead of being sent.
* A finding is positive when any model reported it present; absent when the models that
  reported it all said absent (a disagreement counts as positive: a draft must not drop it).

``finish_draft`` runs both on the decoded tokens of :func:`dicom_node.infer.report.generate` and
returns the ``ReportDraft`` that :mod:`dicom_node.encode.report_sr` encodes. The concepts and
slot values come from :mod:`dicom_node.infer.report_input`, the text from
:mod:`dicom_node.infer.report_tokens`. Nothing here needs Keras.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicom_node.errors import ModelError
from dicom_node.infer.report_input import (
    CANONICAL,
    CARDIOMEGALY,
    EFFUSION,
    HEMORRHAGE,
    KNOWN_KEYS,
    NODULE,
    ConceptTable,
    EncodedInput,
    Item,
    clean_detail,
    concept_key,
    finding_measures,
    format_mm,
    format_volume,
)
from dicom_node.infer.report_tokens import Sections, detokenize, render
from dicom_node.messages import FindingRecord

# --------------------------------------------------------------------------------------------
# the consistency check: which observations a text affirms or negates

@dataclass(frozen=True)
class Lexicon:
    """How a text speaks of one observation.

    ``terms`` affirm it unless a negation cue governs them ("no pleural effusion"); ``normal``
    phrases deny it outright ("the heart size is normal").
    """

    terms: tuple[str, ...]
    normal: tuple[str, ...] = ()


_HEART = r"(?:heart|cardiac (?:silhouette|shadow|size)|heart size)"
LEXICONS: dict[str, Lexicon] = {
    CARDIOMEGALY: Lexicon(
        terms=(r"cardiomegaly", r"cardiac enlargement", r"cardiomegalic",
               r"enlarged (?:heart|cardiac (?:silhouette|shadow))",
               r"enlargement of the (?:heart|cardiac (?:silhouette|shadow))",
               _HEART + r"\b[^.;]{0,30}?\b(?:is|are|be|appears?|remains?|looks?)\s+(?:\w+\s+)?"
               r"(?:enlarged|increased)",
               r"(?:increased|enlarged) (?:heart size|cardiothoracic ratio)",
               r"cardiothoracic ratio (?:is )?(?:\w+ )?increased"),
        normal=(_HEART + r"\b[^.;]{0,30}?\b(?:normal|within normal limits|unremarkable)",
                r"cardiomediastinal (?:silhouette|contours?) (?:is |are )?(?:normal|within)",
                r"normal (?:heart size|cardiac size|cardiac silhouette|sized heart|heart)")),
    EFFUSION: Lexicon(
        terms=(r"(?<!pericardial )(?:pleural )?effusions?", r"pleural fluid",
               r"hydrothorax", r"blunt(?:ing|ed) (?:of )?(?:the )?(?:\w+ )?costophrenic",
               r"costophrenic angles? (?:is |are )?blunted"),
        normal=(r"costophrenic angles? (?:is |are )?(?:sharp|clear|preserved|normal)",
                r"(?:sharp|clear) costophrenic", r"pleural spaces? (?:is |are )?clear")),
    NODULE: Lexicon(
        terms=(r"nodul(?:e|es|ar)", r"(?:pulmonary|lung) mass(?:es)?"),
        normal=(r"lungs? (?:fields? )?(?:is |are )?clear", r"clear lungs?")),
    HEMORRHAGE: Lexicon(
        terms=(r"ha?emorrhag\w*", r"ha?ematomas?", r"bleed(?:s|ing)?", r"blood products?")),
}
#: Whole-study normal statements: they deny every observation.
_GLOBAL_NORMAL = re.compile(
    r"\bno (?!other\b)(?:\w+[ -]){0,3}(?:abnormalit(?:y|ies)|findings?)\b"
    r"|\b(?:normal|unremarkable|negative) (?:study|examination|exam|radiograph|chest radiograph"
    r"|head ct|ct)\b|\bnegative for (?:the )?(?:\w+ )?findings\b")
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|free of|absence of|absent|neither|nor|rule[sd]? out)\b")
_POST_NEGATION = re.compile(
    r"\b(?:(?:is|are|was|were)\s+)?(?:not\s+(?:seen|identified|present|evident|demonstrated|"
    r"appreciated|visualized|detected|noted)|absent|excluded|resolved)\b")
#: Hedges that contain a negation word but affirm a possibility.
_PSEUDO_NEGATION = re.compile(
    r"\b(?:cannot|can not|could not|not) be (?:excluded|ruled out)\b|\bnot excluded\b"
    r"|\bno (?:change|interval change)\b|\bnot only\b")
#: Words that end a negation's scope (the following words are a new clause).
_SCOPE_END = re.compile(
    r"[;:]|\b(?:but|however|although|though|whereas|while|yet|except|there (?:is|are))\b"
    r"|\b(?:is|are) (?:present|seen|noted|identified|demonstrated)\b")


@dataclass(frozen=True)
class Mention:
    """One observation spoken of in one sentence: affirmed (also when hedged) or negated."""

    key: str
    affirmed: bool


def lexicon_for(key: str, meaning: str = "") -> Lexicon:
    """The lexicon of a key; an "other" concept is found by its meaning."""
    if key in LEXICONS:
        return LEXICONS[key]
    return Lexicon(terms=(re.escape(meaning.lower()) + r"s?",) if meaning else ())


def find_mentions(sentence: str, lexicons: Mapping[str, Lexicon]) -> list[Mention]:
    """The observations ``sentence`` speaks of, with their polarity (NegEx-style).

    A term is negated when a pre-negation cue stands between the last scope end before it and
    the term's end, or when a post-negation phrase follows it before the next term or scope end.
    ``*`` is a whole-study normal statement ("no acute abnormality").
    """
    text = sentence.lower()
    text = _PSEUDO_NEGATION.sub(lambda m: "~" * len(m.group(0)), text)
    ends = [m.end() for m in _SCOPE_END.finditer(text)]
    post_spans = [(m.start(), m.end()) for m in _POST_NEGATION.finditer(text)]
    posts = [start for start, _ in post_spans]
    # A cue inside a post-negation phrase ("is not seen") governs the term before it only.
    cues = [(m.start(), m.end()) for m in _PRE_NEGATION.finditer(text)
            if not any(a <= m.start() < b for a, b in post_spans)]
    ends += [b for _, b in post_spans]
    hits: list[tuple[int, int, str, bool]] = []  # start, end, key, normal
    for key, lexicon in lexicons.items():
        for patterns, normal in ((lexicon.terms, False), (lexicon.normal, True)):
            for pattern in patterns:
                hits += [(m.start(), m.end(), key, normal)
                         for m in re.finditer(r"\b" + pattern + r"\b", text)]
    hits.sort()
    mentions = []
    for index, (start, end, key, normal) in enumerate(hits):
        if normal:
            mentions.append(Mention(key, affirmed=False))
            continue
        scope = max([e for e in ends if e <= start], default=0)
        negated = any(scope <= c_start and c_end <= end for c_start, c_end in cues)
        following = [h[0] for h in hits[index + 1:] if h[0] >= end] + [
            e for e in ends if e > end] + [len(text)]
        negated = negated or any(end <= p < min(following) for p in posts)
        mentions.append(Mention(key, affirmed=not negated))
    if _GLOBAL_NORMAL.search(text):
        mentions.append(Mention("*", affirmed=False))
    return mentions


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@dataclass(frozen=True)
class Issue:
    """One inconsistency of a text with the findings.

    kind: "missing" (a positive finding not affirmed), "contradicted" (a positive finding
    negated), "asserted_absent" (a finding reported absent is affirmed), "unsupported" (an
    observation no model reported is spoken of), "slot_mismatch" (a sentence mixes the values
    of two findings, names values no finding has, or gives a value in the wrong role, e.g. a
    diameter as a volume), "unparsed" (a sentence uses an observation's words in a way the
    extractor does not understand, so it cannot be checked), "undescribed" (a finding with values
    that no sentence gives), "repeated" (a sentence written twice in a section).
    """

    kind: str
    key: str
    #: The observation's name for people ("Pleural effusion").
    name: str
    sentence: str = ""


@dataclass(frozen=True)
class Expectations:
    """What the findings say, per observation key."""

    positive: dict[str, tuple[FindingRecord, ...]]
    absent: dict[str, tuple[FindingRecord, ...]]
    lexicons: dict[str, Lexicon]
    names: dict[str, str]


def expectations(findings: Sequence[FindingRecord], table: ConceptTable) -> Expectations:
    positive: dict[str, list[FindingRecord]] = {}
    absent: dict[str, list[FindingRecord]] = {}
    lexicons = dict(LEXICONS)
    names = dict(CANONICAL)
    for record in findings:
        key = concept_key(record.concept, table)
        (positive if record.present else absent).setdefault(key, []).append(record)
        lexicons.setdefault(key, lexicon_for(key, record.concept.meaning))
        names.setdefault(key, record.concept.meaning)
    return Expectations({k: tuple(v) for k, v in positive.items()},
                        {k: tuple(v) for k, v in absent.items() if k not in positive}, lexicons,
                        names)


#: Words that show a sentence speaks of an observation: such a sentence must be one the
#: extractor understands (a safety net for phrasings the lexicons miss).
_KEYWORDS = {
    CARDIOMEGALY: re.compile(r"\bheart\b|\bcardi(?!opulmonary)"),
    EFFUSION: re.compile(r"effusion|costophrenic|hydrothorax"),
    NODULE: re.compile(r"nodul|\bmass(?!\s+effect)"),
    HEMORRHAGE: re.compile(r"ha?emorrhag|bleed|ha?ematoma|\bblood\b"),
}


def sentence_issues(sentence: str, expected: Expectations) -> list[Issue]:
    """What is wrong with one sentence (empty when it agrees with the findings)."""
    issues = []
    mentions = find_mentions(sentence, expected.lexicons)
    masked = sentence.lower()
    for key, name in expected.names.items():  # names of other observations are not keywords
        if key not in KNOWN_KEYS:
            masked = masked.replace(name.lower(), " ")
    spoken = {m.key for m in mentions}
    for key, keyword in _KEYWORDS.items():
        if keyword.search(masked) and key not in spoken and "*" not in spoken:
            issues.append(Issue("unparsed", key, expected.names[key], sentence))
    for mention in mentions:
        name = expected.names.get(mention.key, "all observations")
        if mention.key == "*":
            issues += [Issue("contradicted", k, expected.names[k], sentence)
                       for k in expected.positive]
        elif mention.key in expected.positive:
            if not mention.affirmed:
                issues.append(Issue("contradicted", mention.key, name, sentence))
        elif mention.key in expected.absent:
            if mention.affirmed:
                issues.append(Issue("asserted_absent", mention.key, name, sentence))
        else:
            issues.append(Issue("unsupported", mention.key, name, sentence))
    return issues


def check(texts: Sequence[str], expected: Expectations) -> list[Issue]:
    """Every inconsistency of the report ``texts`` (its sections) with the findings."""
    issues: list[Issue] = []
    affirmed: set[str] = set()
    for text in texts:
        for sentence in split_sentences(text):
            issues += sentence_issues(sentence, expected)
            affirmed |= {m.key for m in find_mentions(sentence, expected.lexicons) if m.affirmed}
    issues += [Issue("missing", k, expected.names[k]) for k in expected.positive
               if k not in affirmed]
    return issues


def template_sentence(key: str, records: Sequence[FindingRecord]) -> str:
    """The deterministic sentence that states a positive finding as its models reported it."""
    name = CANONICAL.get(key, records[0].concept.meaning)
    parts = []
    for record in records:
        facts = [] if record.probability is None else [f"probability {record.probability:.2f}"]
        diameter, volume = finding_measures(record)
        if diameter is not None:
            facts.append(f"longest diameter {format_mm(diameter)}")
        if volume is not None:
            facts.append(f"volume {format_volume(key, volume)}")
        if clean_detail(record.detail):
            facts.append(clean_detail(record.detail))
        parts.append(f"{record.model} {record.model_version}"
                     + (f" ({', '.join(facts)})" if facts else ""))
    return f"{name}: reported present by {'; '.join(parts)}."


# --------------------------------------------------------------------------------------------
# the slot check: values stay with their finding

_SLOT_INDEX = re.compile(r"^<f(\d+)\.")


def _misplaced(sentence: Sequence[str]) -> bool:
    """A value in the wrong role: a volume not introduced as one, or a diameter that is."""
    for j, token in enumerate(sentence):
        before = sentence[max(j - 3, 0):j]
        if token.endswith(".vol>") and not {"volume", "approximately"} & set(before):
            return True
        if token.endswith(".diam>") and "volume" in before:
            return True
    return False


def _contains(tokens: Sequence[str], sentence: Sequence[str]) -> bool:
    """Whether ``sentence`` (ending with ".") is already one of the sentences in ``tokens``."""
    n = len(sentence)
    starts = [0] + [i + 1 for i, t in enumerate(tokens) if t == "."]
    return any(list(tokens[i:i + n]) == list(sentence) for i in starts)


def slot_check(sections: Sections, encoded: EncodedInput
               ) -> tuple[Sections, list[Issue], list[str], list[Item]]:
    """Values must stay with their finding: a sentence whose slots name two findings (a volume
    of one nodule next to the location of another) is removed, and an itemised present finding
    with values that no kept sentence refers to is reported as not described.

    Returns (kept token sections, issues, removed sentences, items not described).
    """
    issues: list[Issue] = []
    removed: list[str] = []
    kept_sections: list[list[str]] = []
    referenced: set[int] = set()
    for tokens in sections:
        kept: list[str] = []
        sentence: list[str] = []
        for token in [*tokens, "."]:
            sentence.append(token)
            if token != ".":
                continue
            indices = {int(m.group(1)) for t in sentence if (m := _SLOT_INDEX.match(t))}
            words = [t for t in sentence if t != "."]
            unknown = [t for t in words if t.startswith("<") and t not in encoded.slots]
            if len(indices) > 1 or unknown or _misplaced(sentence):
                item = encoded.items[min(indices) - 1] if indices and min(indices) <= len(
                    encoded.items) else encoded.items[0]
                text = detokenize(sentence, encoded.slots)
                issues.append(Issue("slot_mismatch", item.key, CANONICAL.get(
                    item.key, item.record.concept.meaning), text))
                removed.append(text)
            elif words and _contains(kept, sentence):
                issues.append(Issue("repeated", encoded.items[0].key, "a sentence",
                                    detokenize(sentence, encoded.slots)))
                removed.append(issues[-1].sentence)
            elif words:
                referenced |= indices
                kept += sentence
            sentence = []
        kept_sections.append(kept)
    undescribed = [item for k, item in enumerate(encoded.items, start=1)
                   if item.present and k not in referenced
                   and any(slot.startswith(f"<f{k}.") for slot in encoded.slots)]
    if encoded.extra and not any("<more>" in tokens for tokens in kept_sections):
        undescribed += encoded.extra
    issues += [Issue("undescribed", i.key, CANONICAL.get(i.key, i.record.concept.meaning))
               for i in undescribed]
    return (kept_sections[0], kept_sections[1]), issues, removed, undescribed


# --------------------------------------------------------------------------------------------
# the checked draft

@dataclass(frozen=True)
class Consistency:
    """What the check found in the model's text and what it changed."""

    #: Issues of the model's own text.
    issues: tuple[Issue, ...]
    removed: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True when the model's text needed no change."""
        return not self.issues


@dataclass(frozen=True)
class ReportDraft:
    """A drafted report: the model's sentences that passed the check, and the sentences the
    check added (kept apart so that the SR can say which is which)."""

    findings_text: str
    impression_text: str
    findings_added: tuple[str, ...]
    impression_added: tuple[str, ...]
    #: The model's text before the check, for audits.
    model_findings: str
    model_impression: str
    consistency: Consistency
    #: The findings it was drafted from, and the study context it used.
    source_findings: tuple[FindingRecord, ...]
    context: dict[str, str]
    #: True when there were no findings to draft from (deterministic text, no model run).
    no_findings: bool = False

    @property
    def findings(self) -> str:
        return " ".join(t for t in (self.findings_text, *self.findings_added) if t)

    @property
    def impression(self) -> str:
        return " ".join(t for t in (self.impression_text, *self.impression_added) if t)


def check_and_repair(findings_text: str, impression_text: str,
                     findings: Sequence[FindingRecord], table: ConceptTable, *,
                     undescribed: Sequence[Item] = ()
                     ) -> tuple[str, str, tuple[str, ...], tuple[str, ...], Consistency]:
    """Remove inconsistent sentences, add template sentences for what is then missing.

    ``undescribed`` are findings whose values the text does not give (see slot_check); each
    gets a template sentence unless its observation gets one anyway. Returns (findings kept,
    impression kept, findings added, impression added, consistency). Raises ModelError if the
    repaired text still fails the check.
    """
    expected = expectations(findings, table)
    issues = tuple(check((findings_text, impression_text), expected))
    kept: list[str] = []
    removed: list[str] = []
    for text in (findings_text, impression_text):
        good = [s for s in split_sentences(text) if not sentence_issues(s, expected)]
        removed += [s for s in split_sentences(text) if s not in good]
        kept.append(" ".join(good))
    affirmed = {m.key for text in kept for s in split_sentences(text)
                for m in find_mentions(s, expected.lexicons) if m.affirmed}
    added_findings = [template_sentence(k, records) for k, records in expected.positive.items()
                      if k not in affirmed]
    added_findings += [template_sentence(i.key, [i.record]) for i in undescribed
                       if i.key in affirmed]
    added_impression: tuple[str, ...] = ()
    if not kept[1]:
        names = [expected.names[k] for k in expected.positive]
        added_impression = (
            (f"Reported present by the AI models: {', '.join(names)}.",) if names else
            ("No abnormality among the findings assessed by the AI models.",))
    remaining = check((" ".join((kept[0], *added_findings)),
                       " ".join((kept[1], *added_impression))), expected)
    if remaining:
        raise ModelError("the consistency check could not repair the draft: "
                         + "; ".join(f"{i.kind} {i.name}" for i in remaining))
    return kept[0], kept[1], tuple(added_findings), added_impression, Consistency(
        issues, tuple(removed))


def finish_draft(sections: Sections, encoded: EncodedInput, findings: Sequence[FindingRecord],
                 context: Mapping[str, str], table: ConceptTable) -> ReportDraft:
    """The checked draft from decoded token sections: slot check, then the text check."""
    model_findings, model_impression = render(sections, encoded.slots)
    clean, slot_issues, slot_removed, undescribed = slot_check(sections, encoded)
    findings_text, impression_text = render(clean, encoded.slots)
    kept_f, kept_i, added_f, added_i, text_check = check_and_repair(
        findings_text, impression_text, findings, table, undescribed=undescribed)
    consistency = Consistency((*slot_issues, *text_check.issues),
                              (*slot_removed, *text_check.removed))
    return ReportDraft(kept_f, kept_i, added_f, added_i, model_findings, model_impression,
                       consistency, tuple(findings), dict(context))
