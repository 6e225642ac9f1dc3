"""dicom-node: a DICOM node between the PACS and AI models."""

__version__ = "0.1.0"
