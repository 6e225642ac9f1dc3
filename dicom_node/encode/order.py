"""Put the matched worklist order on a result object.

- Every result gets the order's Accession Number (General Study module), so the PACS and the RIS
  file it under the order even when the modality sent no accession.
- An SR gets the **Referenced Request Sequence** (0040,A370) of the SR Document General module
  (PS3.3 C.17.2; Type 1C: "required if the document satisfies one or more requests").
- A SEG or an image gets the **Request Attributes Sequence** (0040,0275) of the General Series
  module (PS3.3 Table 10-9), the images' equivalent: the Referenced Request Sequence is not part
  of those IODs.

Applied by the job runner to every object a pipeline returns, before it is written; the result
UIDs do not depend on the order.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.worklist.order import Order

#: Modality of the SR IODs (they carry the SR Document General module).
_SR = "SR"


def _request_attributes(order: Order, study_uid: str) -> Dataset:
    """One Request Attributes Sequence item (PS3.3 Table 10-9)."""
    item = Dataset()
    if order.requested_procedure_id:
        item.RequestedProcedureID = order.requested_procedure_id
    if order.accession_number:
        item.AccessionNumber = order.accession_number
    item.StudyInstanceUID = order.study_instance_uid or study_uid
    if order.requested_procedure_description:
        item.RequestedProcedureDescription = order.requested_procedure_description
    if order.requested_procedure_codes:
        item.RequestedProcedureCodeSequence = Sequence(
            [code.item() for code in order.requested_procedure_codes[:1]])
    if order.scheduled_procedure_step_id:
        item.ScheduledProcedureStepID = order.scheduled_procedure_step_id
    if order.scheduled_procedure_step_description:
        item.ScheduledProcedureStepDescription = order.scheduled_procedure_step_description
    if order.scheduled_protocol_codes:
        item.ScheduledProtocolCodeSequence = Sequence(
            [code.item() for code in order.scheduled_protocol_codes])
    return item


def apply_order(dataset: Dataset, order: Order, study_uid: str) -> None:
    """Write the order's accession and request reference into a result object (in place)."""
    if order.accession_number:
        dataset.AccessionNumber = order.accession_number
    if str(dataset.get("Modality", "")) == _SR:
        dataset.ReferencedRequestSequence = Sequence([order.referenced_request(study_uid)])
    else:
        dataset.RequestAttributesSequence = Sequence([_request_attributes(order, study_uid)])
