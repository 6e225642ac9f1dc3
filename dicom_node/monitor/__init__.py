"""The receiver's HTTP endpoint for monitoring: Prometheus metrics, liveness and readiness.

- :mod:`~dicom_node.monitor.counters`: what this receiver process counts as it happens
  (instances stored, C-STORE failures by status, associations accepted and rejected).
- :mod:`~dicom_node.monitor.database`: a small engine of its own with short timeouts, and the
  few cheap queries (``COUNT … GROUP BY``) a scrape or a readiness probe runs.
- :mod:`~dicom_node.monitor.collector`: the custom collector that turns the database, the
  data folder's disk and the worklist poll into gauges at scrape time, so that the numbers are
  right across every process and machine sharing the database.
- :mod:`~dicom_node.monitor.health`: liveness (the SCP's listeners are serving) and readiness
  (listening, and the database answers).
- :mod:`~dicom_node.monitor.server`: the WSGI application (``/metrics``, ``/healthz``,
  ``/readyz``) on the standard library's threaded WSGI server, started and stopped with the
  receiver.

No metric carries patient data or UIDs: labels are bounded sets (a state, a status code, a
configured destination's name).
"""
