"""What every result builder (SR, SEG, derived series) shares.

* Source checks: the results of one job belong to one study (PS3.3 C.7.2.1 General Study
  Module), and every instance a result references must be one of the sources, because its SOP
  Class comes from there.
* Copies of source headers without pixel data, with the Type 2 Patient/Study attributes present,
  so that highdicom can copy the Patient and General Study modules from them (PS3.3 C.7.1.1,
  C.7.2.1).
* Labelling as AI-generated: Series Description (0008,103E, LO ≤ 64 characters, PS3.3 C.7.3.1)
  and a notice text; both say so when the model was trained on synthetic data.
* Deterministic details: UIDs derived from the result's UIDs, the creation and contribution
  date/times set from the job's timestamp instead of the wall clock, so that a re-run encodes the
  same object.
* Specific Character Set (0008,0005, PS3.3 C.12.1.1.2): the source's, unless text that the node
  adds needs more than ASCII, then UTF-8 ("ISO_IR 192").
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from copy import deepcopy
from datetime import datetime
from functools import cache
from importlib import metadata
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, DT, TM

from dicom_node.errors import EncodeError
from dicom_node.messages import ModelIdentity, ResultUIDs

#: Maximum length of an LO value such as Series Description (PS3.5 Table 6.2-1).
LO_MAX = 64
#: Specific Character Set for text that is not plain ASCII (PS3.3 C.12.1.1.2).
UTF8 = "ISO_IR 192"

#: Namespace of the derived UIDs made here (uuid5 of a fixed name, like dicom_node.uids).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-node:derived-uids")
#: Type 2 attributes of the Patient and General Study modules, read by highdicom from one source.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_IDENTIFYING = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: Pixel Data and everything after it are never needed to reference an instance.
_PIXEL_DATA_TAG = 0x7FE00010


def select_sources(
    sources: Sequence[Dataset], referenced_sop_instance_uids: Sequence[str]
) -> tuple[Dataset, ...]:
    """Check that the sources form one study; return header copies of the referenced ones, in order.

    Raises EncodeError when there are no sources, a source lacks one of its identifying UIDs, the
    sources span more than one study, the result references no instance, or it references an
    instance that is not among the sources.
    """
    if not sources:
        raise EncodeError(
            "no source instances given: a result must reference the images it is about"
        )
    by_uid: dict[str, Dataset] = {}
    studies: set[str] = set()
    for index, source in enumerate(sources):
        missing = [keyword for keyword in _IDENTIFYING if not source.get(keyword)]
        if missing:
            raise EncodeError(f"source #{index} has no {', '.join(missing)}")
        studies.add(str(source.StudyInstanceUID))
        by_uid.setdefault(str(source.SOPInstanceUID), source)
    if len(studies) > 1:
        raise EncodeError(
            "sources belong to more than one study (Study Instance UIDs "
            f"{', '.join(sorted(studies))}); a result belongs to exactly one study"
        )
    if not referenced_sop_instance_uids:
        raise EncodeError("the result names no source SOP Instance UIDs to reference")
    unknown = [uid for uid in referenced_sop_instance_uids if uid not in by_uid]
    if unknown:
        raise EncodeError(
            "the result references SOP instances that are not among the sources: "
            + ", ".join(unknown)
        )
    referenced = list(dict.fromkeys(referenced_sop_instance_uids))
    # highdicom copies the Patient/Study modules from the first header by *adding its element
    # objects* to the new object: that one is a deep copy, so that setting an attribute of the
    # result later (the order's Accession Number …) never reaches the caller's source. The others
    # are only read (UIDs, geometry) and share their elements: copying them cost more than the
    # rest of an SR (64 CT headers: 0.19 s of 0.3 s).
    return tuple(header_copy(by_uid[uid], share=index > 0) for index, uid in enumerate(referenced))


def header_copy(source: Dataset, *, share: bool = False) -> Dataset:
    """A copy of ``source`` up to Pixel Data (excluded), with the Type 2 Patient/Study attributes.

    The caller's dataset is left as it is. Missing Type 2 attributes are added empty, as PS3.5
    §7.4.3 allows for an unknown value. With ``share`` the copy holds the source's element objects
    themselves (a new container, no new elements): for a header that is only read, never copied
    from into a result.
    """
    if share:  # one dict comprehension: no per-element Dataset bookkeeping
        header = Dataset({tag: element for tag, element in source.items()
                          if tag < _PIXEL_DATA_TAG})
    else:
        header = Dataset()
        for element in source.elements():
            if element.tag >= _PIXEL_DATA_TAG:
                break
            # an element not parsed yet is an immutable tuple of its bytes: shared, not copied
            raw = isinstance(element, RawDataElement)
            header[element.tag] = element if raw else deepcopy(element)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def series_description(model: ModelIdentity, kind: str = "result") -> str:
    """Series Description that says the series is AI-generated, e.g. ``AI result: chest-cls 1.2``.

    When the model was trained on synthetic data the description says so. The model name is
    shortened (never the AI label, the version or the synthetic-data note) to fit the 64
    characters of LO.
    """
    prefix = f"AI {kind}: "
    suffix = f" {model.version}" + (
        " (synthetic training data)" if model.synthetic_training_data else ""
    )
    room = LO_MAX - _width(prefix) - _width(suffix)
    name = model.name if _width(model.name) <= room else _cut(model.name, max(room - 3, 0)) + "..."
    return _cut(prefix + name + suffix, LO_MAX)


def local_coding_schemes(designators: Iterable[str]) -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification Sequence items for private schemes ("99…", PS3.16 §8).

    PS3.3 C.12.1 requires the sequence when a coding scheme designator not listed in PS3.16 Table
    8-1 is used; private designators begin with "99".
    """
    private = sorted({d for d in designators if d.startswith("99")})
    return [CodingSchemeIdentificationItem(designator=d) for d in private]


