"""Durable storage: the spool of DICOM files and the SQL index of studies, instances and jobs."""
