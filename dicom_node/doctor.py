"""``dicom-node doctor``: is this machine ready to run the node and its models?

Each check gives ``ok``, ``warn`` (works, but look) or ``FAIL`` (something the node needs is
broken; the command exits 1). Nothing is created or changed: the database is opened read-only
in spirit (``SELECT 1`` and a look at its tables), the data folder is probed with a temporary file
that is removed at once.

=================  =====================================================================
check              FAIL when
=================  =====================================================================
python, packages   Python < 3.11, or a required package is missing
keras backend      Keras or its backend cannot be imported (the same message stops ``serve``
                   and ``worker`` when the config names models: :func:`backend_problem`)
devices            the backend lists no device
config             config.toml does not validate
database           the database cannot be reached
data_dir           the data folder (or the folder that would hold it) is not writable
disk               less than 200 MB free where the data folder lives (warn below 2 GB)
dcmtk, dicom3tools missing tools only warn: they are for tests and troubleshooting
tls …              a configured certificate has expired, or its file cannot be read (warn
                   within 30 days of expiry); a key that does not match its certificate
                   already fails ``config``
models             a card does not validate; with --load, its weights do not load
=================  =====================================================================
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

from dicom_node.config import Config, load_config
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.output import print_json

Status = Literal["ok", "warn", "FAIL"]

#: Packages the node imports; a missing one is a failure.
REQUIRED = ("pydicom", "pynetdicom", "highdicom", "numpy", "keras", "pydantic", "SQLAlchemy",
            "structlog", "apscheduler", "pylibjpeg", "pyjpegls", "cryptography")
#: Packages of the extras: reported when present, a warning when absent.
OPTIONAL = {"matplotlib": "eval", "scikit-image": "eval", "sacrebleu": "eval",
            "rouge-score": "eval"}
TOOLS = ("storescu", "echoscu", "dcmdump", "dciodvfy")
DISK_FAIL_BYTES = 200 * 10**6
DISK_WARN_BYTES = 2 * 10**9
#: A certificate that expires within this many days is a warning.
CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_python() -> list[Check]:
    ok = sys.version_info >= (3, 11)
    checks = [Check("python", "ok" if ok else "FAIL",
                    f"{platform.python_version()} ({sys.executable}) on {platform.platform()}")]
    versions = {dist: _version(dist) for dist in REQUIRED}
    missing = [d for d, v in versions.items() if v is None]
    checks.append(Check(
        "packages", "FAIL" if missing else "ok",
        ", ".join(f"{d} {v}" for d, v in versions.items() if v)
        + (f"; MISSING: {', '.join(missing)}" if missing else "")))
    absent = [f"{d} (extra {extra!r})" for d, extra in OPTIONAL.items() if _version(d) is None]
    present = [f"{d} {_version(d)}" for d in OPTIONAL if _version(d) is not None]
    checks.append(Check("optional packages", "warn" if absent else "ok",
                        ", ".join(present) + (f"; not installed: {', '.join(absent)}"
                                              if absent else "")))
    return checks


#: The module each Keras backend imports.
BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy",
                   "openvino": "openvino"}
#: What to install for a backend: the extras of pyproject.toml.
BACKEND_FIXES = {
    "tensorflow": "install a backend extra: pip install 'dicom-node[cpu]' (TensorFlow on the "
                  "CPU) or pip install 'dicom-node[gpu]' (TensorFlow with CUDA); for JAX, "
                  "pip install 'dicom-node[jax]' and set KERAS_BACKEND=jax",
    "jax": "pip install 'dicom-node[jax]'; or, for TensorFlow, unset KERAS_BACKEND and "
           "pip install 'dicom-node[cpu]' (or 'dicom-node[gpu]')",
}


def keras_backend() -> tuple[str, str]:
    """The backend Keras will use and what chose it, found as Keras finds it (KERAS_BACKEND,
    else ``keras.json`` in KERAS_HOME or ``~/.keras``, else TensorFlow) without importing it."""
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return chosen, f"KERAS_BACKEND={chosen}"
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    path = Path(home) / "keras.json"
    try:
        backend = json.loads(path.read_text(encoding="utf-8")).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    if isinstance(backend, str) and backend:
        return backend, f"{path}"
    return "tensorflow", "Keras' default"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def backend_problem() -> str | None:
    """Why models cannot be loaded for lack of Keras or of its backend, naming what to
    install; None when both can be found. Cheap: the modules are looked up, not imported (a
    backend that is installed but broken shows only when it is imported: ``doctor``)."""
    if not _importable("keras"):
        return "Keras is not installed: No module named 'keras'; pip install 'dicom-node[cpu]'"
    backend, source = keras_backend()
    module = BACKEND_MODULES.get(backend, backend)
    if _importable(module):
        return None
    fix = BACKEND_FIXES.get(backend, (
        f"dicom-node has no extra for it: install {module} yourself, or set KERAS_BACKEND=jax "
        "and pip install 'dicom-node[jax]', or unset KERAS_BACKEND and pip install "
        "'dicom-node[cpu]' (or 'dicom-node[gpu]')"))
    return (f"the Keras backend {backend!r} ({source}) is not installed: No module named "
            f"{module!r}; {fix} (docs/install.md#requirements)")


def check_backend() -> list[Check]:
    """Keras, its backend and version, and every device the backend runs on."""
    problem = backend_problem()
    if problem is not None:
        return [Check("keras backend", "FAIL", problem)]
    try:
        from dicom_node.infer.runtime import describe_devices

        keras = importlib.import_module("keras")
        backend = str(keras.backend.backend())
        module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
        version = getattr(importlib.import_module(module), "__version__", "?") if module else "?"
        devices = describe_devices()
    except Exception as exc:  # an import error of a backend shows as many exception types
        return [Check("keras backend", "FAIL", f"{type(exc).__name__}: {exc}")]
    checks = [Check("keras backend", "ok",
                    f"keras {keras.__version__}, backend {backend} {version} "
                    f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND', 'unset')})")]
    if not devices:
        return [*checks, Check("devices", "FAIL", "the backend lists no device")]
    gpus = [d for d in devices if "GPU" in d]
    detail = "; ".join(devices)
    if backend == "tensorflow" and gpus:
        tf = importlib.import_module("tensorflow")
        growth = [bool(tf.config.experimental.get_memory_growth(g))
                  for g in tf.config.list_physical_devices("GPU")]
        detail += f"; memory growth {'on' if all(growth) else 'OFF'} for the GPU(s)"
    elif not gpus:
        detail += "; no GPU: models run on the CPU"
    return [*checks, Check("devices", "ok", detail)]


def check_database(config: Config) -> Check:
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.exc import SQLAlchemyError

    from dicom_node.store import migrations

    url = config.database.url
    shown = url.split("@")[-1] if "@" in url else url  # no password in the output
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            folder = next((p for p in path.parents if p.exists()), Path("/"))
            writable = folder.is_dir() and os.access(folder, os.W_OK)
            return Check("database", "ok" if writable else "FAIL",
                         f"{shown}: not created yet; created at first start "
                         f"({folder} {'is' if writable else 'is NOT'} writable)")
        connect_args: dict[str, object] = {"timeout": 5}
    else:
        connect_args = {"connect_timeout": 5}
    try:
        engine = create_engine(url, connect_args=connect_args)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            tables = inspect(conn).get_table_names()
            revision = migrations.current_revision(conn)
            try:
                migrations.check_known(conn, revision)
                refused = ""
            except ConfigError as exc:
                refused = str(exc)
        engine.dispose()
    except ModuleNotFoundError as exc:
        return Check("database", "FAIL", f"{shown}: the driver is not installed ({exc.name}); "
                     "for PostgreSQL install dicom-node[postgres]")
    except SQLAlchemyError as exc:
        return Check("database", "FAIL", f"{shown}: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else ''}")
    head = migrations.head_revision()
    schema = (f"schema at revision {revision}" if revision == head else
              f"schema at revision {revision or 'none'}, this build's is {head}: upgraded at the "
              "next start (or dicom-node db upgrade)")
    if refused:
        return Check("database", "FAIL", refused)
    return Check("database", "ok", f"{shown}: reachable, {len(tables)} table(s); {schema}")


def check_data_dir(config: Config) -> list[Check]:
    data_dir = config.node.data_dir
    existing = next((p for p in (data_dir, *data_dir.parents) if p.exists()), Path("/"))
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".doctor-"):
            pass
        writable = Check("data_dir", "ok", f"{data_dir}: writable"
                         + ("" if existing == data_dir else f" (created at start in {existing})"))
    except OSError as exc:
        writable = Check("data_dir", "FAIL", f"{data_dir}: not writable: {exc.strerror}")
    usage = shutil.disk_usage(existing)
    status: Status = ("FAIL" if usage.free < DISK_FAIL_BYTES
                      else "warn" if usage.free < DISK_WARN_BYTES else "ok")
    disk = Check("disk", status, f"{usage.free / 1e9:.1f} GB free of {usage.total / 1e9:.1f} GB "
                 f"({100 * usage.free / usage.total:.0f} %) at {existing}")
    return [writable, disk, check_retention(config, usage.free)]


def check_retention(config: Config, free: int) -> Check:
    section = config.retention
    if section is None or not section.enabled:
        return Check("retention", "warn", "off: no file is ever deleted, so the spool grows until "
                     "the disk is full (docs/retention.md)")
    status: Status = "warn" if free < section.min_free_gb * 1e9 else "ok"
    return Check("retention", status,
                 f"processed studies kept {section.keep_days:g} days, failed ones "
                 f"{section.keep_failed_days:g}; below {section.min_free_gb:g} GB free the oldest "
                 f"go first (now {free / 1e9:.1f} GB free)")


def _expiry(path: Path, expired: Status, now: datetime | None) -> tuple[Status, str]:
    """The first certificate to expire in ``path`` (a chain, or a CA bundle): ``expired`` once it
    has, a warning within CERT_WARN_DAYS."""
    from dicom_node import tls

    first = min(tls.read_certificates(path), key=lambda cert: cert.not_after)
    days = first.days_left(now)
    what = f"{first.subject} ({path.name})"
    if days < 0:
        return expired, f"{what} EXPIRED on {first.not_after:%Y-%m-%d}"
    if days < CERT_WARN_DAYS:
        return "warn", f"{what} expires {first.not_after:%Y-%m-%d}, in {days:.0f} day(s): renew it"
    return "ok", f"{what} expires {first.not_after:%Y-%m-%d} (in {days:.0f} days)"


def _tls_check(name: str, settings: str, own: Path | None, bundle: Path | None,
               now: datetime | None) -> Check:
    """An expired own certificate fails (peers refuse it); an expired CA in the bundle only
    warns (the bundle may hold others)."""
    order: dict[Status, int] = {"ok": 0, "warn": 1, "FAIL": 2}
    status: Status = "ok"
    details = [settings]
    files: tuple[tuple[Path | None, Status], ...] = ((own, "FAIL"), (bundle, "warn"))
    try:
        for path, expired in files:
            if path is not None:
                found, text = _expiry(path, expired, now)
                status = max(status, found, key=order.__getitem__)
                details.append(text)
    except ConfigError as exc:
        return Check(name, "FAIL", str(exc))
    return Check(name, status, "; ".join(details))


def check_tls(config: Config, now: datetime | None = None) -> list[Check]:
    """DICOM TLS of the receiver, the destinations and the worklist: settings and expiry."""
    node = config.node
    if node.tls is None:
        checks = [Check("tls receiver", "ok", f"off: plain TCP on port {node.port} only; DICOM "
                        "travels unencrypted (docs/security.md)")]
    else:
        section = node.tls
        plain = f"plain TCP on {node.port} too" if section.plain_tcp else "no plain TCP"
        clients = ("client certificates required" if section.require_client_certificate
                   else "client certificates verified when presented"
                   if section.ca_certificates else "client certificates not asked for")
        checks = [_tls_check("tls receiver", f"port {section.port} ({plain}), TLS >= "
                             f"{section.min_version}, {clients}", section.certificate,
                             section.ca_certificates, now)]
    peers = [(f"tls destination {d.name}", d.tls) for d in config.destinations]
    if config.worklist is not None and config.worklist.enabled:
        peers.append(("tls worklist", config.worklist.tls))
    for name, client in peers:
        if client is None:
            continue
        hostname = "host name checked" if client.verify_hostname else "host name NOT checked"
        own = "own certificate presented" if client.certificate else "no own certificate"
        trust = "" if client.ca_certificates else ", system CAs trusted"
        settings = f"TLS >= {client.min_version}, {hostname}, {own}{trust}"
        checks.append(_tls_check(name, settings, client.certificate, client.ca_certificates,
                                 now))
    return checks


def check_tools() -> Check:
    found = {tool: shutil.which(tool) for tool in TOOLS}
    missing = [t for t, path in found.items() if path is None]
    return Check("dcmtk, dicom3tools", "warn" if missing else "ok",
                 ("all of " + ", ".join(TOOLS)) if not missing else
                 f"not found: {', '.join(missing)} (optional: tests and troubleshooting; "
                 "apt-get install dcmtk dicom3tools)")


def check_models(config: Config, load: bool) -> list[Check]:
    from dicom_node.registry import discover, load_weights

    checks = []
    for entry in discover(config):
        name = f"model {entry.name}"
        if not entry.valid or entry.card is None:
            checks.append(Check(name, "FAIL", "; ".join(entry.problems)))
            continue
        detail = f"{entry.card.version} ({entry.card.kind}) card valid"
        if load:
            try:
                detail += f"; {load_weights(entry)}"
            except DicomNodeError as exc:
                checks.append(Check(name, "FAIL", f"{detail}; weights: {exc}"))
                continue
        checks.append(Check(name, "ok", detail))
    if not checks:
        checks.append(Check("models", "warn", "the config names no model"))
    return checks


def check_worklist(config: Config) -> Check | None:
    """Query the worklist once (what the receiver's poll does), when one is configured."""
    section = config.worklist
    if section is None or not section.enabled:
        return None
    from dicom_node.worklist.query import query_worklist

    try:
        items = query_worklist(section, config.node.ae_title)
    except DicomNodeError as exc:
        return Check("worklist", "FAIL", str(exc))
    return Check("worklist", "ok", f"{section.ae_title}@{section.host}:{section.port}: "
                 f"{len(items)} scheduled step(s) for the configured filter")


def run_checks(config_path: str | Path, load: bool = False) -> list[Check]:
    """Every check, in order; the config-dependent ones only when the config validates."""
    checks = check_python()
    checks += check_backend()
    try:
        config = load_config(config_path)
    except DicomNodeError as exc:
        checks.append(Check("config", "FAIL", str(exc)))
        return [*checks, check_tools()]
    checks.append(Check("config", "ok", f"{config.source}: valid ({len(config.routes)} routes, "
                        f"{len(config.models)} models, {len(config.destinations)} destinations)"))
    checks.append(check_database(config))
    checks += check_data_dir(config)
    checks.append(check_tools())
    checks += check_tls(config)
    worklist = check_worklist(config)
    if worklist is not None:
        checks.append(worklist)
    checks += check_models(config, load)
    return checks


def print_checks(checks: list[Check], as_json: bool = False) -> None:
    if as_json:
        print_json([asdict(c) for c in checks])
        return
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"[{c.status:^4}] {c.name.ljust(width)}  {c.detail}")
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    print(f"{failed} failed, {warned} warning(s), {len(checks) - failed - warned} ok")
