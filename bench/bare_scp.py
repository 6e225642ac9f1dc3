"""A bare pynetdicom Storage SCP: the floor under the node's receiver, for the ingest benchmark.

Same pynetdicom set-up as dicom_node/receive/scp.py (all storage SOP classes, data sets streamed to
a temporary file, TCP_NODELAY on accepted sockets) but the handler only renames the file into the
output folder and answers Success: no header parsing, no fsync, no index. The difference between
this target and ``node`` is what the node's own per-instance work costs; the difference between
this and storescp is what pynetdicom costs.

``--poll-seconds S`` shortens pynetdicom's 1 ms polling sleeps (association and DUL reactors) to
S, to measure how much of the per-instance latency is polling (an experiment, not a
recommendation: shorter sleeps burn CPU that the sender needs on a 2-core machine).

    python -m bench.bare_scp PORT OUTPUT_DIR [--ae-title BARE] [--poll-seconds 0.0001]
        [--assoc-poll-seconds S] [--dul-poll-seconds S] [--max-pdu BYTES]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom import association as pynetdicom_association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def _shorten_polling(poll_seconds: float) -> None:
    """Make pynetdicom's association reactor sleep ``poll_seconds`` instead of 1 ms."""
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        real_sleep(min(seconds, poll_seconds))

    pynetdicom_association.time = types.SimpleNamespace(  # type: ignore[attr-defined,assignment]
        sleep=sleep, time=time.time, monotonic=time.monotonic, perf_counter=time.perf_counter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--ae-title", default="BARE")
    parser.add_argument("--poll-seconds", type=float, default=None,
                        help="both reactors' polling sleep (default: pynetdicom's 1 ms)")
    parser.add_argument("--assoc-poll-seconds", type=float, default=None,
                        help="the association reactor's polling sleep only")
    parser.add_argument("--dul-poll-seconds", type=float, default=None,
                        help="the DUL reactor's polling sleep only")
    parser.add_argument("--max-pdu", type=int, default=262_144,
                        help="maximum PDU length advertised (default 262144, as the node)")
    args = parser.parse_args()
    out: Path = args.output_dir.resolve()
    incoming = out / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(incoming)
    _config.STORE_RECV_CHUNKED_DATASET = True
    assoc_poll = args.assoc_poll_seconds or args.poll_seconds
    dul_poll = args.dul_poll_seconds or args.poll_seconds
    if assoc_poll is not None:
        _shorten_polling(assoc_poll)

    def on_open(event: Any) -> None:
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if dul_poll is not None:
            event.assoc.dul._run_loop_delay = dul_poll

    def on_store(event: Any) -> int:
        os.replace(event.dataset_path, out / f"{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    ae = AE(ae_title=args.ae_title)
    ae.maximum_pdu_size = args.max_pdu
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax,
                                     [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", args.port), block=False, evt_handlers=[
        (evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    if server is not None:
        server.shutdown()


if __name__ == "__main__":
    main()
