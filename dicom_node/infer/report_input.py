"""The source side of the report drafter: findings and study context → source tokens and slots.

What the drafter knows of a study before the network runs:

* the observations it has lexicons for (``KNOWN_KEYS``, ``CANONICAL``) and how a finding's coded
  concept maps onto one of them (``concept_table``, ``concept_key``); any other concept is
  "other" and named by a slot;
* ``order_items`` merges and orders the findings into source items (``Item``), and
  ``encode_input`` turns them and the study context into the source tokens and the slot values
  (``EncodedInput``): numbers and locations never pass through the network, the decoder writes a
  slot (``<f2.diam>``) that is filled with the exact value from the finding;
* how measurements are read from a finding and written as text (``finding_measures``,
  ``format_mm``, ``format_volume``, ``clean_detail``), shared with the template sentences of
  :mod:`dicom_node.infer.report_check`.

The target side (text ↔ tokens) is :mod:`dicom_node.infer.report_tokens`; the network that maps
one to the other is :mod:`dicom_node.infer.report`. Nothing here needs Keras.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dicom_node.errors import ModelError
from dicom_node.infer.card import ReportCard
from dicom_node.messages import CodedConcept, FindingRecord

# --------------------------------------------------------------------------------------------
# observations the drafter knows, and the source encoding

#: Lexicon keys (the card's output names); any other concept is "other" and named by a slot.
CARDIOMEGALY, EFFUSION, NODULE, HEMORRHAGE = (
    "cardiomegaly", "pleural_effusion", "pulmonary_nodule", "intracranial_hemorrhage")
KNOWN_KEYS = (CARDIOMEGALY, EFFUSION, NODULE, HEMORRHAGE)
#: What a template sentence calls each observation.
CANONICAL = {CARDIOMEGALY: "Cardiomegaly", EFFUSION: "Pleural effusion",
             NODULE: "Pulmonary nodule", HEMORRHAGE: "Intracranial hemorrhage"}
#: Concept meanings that identify an observation when its code is not in the card.
_MEANING_KEYS = ((r"cardiomegaly|enlarged heart|cardiac enlargement", CARDIOMEGALY),
                 (r"pleural effusion|hydrothorax", EFFUSION), (r"nodule", NODULE),
                 (r"intracranial h(a)?emorrhage", HEMORRHAGE))
#: At most this many present nodules are itemised; the others are counted (slot <more>).
MAX_NODULES = 4
#: Slot <count>: how many present nodules, as a word.
COUNTS = {2: "two", 3: "three", 4: "four"}
MAX_OTHERS = 3
#: Words of a Study Description that the source keeps (anything else is dropped).
DESCRIPTION_WORDS = frozenset((
    "chest", "thorax", "lung", "lungs", "head", "brain", "ct", "xr", "cr", "dx", "x", "ray", "pa",
    "ap", "lateral", "contrast", "without", "with", "wo", "w", "low", "dose", "noncontrast", "non",
    "view", "views", "portable", "frontal"))
_DETAIL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ,'()/-]{0,47}$")

ConceptTable = Mapping[tuple[str, str], str]


def concept_table(card: ReportCard) -> dict[tuple[str, str], str]:
    """(scheme, code value) → lexicon key, from the card's outputs and their aliases."""
    table: dict[tuple[str, str], str] = {}
    for output in card.outputs:
        if output.name not in KNOWN_KEYS:
            raise ModelError(f"model {card.name}: output {output.name!r} has no lexicon in "
                             f"dicom_node.infer.report_check (known: {', '.join(KNOWN_KEYS)})")
        for code in (output.code, *output.aliases):
            table[(code.scheme, code.value)] = output.name
    return table


def concept_key(concept: CodedConcept, table: ConceptTable) -> str:
    """The lexicon key of a finding's concept, or ``other:<scheme>:<value>``."""
    key = table.get((concept.scheme, concept.value))
    if key is not None:
        return key
    for pattern, meaning_key in _MEANING_KEYS:
        if re.search(pattern, concept.meaning.lower()):
            return meaning_key
    return f"other:{concept.scheme}:{concept.value}"


@dataclass(frozen=True)
class Item:
    """One finding block of the source: what the model sees of one (merged) finding."""

    key: str
    present: bool
    record: FindingRecord
    diameter_mm: float | None = None
    volume_mm3: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class EncodedInput:
    tokens: tuple[str, ...]
    #: Slot token → the text it stands for, e.g. "<f2.diam>" → "8.3 mm".
    slots: dict[str, str]
    items: tuple[Item, ...]
    #: Present nodules beyond MAX_NODULES (counted in slot <more>, not itemised).
    extra: tuple[Item, ...] = ()

    @property
    def extra_nodules(self) -> int:
        return len(self.extra)


def finding_measures(record: FindingRecord) -> tuple[float | None, float | None]:
    """(longest diameter in mm, volume in mm³) of a finding, from its UCUM-coded measurements."""
    diameter: float | None = None
    volume: float | None = None
    lengths = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
    volumes = {"mm3": 1.0, "uL": 1.0, "ul": 1.0, "cm3": 1000.0, "mL": 1000.0, "ml": 1000.0}
    for m in record.measurements:
        name, unit, value = m.name.meaning.lower(), m.unit.value, float(m.value)
        if not np.isfinite(value) or value < 0:
            continue
        if "volume" in name and unit in volumes:
            volume = value * volumes[unit]
        elif re.search(r"diameter|axis|length|size", name) and unit in lengths:
            diameter = max(diameter or 0.0, value * lengths[unit])
    return diameter, volume


