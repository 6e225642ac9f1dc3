"""Storage Commitment Push Model (PS3.4 Annex J; IHE RAD-10) for the results the node sends.

For a destination with ``storage_commitment = true``, a worker that has C-STOREd a job's results
records a transaction (``store``), then asks the destination by N-ACTION to commit to them
(``request``). The destination answers later with an N-EVENT-REPORT, normally on a new
association to the node's receiver (``report``: the handler). The outcome changes the job:
every instance committed leaves it done; failures send the results again (a failed attempt);
no report within ``commitment_timeout_minutes`` fails it for the administrator (the receiver's
scheduler runs :func:`store.expire`). Named UIDs and statuses are in ``status``. See
docs/commitment.md.
"""
