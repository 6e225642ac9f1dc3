"""The DICOM receiver: a pynetdicom AE answering C-ECHO and C-STORE."""