def fit_lo(text: str) -> str:
    """``text`` cut to the 64 characters of an LO value (Manufacturer, Software Versions …).

    Only for attributes whose full value is also written elsewhere (the content tree keeps the
    model's full name, version and manufacturer as TEXT).
    """
    return text if _width(text) <= LO_MAX else _cut(text, LO_MAX - 3) + "..."


def _width(text: str) -> int:
    """Length as validators count it: bytes of the UTF-8 encoding (what ISO_IR 192 writes), which
    is never less than the character count the standard states, so both readings are met."""
    return len(text.encode("utf-8"))


def _cut(text: str, limit: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding has at most ``limit`` bytes."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def ai_notice(model: ModelIdentity, route_name: str) -> str:
    """A statement for people that the object is AI-generated and unreviewed (content text)."""
    parts = [
        f"AI-generated result of the model {model.name} version {model.version} "
        f"({model.manufacturer}), produced by dicom-node for the route {route_name!r}. "
        "It has not been reviewed by a physician."
    ]
    if model.synthetic_training_data:
        parts.append(
            "CAUTION: this model was trained on synthetic data, not on patient images; "
            "its output is for evaluation and must not be used for diagnosis."
        )
    if model.intended_use:
        parts.append(f"Intended use: {model.intended_use}")
    return " ".join(parts)


def derived_uid(base_uid: str, *parts: str) -> str:
    """A UID derived from ``base_uid`` and ``parts``: same arguments, same UID (PS3.5 B.2)."""
    name = "\x00".join((base_uid, *parts))
    return "2.25." + str(uuid.uuid5(_NAMESPACE, name).int)


def device_uid(model: ModelIdentity) -> str:
    """Device Observer UID (TID 1004) of a model: one per model name and version."""
    return derived_uid("device", model.manufacturer, model.name, model.version)


def character_set(
    texts: Iterable[str], source_character_set: str | Sequence[str] | None
) -> str | Sequence[str] | None:
    """Specific Character Set for an object that adds ``texts`` to attributes copied from a source.

    The source's value is kept while the added text is ASCII (every character set dicom-node may
    meet contains ASCII); otherwise UTF-8, which can also hold the copied patient attributes.
    """
    if all(text.isascii() for text in texts):
        return source_character_set
    return UTF8


@cache
def node_version() -> str:
    """dicom-node's version as installed, for Software Versions (0018,1020)."""
    try:
        return metadata.version("dicom-node")
    except metadata.PackageNotFoundError:
        return "unknown"


def node_equipment(timestamp: datetime) -> hd.ContributingEquipment:
    """Contributing Equipment item (PS3.3 C.12.1, Processing Equipment) that names dicom-node."""
    return hd.ContributingEquipment(
        manufacturer="dicom-node",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name="dicom-node",
        software_versions=node_version(),
        contribution_datetime=timestamp,
        contribution_description="Routed the study to an AI model and encoded its result",
    )


def pin_creation_time(dataset: Dataset, timestamp: datetime) -> None:
    """Replace the wall-clock date/times highdicom writes with ``timestamp``.

    highdicom sets Instance Creation Date/Time (PS3.3 C.12.1) and the Contribution DateTime of its
    own Contributing Equipment item from the clock; a re-run of the same job must encode the same
    bytes.
    """
    dataset.InstanceCreationDate = DA(timestamp.date())
    dataset.InstanceCreationTime = TM(timestamp.time())
    processing = codes.DCM.ProcessingEquipment.value
    for item in dataset.get("ContributingEquipmentSequence", []):
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == processing:
            item.ContributionDateTime = DT(timestamp)


def observation_context(model: ModelIdentity) -> hd.sr.ObservationContext:
    """TID 1001 with a Device observer (TID 1002, TID 1004) that names the model and its version."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(model),
                name=f"{model.name} {model.version}",
                manufacturer_name=model.manufacturer,
                model_name=model.name,
            ),
        )
    )


def state_deidentification(dataset: Dataset) -> None:
    """A source marked Patient Identity Removed = YES without saying how makes the copied Patient
    module incomplete (PS3.3 C.7.1.1: De-identification Method is Type 1C when it is YES)."""
    removed = str(dataset.get("PatientIdentityRemoved", "")).upper() == "YES"
    if removed and not dataset.get("DeidentificationMethod") \
            and not dataset.get("DeidentificationMethodCodeSequence"):
        dataset.DeidentificationMethod = "Not stated by the source instance"


def finish_result(dataset: Dataset, timestamp: datetime) -> None:
    """Last step of every builder: creation times from the job, Patient module complete."""
    pin_creation_time(dataset, timestamp)
    state_deidentification(dataset)


def enhanced_sr(
    evidence: Sequence[Dataset],
    content: Any,
    model: ModelIdentity,
    uids: ResultUIDs,
    *,
    description: str,
    timestamp: datetime,
    complete: bool,
    added_text: Iterable[str],
    schemes: Iterable[str] = (),
    what: str = "SR",
) -> Dataset:
    """An Enhanced SR document of one of the node's results (PS3.3 A.35.2): the SR Document
    General module as every result SR writes it — UNVERIFIED, PRELIMINARY, the model as
    manufacturer and software version, "dicom-node <version>" among the Software Versions (the
    receiver recognises its own results by it), the job's timestamp everywhere."""
    try:
        document = hd.sr.EnhancedSR(
            evidence=list(evidence),
            content=content,
            series_instance_uid=uids.series_instance_uid,
            series_number=uids.series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=1,
            manufacturer=fit_lo(model.manufacturer),
            manufacturer_model_name=fit_lo(model.name),
            software_versions=[fit_lo(model.version), fit_lo(f"dicom-node {node_version()}")],
            series_description=description,
            is_complete=complete,
            is_final=False,
            is_verified=False,
            content_date=timestamp.date(),
            content_time=timestamp.time(),
            series_date=timestamp.date(),
            series_time=timestamp.time(),
            contributing_equipment=[node_equipment(timestamp)],
            coding_schemes=local_coding_schemes(schemes) or None,
            specific_character_set=character_set(
                list(added_text), evidence[0].get("SpecificCharacterSet")),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EncodeError(
            f"highdicom refused the {what} for model {model.name} {model.version}: {exc}"
        ) from exc
    finish_result(document, timestamp)
    result: Dataset = document
    return result
