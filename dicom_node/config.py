"""One validated schema for config.toml.

The configuration is a single immutable :class:`Config` object, loaded with :func:`load_config`
and passed explicitly to every stage; nothing reads a module global. Relative paths in the file
(``node.data_dir``, ``models[].path``, a relative SQLite URL) are resolved against the directory
that holds the config file, so the node behaves the same from any working directory.

A file that does not validate raises :class:`~dicom_node.errors.ConfigError` whose message names
every offending key and why, e.g. ``routes[0].send_to: unknown destination 'pacs2'``.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.datadict import tag_for_keyword

from dicom_node import tls
from dicom_node.errors import ConfigError

#: Keys of a route's ``match`` table that are not DICOM keywords.
CALLING_AE_KEY = "CallingAETitle"


def _check_ae_title(value: str) -> str:
    """An AE title: 1–16 characters of the default repertoire, no backslash, not only spaces."""
    if not value.strip():
        raise ValueError("an AE title may not be empty or only spaces")
    if len(value) > 16:
        raise ValueError(f"an AE title has at most 16 characters, {value!r} has {len(value)}")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError(f"AE title {value!r} contains a backslash or a non-printable character")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TlsVersion = Literal["1.2", "1.3"]
#: DICOM TLS's registered port (PS3.15 Annex B; "dicom-tls", IANA).
DICOM_TLS_PORT = 2762


class NodeTlsSection(_Section):
    """The receiver's DICOM TLS listener (docs/security.md)."""

    #: The TLS listener's port; next to node.port (plain_tcp = true), or instead of it.
    port: Port = DICOM_TLS_PORT
    #: The node's certificate (PEM; its chain may follow it) and its unencrypted private key.
    certificate: Path
    private_key: Path
    #: CA bundle (PEM) that client certificates are verified against.
    ca_certificates: Path | None = None
    #: Refuse a client that presents no certificate (or one the bundle does not verify).
    require_client_certificate: bool = True
    min_version: TlsVersion = "1.2"
    #: Also keep accepting unencrypted associations on node.port.
    plain_tcp: bool = False

    @model_validator(mode="after")
    def _files_usable(self) -> NodeTlsSection:
        try:
            tls.server_context(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


class ClientTlsSection(_Section):
    """TLS on associations the node opens: ``[[destinations]].tls``, ``[worklist.tls]``."""

    #: CA bundle (PEM) the peer's certificate is verified against; absent: the system's CAs.
    ca_certificates: Path | None = None
    #: The node's own certificate and key, for a peer that asks for one.
    certificate: Path | None = None
    private_key: Path | None = None
    #: Check that the peer's certificate names the host (name or IP address) connected to.
    verify_hostname: bool = True
    min_version: TlsVersion = "1.2"

    @model_validator(mode="after")
    def _files_usable(self) -> ClientTlsSection:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: set both (to present "
                             "the node's certificate) or neither")
        try:
            tls.client_context(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


class NodeSection(_Section):
    ae_title: AETitle = "DICOM_NODE"
    port: Port = 11112
    bind: str = "0.0.0.0"
    data_dir: Path = Path("var")
    allowed_calling_aets: tuple[AETitle, ...] = ()
    #: Reject an association whose Called AE Title is not ``ae_title`` (rejected-permanent,
    #: "called AE title not recognized"). Off by default, like most PACS: senders often carry a
    #: stale or generic called title.
    check_called_ae_title: bool = False
    #: Simultaneous associations; the next one is rejected (transient, "local limit exceeded").
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    #: A peer that sends nothing for this long has its association aborted.
    network_timeout_seconds: Seconds = 60.0
    acse_timeout_seconds: Seconds = 30.0
    dimse_timeout_seconds: Seconds = 60.0
    #: TCP connections open at once (associations, and connections still negotiating); one more
    #: evicts the oldest connection still negotiating, or is closed at accept time when all are
    #: associations. Default: max_associations + 8.
    max_connections: Annotated[int, Field(ge=1, le=4000)] | None = None
    #: The same cap for the connections from one remote address (the host's own oldest one still
    #: negotiating is evicted). Default: half of max_connections (at least 1), so that one host
    #: never holds every slot.
    max_connections_per_host: Annotated[int, Field(ge=1, le=4000)] | None = None
    #: PS3.8's ARTIM timer for the association request: the whole A-ASSOCIATE-RQ must be read
    #: within this time from accept (DICOM TLS: from the end of the handshake), or the
    #: connection is closed.
    association_request_timeout_seconds: Seconds = 5.0
    #: Largest P-DATA PDU we accept: advertised in A-ASSOCIATE-AC and enforced when reading
    #: (a longer PDU aborts the association); 0 means unlimited (still capped at 64 MiB).
    max_pdu_bytes: Annotated[int, Field(ge=0)] = 262_144
    #: What a second copy of a stored SOP Instance UID does: "replace" keeps the newest copy.
    #: "keep" keeps the first copy. Either way the sender gets Success and the study's clock
    #: restarts.
    on_duplicate: Literal["replace", "keep"] = "replace"
    #: Free space (MiB) data_dir's file system must keep: below it a C-STORE is answered Out of
    #: Resources (A700) before its data set is written. 500 MiB leaves room, on a nearly full
    #: disk, for the index database to commit, the workers to write their results, retention
    #: (retention.min_free_gb, far above) to catch up and an administrator to log in; it is a
    #: few large studies' worth, so little is refused that could have been stored. 0: no floor
    #: (a write that fails is still answered A700).
    min_free_mb: Annotated[int, Field(ge=0)] = 500
    #: The DICOM TLS listener (absent: plain TCP on ``port`` only).
    tls: NodeTlsSection | None = None

    @model_validator(mode="after")
    def _tls_port_free(self) -> NodeSection:
        if self.tls is not None and self.tls.plain_tcp and self.tls.port == self.port:
            raise ValueError(f"tls.port ({self.tls.port}) is node.port, and tls.plain_tcp = "
                             f"true keeps plain TCP on node.port: give TLS its own port "
                             f"({DICOM_TLS_PORT} is DICOM TLS's), or set plain_tcp = false")
        return self

    @property
    def listen_ports(self) -> tuple[int, ...]:
        """The ports the receiver listens on: plain TCP, then TLS."""
        if self.tls is None:
            return (self.port,)
        return (self.port, self.tls.port) if self.tls.plain_tcp else (self.tls.port,)


DEFAULT_DATABASE_URL = "sqlite:///var/dicom-node.db"


class DatabaseSection(_Section):
    url: str = DEFAULT_DATABASE_URL


class CompletionSection(_Section):
    stable_after_seconds: Seconds = 30.0
    #: How often the completion sweep looks for stable studies.
    sweep_interval_seconds: Seconds = 2.0
    #: A stable study that still lacks what its MPPS or worklist order says to expect (a series
    #: that never arrived, a procedure still in progress, a discontinued procedure): "hold" keeps
    #: it unprocessed in state ``incomplete`` and reports it; "process" routes what arrived, with
    #: a warning and a note on the study.
    on_incomplete: Literal["hold", "process"] = "hold"


class JobsSection(_Section):
    #: Attempts before a job is marked failed (an administrator can retry it).
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 6
    retry_base_seconds: Seconds = 10.0
    retry_max_seconds: Seconds = 600.0
    #: A worker that holds a job longer than this without renewing loses it to another worker.
    lease_seconds: Seconds = 300.0
    #: How often an idle worker looks for work.
    poll_seconds: Seconds = 1.0
    #: Worker processes that `dicom-node serve` starts.
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    #: How long a job's delivery waits out a destination that cannot be reached (refused or
    #: timed-out connection, TLS handshake, rejected or aborted association), retrying with
    #: the backoff above and spending none of max_attempts; then the job fails (hours).
    delivery_window_hours: Annotated[float, Field(gt=0)] = 24.0

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> JobsSection:
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError(f"retry_max_seconds ({self.retry_max_seconds}) is below "
                             f"retry_base_seconds ({self.retry_base_seconds})")
        return self


class LoggingSection(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


def _check_code_string(value: str) -> str:
    """A CS value (PS3.5): upper-case letters, digits, space and underscore, ≤ 16 characters."""
    if not re.fullmatch(r"[A-Z0-9 _]{1,16}", value):
        raise ValueError(f"{value!r} is not a DICOM code string (A–Z, 0–9, space, underscore; "
                         f"at most 16 characters)")
    return value


CodeString = Annotated[str, AfterValidator(_check_code_string)]


class WorklistFilter(_Section):
    """What the node asks the RIS for (the C-FIND identifier's matching keys)."""

    #: Scheduled Station AE Title (0040,0001) of the steps to fetch, e.g. the node's modalities.
    scheduled_station_ae_title: AETitle | None = None
    scheduled_station_name: str | None = Field(default=None, min_length=1, max_length=16)
    #: Modality (0008,0060) of the scheduled procedure step, e.g. "CT".
    modality: CodeString | None = None
    #: The Scheduled Procedure Step Start Date range: today minus days_before to today plus
    #: days_after.
    days_before: Annotated[int, Field(ge=0, le=60)] = 1
    days_after: Annotated[int, Field(ge=0, le=60)] = 1


class WorklistSection(_Section):
    """The RIS's Modality Worklist SCP, queried by C-FIND (docs/worklist.md)."""

    enabled: bool = True
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    #: Our AE title on the query association (default: node.ae_title).
    calling_ae_title: AETitle | None = None
    poll_seconds: Seconds = 60.0
    #: A worklist SCP that does not answer within this long counts as down for this poll.
    timeout_seconds: Seconds = 10.0
    #: Scheduled steps not returned by the RIS for this long are removed from the database.
    keep_days: Annotated[int, Field(ge=1, le=365)] = 7
    #: Patient + modality + date matching: the step's scheduled date may be this many days
    #: from the Study Date (0: the same day).
    match_days: Annotated[int, Field(ge=0, le=7)] = 0
    filter: WorklistFilter = WorklistFilter()
    #: DICOM TLS to the worklist SCP (absent: plain TCP).
    tls: ClientTlsSection | None = None


class MppsSection(_Section):
    """The node as a Modality Performed Procedure Step SCP on its own AE (docs/mpps.md)."""

    enabled: bool = True
    #: A DISCONTINUED step's study: "hold" (state incomplete, reported) or "process" what
    #: arrived of its performed series.
    on_discontinued: Literal["hold", "process"] = "hold"
    #: A step still IN PROGRESS this long after its last update no longer holds its study back
    #: (the modality never sent the final N-SET); the stable-age timer decides again.
    in_progress_timeout_seconds: Seconds = 14_400.0
    #: A performed series listed without its images (an empty Referenced Image Sequence) counts
    #: as arrived once it has an instance and the study has had none for this long: its size is
    #: unknown, so the first instance alone must not complete the study.
    unlisted_series_quiet_seconds: Seconds = 10.0


class RetentionSection(_Section):
    """Deleting the spool files and results of studies the node has finished with
    (docs/retention.md). The PACS keeps the images; the node is not an archive."""

    enabled: bool = True
    #: Processed studies (done, unrouted) are deleted this many days after their last activity
    #: (last instance received, completed, last job ended).
    keep_days: Annotated[float, Field(gt=0, le=3650)] = 7.0
    #: Studies with a job that failed for good are kept longer, for the administrator.
    keep_failed_days: Annotated[float, Field(gt=0, le=3650)] = 30.0
    #: Below this much free space on data_dir's file system, processed studies are deleted
    #: oldest first whatever their age (never one still receiving, incomplete or in work).
    min_free_gb: Annotated[float, Field(ge=0)] = 5.0
    interval_minutes: Annotated[float, Field(gt=0, le=10_080)] = 60.0


def _check_bind_address(value: str) -> str:
    """An IP address (v4 or v6) or a host name, without a port."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name (give the "
                             f"port in its own key)") from None
    return value


class HttpSection(_Section):
    """The receiver's HTTP endpoint: Prometheus metrics, liveness and readiness
    (docs/monitoring.md). Absent: no HTTP port is opened."""

    #: Address the endpoint listens on; "0.0.0.0" for a scraper or probe on another host.
    bind: Annotated[str, AfterValidator(_check_bind_address)] = "127.0.0.1"
    port: Port = 8080


class Destination(_Section):
    name: str = Field(min_length=1, max_length=64)
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    #: Our AE title on associations to this destination (default: node.ae_title).
    calling_ae_title: AETitle | None = None
    timeout_seconds: Seconds = 30.0
    #: Associations all workers together may have open to it at once (dicom_node.send.slots).
    max_associations: Annotated[int, Field(ge=1, le=64)] = 2
    #: DICOM TLS to this destination (absent: plain TCP).
    tls: ClientTlsSection | None = None
    #: Ask the destination to commit to the results sent (Storage Commitment Push Model, PS3.4
    #: Annex J): an N-ACTION after the C-STOREs, its report awaited at the receiver
    #: (docs/commitment.md).
    storage_commitment: bool = False
    #: A commitment not reported within this long counts as failed (results_commitment_timeout).
    commitment_timeout_minutes: Annotated[float, Field(gt=0, le=10_080)] = 60.0


class ModelRef(_Section):
    name: str = Field(min_length=1)
    path: Path


class RegexMatch(_Section):
    """``{ regex = "..." }`` in a route's match: the value must match (``re.search``)."""

    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
        return value

    def matches(self, text: str) -> bool:
        return re.search(self.regex, text) is not None


MatchValue = str | RegexMatch | list[str | RegexMatch]


#: Keys of a route's ``order`` table: attributes of the worklist order matched to the study.
ORDER_KEYS = (
    "RequestedProcedureCode",          # Code Value in Requested Procedure Code Sequence
    "RequestedProcedureCodeMeaning",
    "RequestedProcedureDescription",
    "RequestedProcedureID",
    "ScheduledProtocolCode",           # Code Value in Scheduled Protocol Code Sequence
    "ScheduledProtocolCodeMeaning",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID",
    "ScheduledStationAETitle",
    "ScheduledStationName",
    "Modality",                        # of the scheduled procedure step
    "MatchMethod",                     # how the order was matched: study_uid, accession, ...
)


class Route(_Section):
    name: str = Field(min_length=1, max_length=128)
    #: DICOM keyword (or CallingAETitle) → accepted values. Keys AND, values OR.
    match: dict[str, MatchValue] = Field(default_factory=dict)
    #: Worklist order attribute (ORDER_KEYS) → accepted values; ANDed with ``match``. A route
    #: with order keys never fires for a study without a matched order.
    order: dict[str, MatchValue] = Field(default_factory=dict)
    models: tuple[str, ...] = Field(min_length=1)
    send_to: tuple[str, ...] = Field(min_length=1)

    @field_validator("match")
    @classmethod
    def _keywords_exist(cls, value: dict[str, MatchValue]) -> dict[str, MatchValue]:
        for key in value:
            if key != CALLING_AE_KEY and tag_for_keyword(key) is None:
                raise ValueError(
                    f"{key!r} is not a DICOM keyword (use a keyword from PS3.6, "
                    f"e.g. Modality, BodyPartExamined, or {CALLING_AE_KEY})"
                )
        return value

    @field_validator("order")
    @classmethod
    def _order_keys_exist(cls, value: dict[str, MatchValue]) -> dict[str, MatchValue]:
        for key in value:
            if key not in ORDER_KEYS:
                raise ValueError(f"{key!r} is not a worklist order key (one of "
                                 f"{', '.join(ORDER_KEYS)})")
        return value

    def accepted(self, key: str, table: str = "match") -> tuple[str | RegexMatch, ...]:
        """The accepted values for one key of ``match`` (or ``order``), as a tuple."""
        value = (self.order if table == "order" else self.match)[key]
        return tuple(value) if isinstance(value, list) else (value,)


class Config(_Section):
    node: NodeSection = NodeSection()
    database: DatabaseSection = DatabaseSection()
    completion: CompletionSection = CompletionSection()
    jobs: JobsSection = JobsSection()
    logging: LoggingSection = LoggingSection()
    destinations: tuple[Destination, ...] = ()
    models: tuple[ModelRef, ...] = ()
    routes: tuple[Route, ...] = ()
    #: Modality Worklist query (absent: the node does not know about orders).
    worklist: WorklistSection | None = None
    #: MPPS SCP (absent: studies complete by the stable-age timer only).
    mpps: MppsSection | None = None
    #: Deleting processed studies' files; None (no section): nothing is ever deleted.
    retention: RetentionSection | None = None
    #: Metrics and health endpoint of the receiver; None (no section): no HTTP port.
    http: HttpSection | None = None
    #: Where the file was read from (set by load_config; not a key of the file).
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
        for kind, items in (("destination", self.destinations), ("model", self.models),
                            ("route", self.routes)):
            names = [item.name for item in items]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{kind} names must be unique; repeated: {', '.join(duplicates)}")
        dest_names = {d.name for d in self.destinations}
        model_names = {m.name for m in self.models}
        problems = []
        for i, route in enumerate(self.routes):
            for name in route.send_to:
                if name not in dest_names:
                    problems.append(f"routes[{i}].send_to: unknown destination {name!r} "
                                    f"(defined: {', '.join(sorted(dest_names)) or 'none'})")
            for name in route.models:
                if name not in model_names:
                    problems.append(f"routes[{i}].models: unknown model {name!r} "
                                    f"(defined: {', '.join(sorted(model_names)) or 'none'})")
            if route.order and (self.worklist is None or not self.worklist.enabled):
                problems.append(f"routes[{i}].order: matches on worklist orders, but no "
                                f"[worklist] section is enabled")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def model(self, name: str) -> ModelRef:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def incoming_dir(self) -> Path:
        return self.node.data_dir / "incoming"

    @property
    def results_dir(self) -> Path:
        return self.node.data_dir / "results"


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key (not part of the config schema; check the spelling)"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        lines.append(f"{origin}: {loc}: {message}" if loc else f"{origin}: {message}")
    return "\n".join(lines)


#: The path keys of a ``tls`` table.
TLS_PATH_KEYS = ("certificate", "private_key", "ca_certificates")


def _resolve_tls_paths(table: Any, base: Path) -> None:
    """Resolve the paths of ``table["tls"]`` (copied, not changed in place) against ``base``."""
    if not isinstance(table, dict) or not isinstance(table.get("tls"), dict):
        return
    section = dict(table["tls"])
    for key in TLS_PATH_KEYS:
        if isinstance(section.get(key), str):
            section[key] = str(base / section[key])
    table["tls"] = section


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative paths in the raw table relative to ``base`` (the config file's folder)."""
    _resolve_tls_paths(raw.get("node"), base)
    _resolve_tls_paths(raw.get("worklist"), base)
    for destination in raw.get("destinations", []) or []:
        _resolve_tls_paths(destination, base)
    node = raw.get("node")
    if isinstance(node, dict) and "data_dir" in node:
        node["data_dir"] = str(base / str(node["data_dir"]))
    elif node is None or isinstance(node, dict):
        raw.setdefault("node", {})["data_dir"] = str(base / "var")
    for model in raw.get("models", []) or []:
        if isinstance(model, dict) and "path" in model:
            model["path"] = str(base / str(model["path"]))
    database = raw.get("database")
    url = (database.get("url", DEFAULT_DATABASE_URL) if isinstance(database, dict)
           else DEFAULT_DATABASE_URL)
    if isinstance(url, str) and url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        relative = url.removeprefix("sqlite:///")
        if relative and relative != ":memory:":
            raw.setdefault("database", {})["url"] = f"sqlite:///{base / relative}"
    return raw


def parse_config(
    raw: Mapping[str, Any], origin: str = "config", base: Path | None = None
) -> Config:
    """Validate an already-parsed TOML table; raise ConfigError naming every bad key."""
    table = dict(raw)
    if base is not None:
        table = _resolve_paths({k: (dict(v) if isinstance(v, dict) else
                                    [dict(i) if isinstance(i, dict) else i for i in v]
                                    if isinstance(v, list) else v)
                                for k, v in table.items()}, base)
    try:
        return Config.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def load_config(path: str | Path) -> Config:
    """Read, validate and return the config at ``path``."""
    # absolute(), not resolve(): a config reached through a symlink (a Kubernetes ConfigMap, an
    # atomically switched link) must be re-read through the link on reload.
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse_config(raw, origin=str(path), base=path.parent)
    return config.model_copy(update={"source": path})
