"""Inference: model cards, preprocessing, and the Keras runtime that runs the models.

Importing this package is light (pydantic, numpy, pydicom): TensorFlow and Keras are imported
only when a model is first loaded or devices are described, so the DICOM receiver process can
import it without paying for them.
"""

from __future__ import annotations

from dicom_node.infer.card import ClassifierCard, ModelCard, load_card
from dicom_node.infer.preprocess import preprocess
from dicom_node.infer.runtime import classify, describe_devices

__all__ = [
    "ClassifierCard",
    "ModelCard",
    "classify",
    "describe_devices",
    "load_card",
    "preprocess",
]
