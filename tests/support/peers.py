"""Real DICOM peers on loopback for tests and benchmarks: DCMTK, Orthanc, and the node itself.

Every peer is a real program started on ports picked here, with its files in a folder the caller
owns (``tmp_path`` in tests), and stopped (and waited for) when its ``with`` block ends:

- :func:`dcmtk` runs one DCMTK tool (``echoscu``, ``storescu`` …) with ``TCP_NODELAY=1``.
- :class:`StoreSCP` is DCMTK's ``storescp`` writing what it receives to a folder.
- :class:`OrthancServer` is Orthanc as the hospital PACS: own JSON config, REST helpers, and
  optionally the Lua auto-forward of :func:`auto_forward_lua`, DICOM TLS (:class:`OrthancTls`)
  and a worklist served by its Modality Worklists plugin.
- :class:`NodeProcess` is ``python -m dicom_node receive|worker|serve`` with a generated
  config.toml, JSON logs captured to a file, and the ``dicom-node`` CLI bound to that config.

The pytest fixtures at the end (``orthanc_factory``, ``orthanc``, ``storescp``, ``node_factory``)
wrap these; ``tests/conftest.py`` makes them available to every test by importing them
(``from tests.support.peers import node_factory, orthanc, orthanc_factory, storescp``). Not with
``pytest_plugins = ["tests.support.peers"]`` next to another import of this module: pytest then
warns that it cannot rewrite an imported module, and warnings are errors here.

Why ``TCP_NODELAY=1`` everywhere: Debian's dcmtk 3.6.7 and Orthanc 1.10 leave Nagle's algorithm
on unless the environment says otherwise, and every instance then waits ~55 ms for a delayed ACK
(see PEERS.md). Readiness is checked by looking for the listening socket in ``/proc/net/tcp*``
rather than by connecting, so no peer logs a half-open probe association.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

#: Environment for every peer program: Nagle off (see the module docstring).
PEER_ENV: dict[str, str] = {**os.environ, "TCP_NODELAY": "1"}

#: Seconds to wait for a peer to listen, or to exit after SIGTERM (Orthanc takes ~2.5–4.5 s).
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0

_handed_out: set[int] = set()
#: Every peer process started here, so that none outlives the interpreter (see _kill_leftovers).
_started: list[tuple[subprocess.Popen[bytes], bool]] = []


@atexit.register
def _kill_leftovers() -> None:
    """At exit, SIGKILL what a crashed script or test left running (and a serve's children)."""
    for process, own_group in _started:
        if own_group:  # a group we created (start_new_session): its leader's pid names it
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()


def _spawn(argv: Sequence[str], log_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a peer with stdout and stderr appended to ``log_path``; remembered for atexit."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, **kwargs)
    _started.append((process, bool(kwargs.get("start_new_session"))))
    return process


# --------------------------------------------------------------------------------------------
# ports and DCMTK


def free_port() -> int:
    """A TCP port that is free on every interface now and was not handed out before.

    Ports come from 20000–32767, below Linux's ephemeral range, so the outgoing connections of
    other tests cannot take the port between this call and the peer's ``listen``. storescp and
    wlmscpfs listen on all interfaces, so the port is checked on 0.0.0.0.
    """
    for _ in range(200):
        port = random.randint(20000, 32767)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free TCP port found in 20000-32767")


def is_listening(port: int) -> bool:
    """Whether some socket listens on ``port`` (any address), read from /proc without connecting."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as handle:
            next(handle, None)
            for line in handle:
                fields = line.split()
                if len(fields) > 3 and fields[1].endswith(wanted) and fields[3] == "0A":
                    return True
    return False


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def require_program(name: str) -> str:
    """The path of an installed program; a clear error (not a skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; run `scripts/setup.sh test` "
                           "(apt-get install -y dcmtk orthanc dicom3tools)")
    return path


def dcmtk(tool: str, *args: str | os.PathLike[str], timeout: float = 60.0,
          check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with ``TCP_NODELAY=1``; stdout and stderr captured as text."""
    return subprocess.run([require_program(tool), *map(str, args)], env=PEER_ENV,
                          capture_output=True, text=True, errors="replace", timeout=timeout,
                          check=check)


def _terminate(process: subprocess.Popen[Any], sig: int = signal.SIGTERM,
               timeout: float = STOP_TIMEOUT_S) -> int:
    """Send ``sig``, wait for the exit (SIGKILL after ``timeout``); the exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return int(process.returncode)


class _Managed:
    """start() / stop() as a context manager."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> int | None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# storescp


class StoreSCP(_Managed):
    """DCMTK's storescp on a free port, writing every received instance to ``output_dir``.

    One association at a time (no ``--fork``), like the reference receiver in PEERS.md.
    """

    def __init__(self, workdir: Path, *, ae_title: str = "STORESCP", port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir).resolve()
        self.ae_title = ae_title
        self.port = port or free_port()
        self.output_dir = self.workdir / "received"
        self.log_path = self.workdir / "storescp.log"
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.process = _spawn(
            [require_program("storescp"), "-aet", self.ae_title, "-od", str(self.output_dir),
             *self.extra_args, str(self.port)], self.log_path, env=PEER_ENV)
        process = self.process
        wait_until(lambda: is_listening(self.port) or process.poll() is not None,
                   START_TIMEOUT_S, f"storescp to listen on {self.port}")
        if process.poll() is not None:
            raise RuntimeError(f"storescp exited with {process.returncode}: {self.log_text()}")
        return self

    def stop(self) -> int | None:
        return _terminate(self.process) if self.process else None

    def files(self) -> list[Path]:
        """The instances received so far (storescp names them <modality>.<SOP UID>)."""
        if not self.output_dir.exists():
            return []
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --------------------------------------------------------------------------------------------
# Orthanc


def auto_forward_lua(modality_name: str) -> str:
    """A Lua script that forwards every stable study to ``modality_name``, once per study.

    The guard: Orthanc calls OnStableStudy again whenever a stable study gets new instances and
    settles again — exactly what happens when the node sends its SR/SEG results back into the
    same study. A real PACS forwarding rule then re-sends the whole study (results included) to
    the AI node, which would process it again, loop forever. The script keeps a Lua table of the
    Orthanc study IDs it has forwarded (the table lives as long as the Orthanc process; the Lua
    context is shared by all callbacks) and forwards a study only the first time it becomes
    stable. The study is marked before the store is posted, so a failing store is not retried
    by the next stable event either — a PACS operator would resend by hand; the script prints the
    outcome to Orthanc's log.
    """
    if not modality_name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"modality name {modality_name!r}: letters, digits, - and _ only")
    return f"""\
-- Forward each study to the modality '{modality_name}' the first time it becomes stable.
forwardedStudies = forwardedStudies or {{}}

function OnStableStudy(studyId, tags, metadata)
  if forwardedStudies[studyId] then
    print('auto-forward: study ' .. studyId .. ' already forwarded, not sending it again')
    return
  end
  forwardedStudies[studyId] = true
  print('auto-forward: sending study ' .. studyId .. ' to {modality_name}')
  local ok, answer = pcall(RestApiPost, '/modalities/{modality_name}/store', studyId)
  if ok then
    print('auto-forward: study ' .. studyId .. ' sent')
  else
    print('auto-forward: study ' .. studyId .. ' FAILED: ' .. tostring(answer))
  end
end
"""


@dataclass(frozen=True)
class OrthancTls:
    """Orthanc's DICOM TLS (1.9.0+): one certificate and key for its SCP and its SCU, the PEM
    bundle it trusts peers by (``DicomTlsTrustedCertificates``: CA or peer certificates), and
    whether a peer without a certificate is refused (``DicomTlsRemoteCertificateRequired``, like
    DCMTK's ``--require-peer-cert``; false is ``--verify-peer-cert`` in 1.10). With TLS on,
    Orthanc's DICOM port speaks TLS only; its SCU uses TLS towards a modality whose
    ``DicomModalities`` entry says ``"UseDicomTls": true``."""

    certificate: Path
    private_key: Path
    trusted: Path
    remote_certificate_required: bool = True

    def config(self) -> dict[str, Any]:
        return {"DicomTlsEnabled": True, "DicomTlsCertificate": str(self.certificate),
                "DicomTlsPrivateKey": str(self.private_key),
                "DicomTlsTrustedCertificates": str(self.trusted),
                "DicomTlsRemoteCertificateRequired": self.remote_certificate_required}


#: Orthanc's Modality Worklists plugin (Debian package orthanc).
ORTHANC_WORKLISTS_PLUGIN = "/usr/share/orthanc/plugins/libModalityWorklists.so"


class OrthancServer(_Managed):
    """Orthanc (Debian's 1.10) as the PACS, with its own config and storage in ``workdir``.

    ``modalities`` maps a name to ``(AE title, host, port)`` (Orthanc's ``DicomModalities``),
    or to the object form of an entry (``{"AET": …, "Host": …, "Port": …, "UseDicomTls": true}``).
    ``stable_age`` is Orthanc's ``StableAge`` in seconds; ``lua`` the text of a Lua script
    (e.g. :func:`auto_forward_lua`); ``tls`` turns DICOM TLS on (:class:`OrthancTls`);
    ``worklists`` a folder of ``.wl`` files that the Modality Worklists plugin serves to any
    calling AE (Orthanc as the RIS); ``extra`` more config keys. Orthanc runs as the current
    user: as root that works here (checked with Orthanc 1.10.1); no privileges are needed.
    """

    def __init__(self, workdir: Path, *, ae_title: str = "ORTHANC",
                 modalities: Mapping[str, tuple[str, str, int] | Mapping[str, Any]] | None = None,
                 stable_age: int = 60, lua: str | None = None,
                 tls: OrthancTls | None = None, worklists: Path | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.modalities = dict(modalities or {})
        self.stable_age = stable_age
        self.lua = lua
        self.tls = tls
        self.worklists = worklists
        self.extra = dict(extra or {})
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        cfg: dict[str, Any] = {
            "Name": "test-pacs",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "DicomModalities": {name: dict(m) if isinstance(m, Mapping) else list(m)
                                for name, m in self.modalities.items()},
            "StableAge": self.stable_age,
            "SaveJobs": False,
        }
        if self.lua is not None:
            script = self.workdir / "orthanc.lua"
            script.write_text(self.lua, encoding="utf-8")
            cfg["LuaScripts"] = [str(script)]
        if self.tls is not None:
            cfg.update(self.tls.config())
        if self.worklists is not None:
            cfg["Plugins"] = [ORTHANC_WORKLISTS_PLUGIN]
            cfg["Worklists"] = {"Enable": True, "Database": str(self.worklists)}
            cfg["DicomAlwaysAllowFindWorklist"] = True
        cfg.update(self.extra)
        return cfg

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        self.process = _spawn([require_program("Orthanc"), str(self.config_path)],
                              self.log_path, env=PEER_ENV, cwd=self.workdir)
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                return True
            if not is_listening(self.dicom_port):
                return False
            try:
                self.get("/system")
            except (OSError, urllib.error.URLError):
                return False
            return True

        wait_until(ready, START_TIMEOUT_S, f"Orthanc on {self.http_port}/{self.dicom_port}")
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{self.log_text()}")
        return self

    def stop(self, graceful: bool = True) -> int | None:
        """SIGTERM and wait for the exit (~2.5–4.5 s) so its ports are free again; with
        ``graceful=False`` SIGKILL (milliseconds; its storage is then only fit to throw away)."""
        if self.process is None:
            return None
        return _terminate(self.process, signal.SIGTERM if graceful else signal.SIGKILL)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # REST -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float = 60.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            data: bytes = answer.read()
            return data

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        answer = self.request("POST", path, json.dumps(payload).encode())
        return json.loads(answer) if answer.strip() else None

    def studies(self) -> list[str]:
        """Orthanc IDs of every stored study."""
        ids: list[str] = self.get("/studies")
        return ids

    def find(self, level: str, query: Mapping[str, str], expand: bool = True) -> list[Any]:
        """``/tools/find``: e.g. ``find("Series", {"Modality": "SR"})``."""
        found: list[Any] = self.post("/tools/find", {"Level": level, "Query": dict(query),
                                                      "Expand": expand})
        return found

    def study_id(self, study_instance_uid: str) -> str | None:
        """The Orthanc ID of the study with this Study Instance UID, or None."""
        found = self.find("Study", {"StudyInstanceUID": study_instance_uid}, expand=False)
        return str(found[0]) if found else None

    def series_of_study(self, study: str) -> list[dict[str, Any]]:
        """The series of a study (by Orthanc ID or Study Instance UID), expanded."""
        study_id = study if study in self.studies() else self.study_id(study)
        if study_id is None:
            return []
        series: list[dict[str, Any]] = self.get(f"/studies/{study_id}/series")
        return series

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of one instance, as stored."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a DICOM file over REST (no DICOM association; no calling AE)."""
        answer: dict[str, Any] = json.loads(self.request(
            "POST", "/instances", Path(path).read_bytes(), "application/dicom"))
        return answer

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


# --------------------------------------------------------------------------------------------
# the node


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        # A JSON string (ASCII escapes only) is a valid TOML basic string.
        return json.dumps(os.fspath(value))
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def to_toml(document: Mapping[str, Any]) -> str:
    """TOML text for a config: top-level tables of scalars / lists / inline tables, and arrays
    of tables (a list of dicts becomes ``[[name]]`` blocks). Enough for config.toml."""
    lines: list[str] = []
    for name, section in document.items():
        if isinstance(section, Mapping):
            lines.append(f"[{_toml_key(name)}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in section.items()]
            lines.append("")
        elif isinstance(section, list | tuple) and all(isinstance(i, Mapping) for i in section):
            for item in section:
                lines.append(f"[[{_toml_key(name)}]]")
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
                lines.append("")
        else:
            raise TypeError(f"top-level key {name!r} must be a table or a list of tables")
    return "\n".join(lines)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CONSOLE_LINE = re.compile(
    r"^(?P<timestamp>\d{4}-\d\d-\d\d[ T][\d:.]+Z?) +\[(?P<level>\w+) *\] +(?P<event>\S+)"
    r"(?P<rest>.*)$")
_CONSOLE_FIELD = re.compile(r"(\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")


def _console_fields(text: str) -> dict[str, Any]:
    """``key=value`` pairs of a console log line; numbers become ints, quoted text is unquoted."""
    fields: dict[str, Any] = {}
    for key, raw in _CONSOLE_FIELD.findall(text):
        value: Any = raw
        if raw[:1] in "'\"":
            with contextlib.suppress(ValueError, SyntaxError):
                value = ast.literal_eval(raw)
        elif re.fullmatch(r"-?\d+", raw):
            value = int(raw)
        fields[key] = value
    return fields


class NodeProcess(_Managed):
    """``python -m dicom_node ROLE --config WORKDIR/config.toml`` as a separate process.

    ``role`` is ``receive``, ``worker`` or ``serve``. The config is written from the arguments:
    ``[node]`` (port, ae_title, bind 127.0.0.1, data_dir ``var``), ``[completion]``,
    ``[logging] format = "json"``, the lists ``destinations``, ``models`` and ``routes`` (dicts
    as in config.toml), and ``sections``: more keys per table, merged over the defaults (e.g.
    ``{"jobs": {"poll_seconds": 0.2}, "node": {"on_duplicate": "keep"}}``). Paths in the file
    are relative to ``workdir``. stdout and stderr (JSON lines) go to ``workdir/<role>.log``.
    """

    def __init__(self, workdir: Path, role: str = "receive", *, port: int | None = None,
                 ae_title: str = "DICOM_NODE", stable_after_seconds: float = 1.0,
                 sweep_interval_seconds: float = 0.2,
                 destinations: Sequence[Mapping[str, Any]] = (),
                 models: Sequence[Mapping[str, Any]] = (),
                 routes: Sequence[Mapping[str, Any]] = (),
                 sections: Mapping[str, Mapping[str, Any]] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        if role not in ("receive", "worker", "serve"):
            raise ValueError(f"role must be receive, worker or serve, not {role!r}")
        self.workdir = Path(workdir).resolve()
        self.role = role
        self.port = port or free_port()
        self.ae_title = ae_title
        self.config_path = self.workdir / "config.toml"
        self.data_dir = self.workdir / "var"
        self.log_path = self.workdir / f"{role}.log"
        self.env = {**PEER_ENV, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        document: dict[str, Any] = {
            "node": {"ae_title": ae_title, "port": self.port, "bind": "127.0.0.1",
                     "data_dir": "var"},
            "completion": {"stable_after_seconds": stable_after_seconds,
                           "sweep_interval_seconds": sweep_interval_seconds},
            "logging": {"format": "json", "level": "info"},
        }
        for name, values in (sections or {}).items():
            document[name] = {**document.get(name, {}), **values}
        for name, items in (("destinations", destinations), ("models", models),
                            ("routes", routes)):
            if items:
                document[name] = [dict(i) for i in items]
        self.document = document
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    def sibling(self, role: str) -> NodeProcess:
        """Another process (e.g. a ``worker`` next to a ``receive``) on the same config and
        data folder; its log is ``workdir/<role>.log``."""
        twin = NodeProcess(self.workdir, role, port=self.port, ae_title=self.ae_title)
        twin.document = self.document
        twin.env = self.env
        return twin

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = to_toml(self.document)
        # Rewrite only a changed file: a running sibling watches it and would reload.
        if not self.config_path.exists() or self.config_path.read_text("utf-8") != text:
            self.config_path.write_text(text, encoding="utf-8")
        return self.config_path

    def start(self, wait: bool = True) -> Self:
        """Start the process; for receive/serve wait until the receiver listens."""
        self.write_config()
        self.process = _spawn(
            [sys.executable, "-m", "dicom_node", self.role, "--config", str(self.config_path)],
            self.log_path, env=self.env, cwd=self.workdir,
            start_new_session=True)  # its own process group: serve's children included
        if wait and self.role in ("receive", "serve"):
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> None:
        process = self.process
        assert process is not None, "start() first"
        wait_until(lambda: process.poll() is not None or (
            is_listening(self.port) and self.find_logs("receiver_started") != []),
            timeout, f"dicom-node {self.role} to listen on {self.port}")
        if process.poll() is not None:
            raise RuntimeError(f"dicom-node {self.role} exited with {process.returncode}:\n"
                               f"{self.log_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the main process only (SIGKILL by default: a crash), not waiting.
        A killed ``serve`` leaves its children running, as it would in production; ``stop()``
        ends them too."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM and wait for the exit; the exit status. Whatever is left of its process
        group afterwards (children of a killed ``serve``) gets SIGKILL."""
        if self.process is None:
            return None
        code = _terminate(self.process, timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return code

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    # logs -----------------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        """Every log event so far, parsed, in order: JSON lines, and also lines in structlog's
        console format (marked ``"_console": True``; a logger bound before the JSON set-up
        writes those). Other lines (tracebacks, prints) are skipped."""
        events = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
            elif match := _CONSOLE_LINE.match(_ANSI.sub("", line)):
                event: dict[str, Any] = {"timestamp": match["timestamp"],
                                         "level": match["level"], "event": match["event"],
                                         "_console": True}
                event.update(_console_fields(match["rest"]))
                events.append(event)
        return events

    def find_logs(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """Log events named ``event`` whose keys equal ``fields``."""
        return [e for e in self.logs() if e.get("event") == event
                and all(e.get(k) == v for k, v in fields.items())]

    def wait_for_log(self, event: str, timeout: float = 30.0, count: int = 1,
                     **fields: Any) -> dict[str, Any]:
        """Wait until ``count`` events named ``event`` (matching ``fields``) were logged; the
        last one. AssertionError with the log's tail on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find_logs(event, **fields)
            if len(found) >= count:
                return found[-1]
            if time.monotonic() > deadline:
                tail = "\n".join(self.log_text().splitlines()[-30:])
                raise AssertionError(f"no {count}× {event!r} {fields or ''} in {timeout:.0f} s; "
                                     f"log tail:\n{tail}")
            time.sleep(0.05)

    # CLI ------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120.0,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """``dicom-node ARGS --config <this config>`` (``--config`` is put after the
        subcommand); ``check-config`` gets the path as its argument instead."""
        if not self.config_path.exists():
            self.write_config()
        argv = [sys.executable, "-m", "dicom_node", *args]
        if args and args[0] == "check-config":
            argv.append(str(self.config_path))
        else:
            argv[4:4] = ["--config", str(self.config_path)]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True,
                              errors="replace", timeout=timeout, check=check, cwd=self.workdir)

    def studies(self) -> list[dict[str, Any]]:
        """``dicom-node studies --json``, parsed."""
        done = self.cli("studies", "--json", check=True)
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def jobs(self) -> list[dict[str, Any]]:
        """``dicom-node jobs --json``, parsed."""
        done = self.cli("jobs", "--json", check=True)
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows


# --------------------------------------------------------------------------------------------
# pytest fixtures


class _Started:
    """Peers started by a factory fixture; stopped together (SIGTERM all, then wait)."""

    def __init__(self) -> None:
        self.peers: list[_Managed] = []

    def add(self, peer: _Managed) -> _Managed:
        self.peers.append(peer)
        return peer

    def stop_all(self) -> None:
        for peer in self.peers:
            process = getattr(peer, "process", None)
            if isinstance(peer, OrthancServer):
                peer.stop(graceful=False)  # its tmp storage is thrown away: no 3 s shutdown
            elif process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for peer in self.peers:
            peer.stop()


def _fresh_dir(base: Path, name: str) -> Path:
    for i in range(1, 1000):
        path = base / f"{name}-{i}"
        if not path.exists():
            path.mkdir(parents=True)
            return path
    raise RuntimeError(f"too many {name} folders in {base}")


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """``orthanc_factory(modalities=…, stable_age=…, lua=…)`` → a started OrthancServer.

    Teardown kills Orthanc (SIGKILL: its storage goes with tmp_path, and a clean shutdown costs
    ~3.5 s per test); call ``server.stop()`` in the test when the clean shutdown matters."""
    started = _Started()

    def make(**kwargs: Any) -> OrthancServer:
        server = OrthancServer(_fresh_dir(tmp_path, "orthanc"), **kwargs)
        started.add(server)
        return server.start()

    try:
        yield make
    finally:
        started.stop_all()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    """A started Orthanc with no modalities and no Lua script."""
    return orthanc_factory()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A started DCMTK storescp (AE title STORESCP) writing to ``storescp.output_dir``."""
    with StoreSCP(_fresh_dir(tmp_path, "storescp")) as scp:
        yield scp


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """``node_factory(role="receive", start=True, like=None, **NodeProcess kwargs)`` → a
    NodeProcess, started unless ``start=False`` (then call ``.start()`` yourself), stopped at
    teardown. ``like=other`` makes a sibling of ``other`` (same config and data folder), e.g. a
    worker for a receiver."""
    started = _Started()

    def make(role: str = "receive", *, start: bool = True, like: NodeProcess | None = None,
             **kwargs: Any) -> NodeProcess:
        if like is not None:
            node = like.sibling(role)
        else:
            node = NodeProcess(_fresh_dir(tmp_path, f"node-{role}"), role, **kwargs)
        started.add(node)
        return node.start() if start else node

    try:
        yield make
    finally:
        started.stop_all()