def _prob_token(item: Item) -> str:
    p = item.record.probability
    if not item.present:
        return "p_neg"
    if p is None:
        return "p_na"
    return "p_hi" if p >= 0.9 else "p_mid" if p >= 0.7 else "p_lo"


def _diameter_token(mm: float) -> str:
    for limit, token in ((6, "d_lt6"), (10, "d_6_10"), (20, "d_10_20"), (30, "d_20_30")):
        if mm < limit:
            return token
    return "d_ge30"


def format_mm(mm: float) -> str:
    return f"{mm:.1f} mm" if mm < 10 else f"{mm:.0f} mm"


def format_volume(key: str, mm3: float) -> str:
    if key == HEMORRHAGE:
        ml = mm3 / 1000.0
        return f"{ml:.1f} mL" if ml < 10 else f"{ml:.0f} mL"
    return f"{mm3:.0f} mm3"


def clean_detail(detail: str) -> str:
    text = " ".join(detail.split())
    return text if _DETAIL_RE.match(text) and text.isascii() else ""


def _name_slot(meaning: str) -> str:
    first = meaning.split(" ", 1)[0]
    return meaning if first.isupper() or not meaning else meaning[0].lower() + meaning[1:]


def order_items(findings: Sequence[FindingRecord], table: ConceptTable
                ) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
    """Merge and order findings into source items; return them and the nodules beyond
    MAX_NODULES.

    Order: cardiomegaly, effusion, nodules (present ones by diameter then probability,
    descending), hemorrhage, then other concepts by code. One item per concept, except present
    nodules (one each, at most MAX_NODULES); a concept reported both present and absent is
    present.
    """
    by_key: dict[str, list[FindingRecord]] = {}
    for record in findings:
        by_key.setdefault(concept_key(record.concept, table), []).append(record)
    items: list[Item] = []
    extra: list[Item] = []
    others = sorted(k for k in by_key if k not in KNOWN_KEYS)[:MAX_OTHERS]
    for key in (CARDIOMEGALY, EFFUSION, NODULE, HEMORRHAGE, *others):
        records = by_key.get(key, [])
        present = [r for r in records if r.present]
        if not records:
            continue
        if not present:
            items.append(Item(key, False, records[0]))
            continue
        measured = []
        for record in present:
            diameter, volume = finding_measures(record)
            measured.append(Item(key, True, record, diameter, volume,
                                 clean_detail(record.detail)))
        measured.sort(key=lambda i: (-(i.diameter_mm or 0.0), -(i.record.probability or 0.0)))
        if key == NODULE:
            items += measured[:MAX_NODULES]
            extra = measured[MAX_NODULES:]
        else:
            items.append(measured[0])
    return tuple(items), tuple(extra)


def _context_tokens(context: Mapping[str, str]) -> list[str]:
    modality = context.get("Modality", "").strip().upper()
    tokens = [f"mod_{modality.lower()}" if modality in ("CR", "DX", "CT") else "mod_other"]
    body = context.get("BodyPartExamined", "").strip().upper()
    tokens.append("body_none" if not body else "body_chest" if body in ("CHEST", "THORAX", "LUNG")
                  else "body_head" if body in ("HEAD", "BRAIN", "SKULL") else "body_other")
    words = re.findall(r"[a-z]+", context.get("StudyDescription", "").lower())
    tokens += [f"desc_{w}" for w in words if w in DESCRIPTION_WORDS][:8]
    return tokens


def encode_input(findings: Sequence[FindingRecord], context: Mapping[str, str],
                 table: ConceptTable) -> EncodedInput:
    """The source tokens and slot values for ``findings`` of a study with ``context``."""
    items, extra = order_items(findings, table)
    tokens = _context_tokens(context)
    nodules = sum(1 for i in items if i.key == NODULE and i.present)
    if nodules:
        tokens.append("n_nod_many" if extra else f"n_nod_{nodules}")
    slots: dict[str, str] = {}
    if extra:
        slots["<more>"] = str(len(extra))
    if nodules + len(extra) > 1:
        slots["<count>"] = COUNTS.get(nodules + len(extra), "multiple")
    for k, item in enumerate(items, start=1):
        kind = item.key if item.key in KNOWN_KEYS else "other"
        tokens += [f"<f{k}>", f"c_{kind}", "present" if item.present else "absent",
                   _prob_token(item)]
        if kind == "other":
            slots[f"<f{k}.name>"] = _name_slot(item.record.concept.meaning)
        if item.diameter_mm is not None:
            tokens.append(_diameter_token(item.diameter_mm))
            slots[f"<f{k}.diam>"] = format_mm(item.diameter_mm)
        if item.volume_mm3 is not None:
            tokens.append("vol")
            slots[f"<f{k}.vol>"] = format_volume(item.key, item.volume_mm3)
        if item.detail:
            tokens.append("det")
            slots[f"<f{k}.det>"] = item.detail
    return EncodedInput(tuple(tokens), slots, items, extra)
