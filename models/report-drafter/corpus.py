"""Synthetic paired data for report-drafter: (findings of other models + study context) → report.

Every case is drawn from one seeded random generator; nothing is downloaded and no patient data
is used. A case has

* a context (Modality, BodyPartExamined, StudyDescription) of one of four scenarios: chest
  radiograph (CR/DX; cardiomegaly, pleural effusion, pulmonary nodule from a classifier), chest
  CT (nodules with longest diameter, volume and lobe from a segmenter; sometimes an effusion
  classifier), head CT (intracranial hemorrhage with location and volume), and any modality with
  observations the drafter has no lexicon for (named by a slot);
* the FindingRecords those models would hand over (present/absent, probability, measurements,
  detail), sometimes with a model missing, as when it failed;
* one or more reference reports, each a findings and an impression section written from many
  radiologist-style phrasings chosen at random. The texts speak only of what the models
  reported, never of observations no model assessed, never with sizes or severities the
  findings do not give. Numbers, locations and unknown names are slots (``<f2.diam>``) that
  dicom_node.infer.report fills from the findings.

The source side is made by dicom_node.infer.report_input.encode_input, the function the node
runs, so training and inference see the same tokens and the same slot numbering.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from dicom_node.infer.report_input import (
    CARDIOMEGALY,
    EFFUSION,
    HEMORRHAGE,
    KNOWN_KEYS,
    NODULE,
    EncodedInput,
    Item,
    encode_input,
)
from dicom_node.messages import CodedConcept, FindingRecord, Measurement

#: The coded observations of the corpus (the card's outputs), lexicon key → code.
CODES = {
    CARDIOMEGALY: CodedConcept("8186001", "SCT", "Cardiomegaly"),
    EFFUSION: CodedConcept("60046008", "SCT", "Pleural effusion"),
    NODULE: CodedConcept("786838002", "SCT", "Pulmonary nodule"),
    HEMORRHAGE: CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
}
#: Codes other models may use for the same observations (the card's aliases).
ALIASES = {NODULE: (CodedConcept("27925004", "SCT", "Nodule"),)}
TABLE = {(c.scheme, c.value): k for k, c in CODES.items()} | {
    (c.scheme, c.value): k for k, codes in ALIASES.items() for c in codes}
#: Observations without a lexicon: the drafter names them through a slot.
OTHERS = [CodedConcept(v, "SCT", m) for v, m in (
    ("36118008", "Pneumothorax"), ("46621007", "Atelectasis"), ("79654002", "Edema"),
    ("87433001", "Pulmonary emphysema"), ("33737001", "Rib fracture"),
    ("230745008", "Hydrocephalus"), ("71388002", "Skull fracture"),
    ("95436008", "Lung consolidation"), ("249686005", "Midline shift of brain"),
    ("233604007", "Pneumonia"))]
DIAMETER = CodedConcept("81827009", "SCT", "Diameter")
LONG_AXIS = CodedConcept("103339001", "SCT", "Long axis")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
MM = CodedConcept("mm", "UCUM", "millimeter")
MM3 = CodedConcept("mm3", "UCUM", "cubic millimeter")
ML = CodedConcept("mL", "UCUM", "milliliter")
LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe",
         "left lower lobe", "lingula")
SIDES = ("right", "left", "bilateral")
BRAIN = ("left frontal", "right frontal", "left parietal", "right parietal", "left temporal",
         "right temporal", "left occipital", "right occipital", "left basal ganglia",
         "right basal ganglia", "cerebellar", "left thalamic", "right thalamic")


@dataclass(frozen=True)
class Case:
    context: dict[str, str]
    findings: tuple[FindingRecord, ...]
    encoded: EncodedInput
    #: (findings text, impression text) with slots, one per reference.
    references: tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------------------------
# findings and contexts


def _record(rng: random.Random, model: str, key_or_concept: str | CodedConcept, present: bool,
            threshold: float = 0.5, measurements: tuple[Measurement, ...] = (),
            detail: str = "", probability: bool = True) -> FindingRecord:
    concept = CODES[key_or_concept] if isinstance(key_or_concept, str) else key_or_concept
    p = rng.uniform(threshold, 1.0) if present else rng.uniform(0.0, threshold)
    if present and rng.random() < 0.5:
        p = rng.uniform(max(threshold, 0.9), 1.0)  # most positives are confident
    return FindingRecord(model=model, model_version="1.0.0", concept=concept, present=present,
                         probability=round(p, 4) if probability else None,
                         measurements=measurements, detail=detail)


def _chest_cr(rng: random.Random) -> tuple[dict[str, str], list[FindingRecord]]:
    context = {"Modality": rng.choice(["CR", "CR", "DX"]),
               "BodyPartExamined": rng.choice(["CHEST", "CHEST", "THORAX", ""]),
               "StudyDescription": rng.choice(["XR CHEST PA", "CHEST PA AND LATERAL",
                                               "CR CHEST 1 VIEW", "CHEST X-RAY", "THORAX PA",
                                               "CHEST AP PORTABLE", ""])}
    thresholds = {CARDIOMEGALY: 0.71, EFFUSION: 0.14, NODULE: 0.38}
    records = []
    for key, threshold in thresholds.items():
        if rng.random() < 0.08:
            continue  # a classifier variant without this output
        present = rng.random() < 0.4
        detail = rng.choice(SIDES) if key == EFFUSION and present and rng.random() < 0.3 else ""
        if key == NODULE and present and rng.random() < 0.2:
            detail = rng.choice(LOBES)
        records.append(_record(rng, "chest-xray-cnn", key, present, threshold, detail=detail))
    if rng.random() < 0.1:
        records.append(_record(rng, "chest-extra-cls", rng.choice(OTHERS[:4] + OTHERS[7:]),
                               rng.random() < 0.5))
    return context, records


def _nodule(rng: random.Random, model: str) -> FindingRecord:
    diameter = rng.choice([rng.uniform(3, 6), rng.uniform(6, 10), rng.uniform(10, 20),
                           rng.uniform(20, 30), rng.uniform(30, 45)])
    measurements = []
    if rng.random() < 0.95:
        measurements.append(Measurement(rng.choice([DIAMETER, LONG_AXIS]), round(diameter, 1), MM))
    if rng.random() < 0.8:
        volume = 3.14159 / 6 * diameter**3 * rng.uniform(0.6, 1.1)
        measurements.append(Measurement(VOLUME, round(volume, 0), MM3))
    detail = rng.choice(LOBES) if rng.random() < 0.8 else ""
    concept = CODES[NODULE] if rng.random() < 0.8 else ALIASES[NODULE][0]
    return _record(rng, model, concept, True, 0.5, tuple(measurements), detail)


def _chest_ct(rng: random.Random) -> tuple[dict[str, str], list[FindingRecord]]:
    context = {"Modality": "CT", "BodyPartExamined": rng.choice(["CHEST", "CHEST", "LUNG", ""]),
               "StudyDescription": rng.choice(["CT CHEST WITHOUT CONTRAST", "CT THORAX",
                                               "LOW DOSE CT CHEST", "CT CHEST W CONTRAST",
                                               "CHEST CT", ""])}
    count = rng.choice([0, 0, 1, 1, 1, 2, 2, 3, 4, 5, 6])
    records = [_nodule(rng, "lung-nodule-unet") for _ in range(count)]
    if not count:
        records.append(_record(rng, "lung-nodule-unet", NODULE, False,
                               probability=rng.random() < 0.5))
    if rng.random() < 0.25:
        present = rng.random() < 0.4
        detail = rng.choice(SIDES) if present and rng.random() < 0.5 else ""
        records.append(_record(rng, "chest-ct-effusion", EFFUSION, present, 0.5, detail=detail))
    if rng.random() < 0.1:
        records.append(_record(rng, "chest-ct-extra", rng.choice(OTHERS[:4] + OTHERS[7:]),
                               rng.random() < 0.5))
    return context, records


def _head_ct(rng: random.Random) -> tuple[dict[str, str], list[FindingRecord]]:
    context = {"Modality": "CT", "BodyPartExamined": rng.choice(["HEAD", "HEAD", "BRAIN", ""]),
               "StudyDescription": rng.choice(["CT HEAD WITHOUT CONTRAST", "CT BRAIN",
                                               "HEAD CT NONCONTRAST", "CT HEAD WO", ""])}
    present = rng.random() < 0.45
    measurements: tuple[Measurement, ...] = ()
    detail = ""
    if present and rng.random() < 0.6:
        measurements = (Measurement(VOLUME, round(rng.choice([rng.uniform(0.5, 10),
                                                              rng.uniform(10, 60)]), 1), ML),)
    if present and rng.random() < 0.7:
        detail = rng.choice(BRAIN)
    records = [_record(rng, "head-ct-ich", HEMORRHAGE, present, 0.5, measurements, detail)]
    if rng.random() < 0.15:
        records.append(_record(rng, "head-ct-extra", rng.choice(OTHERS[5:7] + OTHERS[8:9]),
                               rng.random() < 0.5))
    return context, records


def _other_modality(rng: random.Random) -> tuple[dict[str, str], list[FindingRecord]]:
    context = {"Modality": rng.choice(["MR", "CT", "CR", "US"]),
               "BodyPartExamined": rng.choice(["", "ABDOMEN", "CHEST", "HEAD"]),
               "StudyDescription": rng.choice(["", "RESEARCH", "OTHER STUDY"])}
    concepts = rng.sample(OTHERS, rng.choice([1, 1, 2]))
    return context, [_record(rng, "other-model", c, rng.random() < 0.5) for c in concepts]


SCENARIOS: tuple[tuple[float, Callable[[random.Random], tuple[dict[str, str],
                                                               list[FindingRecord]]]], ...] = (
    (0.42, _chest_cr), (0.30, _chest_ct), (0.22, _head_ct), (0.06, _other_modality))


# --------------------------------------------------------------------------------------------
# phrasings


def _hedge(item: Item) -> str:
    p = item.record.probability
    if p is None or p >= 0.9:
        return "hi"
    return "mid" if p >= 0.7 else "lo"


def _cardio(rng: random.Random, item: Item) -> str:
    if not item.present:
        return rng.choice(["The heart size is normal.", "Normal heart size.", "No cardiomegaly.",
                           "The cardiac silhouette is within normal limits.",
                           "The heart is not enlarged.", "Heart size is within normal limits.",
                           "The cardiac silhouette is normal in size."])
    return rng.choice({
        "hi": ["The heart is enlarged.", "The cardiac silhouette is enlarged.",
               "Cardiomegaly is present.", "There is cardiomegaly.",
               "Enlarged cardiac silhouette, consistent with cardiomegaly.",
               "The heart size is increased."],
        "mid": ["Probable cardiomegaly.", "The cardiac silhouette appears enlarged.",
                "The heart is probably enlarged.", "Findings suggest cardiomegaly."],
        "lo": ["Possible cardiomegaly.", "The heart may be enlarged.",
               "Cardiomegaly cannot be excluded.", "Borderline cardiac enlargement."],
    }[_hedge(item)])


def _effusion(rng: random.Random, item: Item, k: int) -> str:
    if not item.present:
        return rng.choice(["No pleural effusion.", "There is no pleural effusion.",
                           "The costophrenic angles are sharp.", "No pleural effusion is seen.",
                           "The costophrenic angles are clear.",
                           "No evidence of pleural effusion."])
    side = f"<f{k}.det> " if item.detail else ""
    return rng.choice({
        "hi": [f"There is a {side}pleural effusion.", f"A {side}pleural effusion is present.",
               f"{side}pleural effusion is seen.".capitalize() if side
               else "Pleural effusion is seen.",
               f"Blunting of the costophrenic angle consistent with a {side}pleural effusion."],
        "mid": [f"Probable {side}pleural effusion.", f"Likely {side}pleural effusion.",
                f"Findings suggest a {side}pleural effusion."],
        "lo": [f"Possible {side}pleural effusion.", f"A {side}pleural effusion cannot be excluded.",
               f"Questionable {side}pleural effusion."],
    }[_hedge(item)])


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ("a <f1.diam> …" is fixed to "an 8 mm" later)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _nodule_phrase(rng: random.Random, item: Item, k: int) -> str:
    """'8 mm nodule in the right upper lobe (volume 270 mm3)' with the slots it has."""
    size = f"<f{k}.diam> " if item.diameter_mm is not None else ""
    noun = "pulmonary mass" if (item.diameter_mm or 0) >= 30 else rng.choice(
        ["nodule", "pulmonary nodule"])
    if item.diameter_mm is not None and item.diameter_mm < 6 and rng.random() < 0.5:
        noun = "small " + noun
    where = f" in the <f{k}.det>" if item.detail else ""
    return f"{size}{noun}{where}{_volume(rng, item, k)}"


def _volume(rng: random.Random, item: Item, k: int) -> str:
    if item.volume_mm3 is None:
        return ""
    return rng.choice([f" (volume <f{k}.vol>)", f", volume <f{k}.vol>",
                       f" with a volume of <f{k}.vol>"])


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _one_nodule(rng: random.Random, item: Item, k: int) -> str:
    phrase = _nodule_phrase(rng, item, k)
    if item.volume_mm3 is None:
        subject = _cap(_a(phrase))
    else:  # "A 8 mm nodule in the lingula (volume 270 mm3) is seen."
        subject = _cap(_a(phrase.rsplit(" (volume", 1)[0].rsplit(", volume", 1)[0]
                          .rsplit(" with a volume", 1)[0])) + f" (volume <f{k}.vol>)"
    return rng.choice({
        "hi": [f"There is {_a(phrase)}.", f"{subject} is seen.",
               f"{subject} is present.", f"{subject} is identified."],
        "mid": [f"There is probably {_a(phrase)}.", f"Probable {phrase}."],
        "lo": [f"There is possibly {_a(phrase)}.", f"Possible {phrase}.",
               f"{subject} cannot be excluded."],
    }[_hedge(item)])


def _listed_nodule(rng: random.Random, item: Item, k: int, n: int) -> str:
    """One of several nodules: n = 1 for the first (the largest)."""
    size = f"<f{k}.diam>" if item.diameter_mm is not None else ""
    where = f"<f{k}.det>" if item.detail else ""
    volume = _volume(rng, item, k)
    options = [f"Nodule {n}: {_nodule_phrase(rng, item, k)}."]
    if n == 1 and size:
        options.append(f"The largest measures {size}" + (f" in the {where}" if where else "")
                       + f"{volume}.")
    if n > 1:
        options += [f"Another {_nodule_phrase(rng, item, k)}.",
                    f"Also {_a(_nodule_phrase(rng, item, k))}."]
        if size and where:
            phrase = _nodule_phrase(rng, item, k).split(" in the ")[0]
            options.append(f"In the {where}, {_a(phrase)}.")
    return rng.choice(options)


def _nodules(rng: random.Random, items: list[Item], first: int, extra: int) -> list[str]:
    present = [i for i in items if i.present]
    if not present:
        return [rng.choice(["No pulmonary nodules are identified.", "No pulmonary nodule is seen.",
                            "No pulmonary nodules.", "No suspicious pulmonary nodule.",
                            "The lungs are clear without nodules."])]
    if len(present) == 1 and not extra:
        return [_one_nodule(rng, present[0], first)]
    count = "<count>" if rng.random() < 0.8 else "multiple"
    sentences = [rng.choice([f"There are {count} pulmonary nodules.",
                             f"{_cap(count)} pulmonary nodules are identified.",
                             f"{_cap(count)} pulmonary nodules are present."])]
    sentences += [_listed_nodule(rng, item, first + n, n + 1) for n, item in enumerate(present)]
    if extra:
        sentences.append(rng.choice(["<more> additional smaller nodules are also reported.",
                                     "<more> further nodules are reported."]))
    return sentences


def _nodule_impression(rng: random.Random, encoded: EncodedInput, h: str) -> str:
    present = [(k, i) for k, i in enumerate(encoded.items, start=1)
               if i.key == NODULE and i.present]
    k, item = present[0]
    size = f" measuring <f{k}.diam>" if item.diameter_mm is not None else ""
    where = f" in the <f{k}.det>" if item.detail else ""
    if len(present) == 1 and not encoded.extra_nodules:
        return rng.choice([f"{h}pulmonary nodule{where}{size}.",
                           f"{h}solitary pulmonary nodule{where}{size}."])
    count = "<count>" if rng.random() < 0.8 else "multiple"
    return rng.choice([f"Multiple pulmonary nodules, the largest{where}{size}.",
                       f"{_cap(count)} pulmonary nodules, the largest{where}{size}."])


def _hemorrhage(rng: random.Random, item: Item, k: int) -> str:
    if not item.present:
        return rng.choice(["No intracranial hemorrhage.", "There is no intracranial hemorrhage.",
                           "No intracranial hemorrhage is identified.",
                           "There is no evidence of intracranial hemorrhage.",
                           "No acute intracranial hemorrhage is seen."])
    where = rng.choice([f" in the <f{k}.det> region", f" in the <f{k}.det> area"]) \
        if item.detail else ""
    volume = rng.choice([f" with an estimated volume of <f{k}.vol>", f" (volume <f{k}.vol>)",
                         f", approximately <f{k}.vol>"]) if item.volume_mm3 is not None else ""
    return rng.choice({
        "hi": [f"There is intracranial hemorrhage{where}{volume}.",
               f"Intracranial hemorrhage is identified{where}{volume}.",
               f"An intracranial hemorrhage is seen{where}{volume}."],
        "mid": [f"Probable intracranial hemorrhage{where}{volume}.",
                f"Findings suggest intracranial hemorrhage{where}{volume}."],
        "lo": [f"Possible intracranial hemorrhage{where}{volume}.",
               f"Intracranial hemorrhage{where}"
               + (f" (volume <f{k}.vol>)" if item.volume_mm3 is not None else "")
               + " cannot be excluded."],
    }[_hedge(item)])


def _other(rng: random.Random, item: Item, k: int) -> str:
    if not item.present:
        return rng.choice([f"No <f{k}.name>.", f"No evidence of <f{k}.name>.",
                           f"There is no <f{k}.name>."])
    return rng.choice({"hi": [f"<f{k}.name> is present.", f"There is <f{k}.name>.",
                              f"Findings of <f{k}.name>."],
                       "mid": [f"Probable <f{k}.name>.", f"Likely <f{k}.name>."],
                       "lo": [f"Possible <f{k}.name>.", f"<f{k}.name> cannot be excluded."]}[
        _hedge(item)])


def _combined_negatives(rng: random.Random, keys: list[tuple[str, int]]) -> str:
    names = {CARDIOMEGALY: "cardiomegaly", EFFUSION: "pleural effusion",
             NODULE: "pulmonary nodule"}
    words = [names[key] for key, _ in keys]
    listed = ", ".join(words[:-1]) + " or " + words[-1]
    return rng.choice([f"No {listed}.", f"There is no {listed}.", f"No evidence of {listed}."])


def _findings_section(rng: random.Random, encoded: EncodedInput) -> str:
    items = list(encoded.items)
    by_key = {i.key: (k, i) for k, i in reversed(list(enumerate(items, start=1)))}
    sentences: list[str] = []
    negatives = [(key, by_key[key][0]) for key in (CARDIOMEGALY, EFFUSION, NODULE)
                 if key in by_key and not by_key[key][1].present]
    combine = len(negatives) >= 2 and rng.random() < 0.4
    if combine and len(negatives) == len([k for k in by_key if k in (CARDIOMEGALY, EFFUSION,
                                                                      NODULE)]):
        sentences.append(_combined_negatives(rng, negatives))
        done = {key for key, _ in negatives}
    elif combine and all(key in (EFFUSION, NODULE) for key, _ in negatives[-2:]) and len(
            negatives) >= 2:
        sentences.append(_combined_negatives(rng, negatives[-2:]))
        done = {key for key, _ in negatives[-2:]}
    else:
        done = set()
    head_first = [CARDIOMEGALY, EFFUSION, NODULE, HEMORRHAGE]
    if rng.random() < 0.3:
        head_first = [NODULE, EFFUSION, CARDIOMEGALY, HEMORRHAGE]
    for key in head_first:
        if key in done or key not in by_key:
            continue
        k, item = by_key[key]
        if key == CARDIOMEGALY:
            sentences.append(_cardio(rng, item))
        elif key == EFFUSION:
            sentences.append(_effusion(rng, item, k))
        elif key == NODULE:
            sentences += _nodules(rng, [i for i in items if i.key == NODULE], k,
                                  encoded.extra_nodules)
        else:
            sentences.append(_hemorrhage(rng, item, k))
    if done and head_first[0] == NODULE:
        sentences.append(sentences.pop(0))
    for k, item in enumerate(items, start=1):
        if item.key not in KNOWN_KEYS:
            sentences.append(_other(rng, item, k))
    return " ".join(sentences)


def _impression_section(rng: random.Random, encoded: EncodedInput) -> str:
    parts: list[str] = []
    hedges = {"hi": "", "mid": rng.choice(["probable ", "likely "]), "lo": "possible "}
    nodules_done = False
    for k, item in enumerate(encoded.items, start=1):
        if not item.present:
            continue
        h = hedges[_hedge(item)]
        if item.key == HEMORRHAGE:
            where = f" in the <f{k}.det> region" if item.detail else ""
            parts.append(rng.choice([f"{h}intracranial hemorrhage{where}.",
                                     f"{h}intracranial hemorrhage{where}, as described."]))
        elif item.key == NODULE and not nodules_done:
            parts.append(_nodule_impression(rng, encoded, h))
            nodules_done = True
        elif item.key == EFFUSION:
            side = f"<f{k}.det> " if item.detail else ""
            parts.append(f"{h}{side}pleural effusion.")
        elif item.key == CARDIOMEGALY:
            parts.append(rng.choice([f"{h}cardiomegaly.", f"{h}enlarged cardiac silhouette."]))
        elif item.key not in KNOWN_KEYS:
            parts.append(f"{h}<f{k}.name>.")
    if not parts:
        return rng.choice(["No abnormality among the findings assessed by the AI models.",
                           "No acute abnormality identified by the AI models.",
                           "No abnormal findings.",
                           "Normal study with respect to the assessed findings."])
    if rng.random() < 0.3:
        parts.reverse()
    return " ".join(_cap(p) for p in parts)


def make_case(rng: random.Random, references: int = 1) -> Case:
    """One case with ``references`` independently phrased reference reports."""
    draw = rng.random()
    chosen = SCENARIOS[-1][1]
    for weight, scenario in SCENARIOS:
        draw -= weight
        if draw <= 0:
            chosen = scenario
            break
    context, records = chosen(rng)
    rng.shuffle(records)
    encoded = encode_input(records, context, TABLE)
    texts = tuple((_findings_section(rng, encoded), _impression_section(rng, encoded))
                  for _ in range(references))
    return Case(context, tuple(records), encoded, texts)


def make_cases(seed: int, count: int, references: int = 1) -> list[Case]:
    rng = random.Random(seed)
    return [make_case(rng, references) for _ in range(count)]


if __name__ == "__main__":  # print a few cases
    for case in make_cases(1, 8):
        print(" ".join(case.encoded.tokens))
        for findings, impression in case.references:
            print("  FINDINGS:", findings)
            print("  IMPRESSION:", impression)
