"""Builders that encode model results as DICOM objects for the PACS (highdicom).

``build_classification_sr`` makes a TID 1500 Measurement Report (PS3.16) from a classifier's result;
:mod:`dicom_node.encode.common` holds what the SEG and derived-series builders share with it.
"""

from dicom_node.encode.sr import build_classification_sr

__all__ = ["build_classification_sr"]
