"""Helpers of the tests (and of bench/ and the models' train.py): real peers, validators and data
builders, none of them a test module itself. tests/conftest.py stays in tests/, where pytest looks
for it, and keeps the receiver fixtures and small config helpers (``BASIC_CONFIG``,
``write_config``, ``free_port``, ``running_receiver``, ``sample_file``) that many modules import.

- ``peers``: real DICOM peers on loopback (DCMTK tools, ``StoreSCP``, Orthanc, the node as a
  process) and their pytest fixtures (``orthanc_factory``, ``storescp``, ``node_factory`` …).
- ``worklist_peer``: DCMTK's wlmscpfs as the RIS's Modality Worklist SCP, and worklist items as
  dump text and ``.wl`` files.
- ``postgres_peer``: a throwaway PostgreSQL cluster (the ``postgres_server`` fixture) for the
  scale-out path.
- ``tls_certs``: a throwaway CA and the certificates it issues, for the TLS tests and benchmarks.
- ``dicom_tools``: the validators results are checked with, dciodvfy and dsrdump; a missing tool
  is an error, not a skip.
- ``mpps_scu``: a modality's side of MPPS: N-CREATE / N-SET data sets and a pynetdicom SCU.
- ``ct_series``: synthetic chest CT series (the lung-nodule-unet generator) written as DICOM files.
- ``malformed``: encoded data sets with faults, element by element, and a sender that sends them
  unchanged (tests/test_malformed.py, tests/test_fuzz_receive.py, bench/malformed.py).
- ``order_data``: small study and worklist-item builders for the order-awareness tests.
- ``evaluate_runs``: the shared steps of the ``dicom-node evaluate`` tests.
- ``chest_pacs``: the chest-xray-cnn model and route as tests configure them, Orthanc as a PACS
  wired to the node, and an in-process receiver's config routed to the model.
- ``metrics``: the node's Prometheus counters as tests read them, over HTTP or from a receiver.
- ``studies``: copies of a pydicom test image as one new study, and storescu sending files to an
  in-process receiver.
- ``engines``: processes that open one database at the same moment (migrations, PostgreSQL).

A helper that several test modules use belongs here, not in one of them.
"""
