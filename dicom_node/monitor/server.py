"""The receiver's HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``.

A WSGI application served by the standard library's ``wsgiref`` server with a thread per
request, in threads of its own: a scrape never runs on a thread of the SCP, and the SCP never
waits for one. ``/metrics`` is prometheus_client's WSGI application over a registry of this
receiver's counters, the scrape-time gauges (:mod:`~dicom_node.monitor.collector`) and the
process' own metrics (CPU, memory, open files). The probes answer JSON, 200 or 503.

If the port cannot be bound, the receiver runs on without the endpoint (``http_failed``): a
monitoring port must never keep the SCP from receiving.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app

from dicom_node.config import Config, HttpSection
from dicom_node.log import get_logger
from dicom_node.monitor.collector import NodeCollector
from dicom_node.monitor.database import MonitorDatabase
from dicom_node.monitor.health import Health, liveness, readiness
from dicom_node.receive.scp import Receiver
from dicom_node.worklist.refresh import WorklistPoller

log = get_logger()

#: A client that has not sent its whole request within this long is disconnected.
REQUEST_TIMEOUT_SECONDS = 10.0
#: HTTP connections served at once; one more is closed as soon as it is accepted, so that a
#: client opening connections in a loop cannot make the receiver start threads without end.
MAX_CONNECTIONS = 16

PATHS = ("/metrics", "/healthz", "/readyz")


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        """No line per request: Prometheus and the probes ask every few seconds."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed before it costs a thread
            return
        try:
            super().process_request(request, client_address)  # starts the request's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the address up in DNS (getfqdn), which can hang on a
        # network with a broken resolver; the name is only WSGI's SERVER_NAME.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that timed out or hung up; the base class prints a traceback to stderr
        log.debug("http_request_failed", peer=str(client_address[0]), exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _json(start_response: StartResponse, status: HTTPStatus, body: object,
          headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(f"{status.value} {status.phrase}", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"), *headers])
    return [data]


def _probe(start_response: StartResponse, probe: Callable[[], Health], name: str) -> list[bytes]:
    try:
        health = probe()
    except Exception as exc:  # a probe answers; a bug must not look like a dead process
        log.exception("http_probe_failed", probe=name)
        return _json(start_response, HTTPStatus.SERVICE_UNAVAILABLE,
                     {"status": "fail", "reasons": [f"unexpected: {exc!r}"], "checks": {}})
    status = HTTPStatus.OK if health.ok else HTTPStatus.SERVICE_UNAVAILABLE
    return _json(start_response, status, health.body())


def make_app(registry: CollectorRegistry, live: Callable[[], Health],
             ready: Callable[[], Health]) -> WSGIApplication:
    """The WSGI application: metrics from ``registry``, and the two probes."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "GET":
            return _json(start_response, HTTPStatus.METHOD_NOT_ALLOWED,
                         {"error": "only GET"}, [("Allow", "GET")])
        if path == "/metrics":
            result: Iterable[bytes] = metrics(environ, start_response)
            return result
        if path == "/healthz":
            return _probe(start_response, live, "healthz")
        if path == "/readyz":
            return _probe(start_response, ready, "readyz")
        return _json(start_response, HTTPStatus.NOT_FOUND,
                     {"error": "not found", "paths": list(PATHS)})

    return app


class MonitorServer:
    """The ``[http]`` endpoint of a receiver process; ``start`` and ``stop`` around the SCP's
    life. ``worklist`` is the receiver scheduler's poller (its last success is a gauge)."""

    def __init__(self, section: HttpSection, receiver: Receiver,
                 worklist: WorklistPoller | None = None) -> None:
        self.section = section
        self.receiver = receiver
        self.database = MonitorDatabase(receiver.context.config.database.url)
        self.registry = CollectorRegistry()
        self.registry.register(receiver.context.counters)
        self.registry.register(NodeCollector(self._config, self.database, worklist))
        ProcessCollector(registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _config(self) -> Config:
        return self.receiver.context.config  # swapped by the receiver on each reload

    def live(self) -> Health:
        return liveness(self.receiver, self._config())

    def ready(self) -> Health:
        return readiness(self.receiver, self._config(), self.database)

    def start(self) -> bool:
        """Listen and serve in a thread; False (logged) when the address cannot be bound."""
        bind, port = self.section.bind, self.section.port
        app = make_app(self.registry, self.live, self.ready)
        server_class = _Server6 if ":" in bind else _Server
        try:
            server = make_server(bind, port, app, server_class=server_class,
                                 handler_class=_Handler)
        except OSError as exc:
            log.error("http_failed", bind=bind, port=port, reason=str(exc),
                      action="the receiver goes on without /metrics, /healthz and /readyz")
            return False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True,
                                        name=f"http-{server.server_port}")
        self._thread.start()
        log.info("http_started", bind=bind, port=server.server_port, paths=list(PATHS))
        return True

    @property
    def port(self) -> int:
        """The port it listens on (0: not listening)."""
        return self._server.server_port if self._server is not None else 0

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None and thread is not None:
            server.shutdown()
            server.server_close()
            thread.join()
            log.info("http_stopped")
        self.database.close()


def warn_if_restart_needed(running: HttpSection | None, new: HttpSection | None) -> None:
    """A reload cannot move the endpoint: say so (``restart_required``) when [http] changed."""
    if running != new:
        log.warning("restart_required", reason="the [http] section (bind, port, or whether it "
                    "is there) changed; the metrics and health endpoint keeps its current "
                    "address until the receiver is restarted")
