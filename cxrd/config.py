"""Configuration: one TOML file, parsed once into a frozen, typed tree.

``load_config`` reads the file (``--config PATH``, else ``$CXRD_CONFIG``, else none: every
value defaults) and ``validate`` turns the parsed TOML into a :class:`Config`. Validation
collects every problem before it raises, so an operator fixes a file in one pass; each
message names the key (``node.port``, ``destinations[1].ae_title``), the bad value and what
is allowed. Unknown sections and keys are errors too, with a "did you mean" suggestion,
because a misspelt key silently falling back to its default is worse than a refusal to start.

Relative paths are resolved once, here, against the config file's directory (against the
current directory when there is no file), so the rest of cxrd only sees absolute paths.
The resulting object is passed explicitly; there is no module-level config.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

from cxrd.errors import ConfigError

#: The only environment variable cxrd reads for configuration: the config file's path
#: (secrets excepted: a STOW-RS destination's ``token_env`` or ``password_env``, or a
#: webhook notification's ``token_env``, names one, read by the sender,
#: ``cxrd.stow.credentials``).
ENV_CONFIG = "CXRD_CONFIG"

#: Execution providers cxrd accepts in ``model.providers`` (onnxruntime's own names).
KNOWN_PROVIDERS: tuple[str, ...] = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "ROCMExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
)

LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")

DATABASE_FILENAME = "cxrd.sqlite3"

_AE_ALLOWED = "1-16 printable ASCII characters, not all spaces, without backslash"
_MAX_PDU_LIMIT = 2**32 - 1  # the PDU length field is 32 bits (PS3.8 9.3.1)
_MIN_PDU = 1024


class LogFormat(StrEnum):
    """How log records are written."""

    TEXT = "text"
    JSON = "json"


class SrSopClass(StrEnum):
    """Which SR IOD the structured report uses (TID 1500 fits all three)."""

    COMPREHENSIVE_3D = "comprehensive3d"
    COMPREHENSIVE = "comprehensive"
    ENHANCED = "enhanced"

    @property
    def uid(self) -> str:
        """The SOP Class UID of this SR IOD."""
        # Imported here: cxrd.dicom imports pydicom, which the CLI need not load just to
        # read its configuration.
        from cxrd.dicom import SR_SOP_CLASSES

        return SR_SOP_CLASSES[self.value]


class HeatmapCompression(StrEnum):
    """How the heatmap Secondary Capture's pixels are stored (``cxrd.heatmap``)."""

    NONE = "none"  # RGB, Explicit VR Little Endian
    JPEG_BASELINE = "jpeg-baseline"  # JPEG Baseline (1.2.840.10008.1.2.4.50), lossy


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS for the receiver (``node.tls``) or for one destination (``destinations[i].tls``).

    For the receiver, ``certificate`` and ``key`` are the server's own and ``ca`` verifies
    callers' certificates (required by ``require_client_cert``). For a destination,
    ``certificate`` and ``key`` are an optional client certificate and ``ca`` verifies the
    peer (the system trust store when absent).
    """

    certificate: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """``[node]``: this node's DICOM identity and listening socket, and its id among the
    nodes that share one database (``id``: the host name unless set; it begins every lease
    owner this node writes, jobs' and deliveries')."""

    ae_title: str = "CXRD"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_callers: tuple[str, ...] = ()
    tls: TlsConfig | None = None
    max_pdu: int = 131072
    receivers: int = 1
    id: str = field(default_factory=socket.gethostname)

    def is_caller_allowed(self, calling_ae: str, address: str) -> bool:
        """Whether a caller may associate: any caller when ``allowed_callers`` is empty.

        AE titles compare without their insignificant leading and trailing spaces; the
        host part of an ``AE@host`` entry compares with the peer address as a string.
        """
        if not self.allowed_callers:
            return True
        ae = calling_ae.strip()
        for entry in self.allowed_callers:
            entry_ae, sep, entry_host = entry.rpartition("@")
            if not sep:
                entry_ae, entry_host = entry, ""
            if entry_ae.strip() == ae and (not entry_host or entry_host == address):
                return True
        return False


#: ``[storage] min_free_mb`` when the file does not set it.
DEFAULT_MIN_FREE_MB = 1024


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: where the spool, results and SQLite database live."""

    data_dir: Path
    database_url: str = ""
    # Below this many MB free (spool's or results' file system), C-STORE answers 0xA700 and
    # watched files wait where they are (cxrd.space); 0 turns the check off.
    min_free_mb: int = 1024  # DEFAULT_MIN_FREE_MB
    # Days spool files and delivered results are kept; 0 keeps them for ever.
    retention_days: int = 0
    #: Where instances and results are kept (``cxrd.store.open_node_store``): "" =
    #: data_dir/spool and [results] folder, an absolute folder path, or
    #: "s3://bucket[/prefix]"; the database records keys under it.
    store: str = ""
    #: The S3 endpoint for S3-compatible storage other than AWS (MinIO, Ceph, moto); ""
    #: = AWS's own endpoints.
    s3_endpoint_url: str = ""

    @property
    def incoming_dir(self) -> Path:
        """The drop folder that is always watched."""
        return self.data_dir / "incoming"

    @property
    def spool_dir(self) -> Path:
        """Where ingested instances are stored."""
        return self.data_dir / "spool"

    @property
    def rejected_dir(self) -> Path:
        """Where files that could not be ingested are moved."""
        return self.data_dir / "rejected"

    @property
    def database_url_resolved(self) -> str:
        """``database_url``, or SQLite in ``data_dir`` when it is empty."""
        return self.database_url or f"sqlite:///{self.data_dir / DATABASE_FILENAME}"


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """``[watch]``: extra folders watched for DICOM files."""

    folders: tuple[Path, ...] = ()
    settle_seconds: float = 2.0


@dataclass(frozen=True, slots=True)
class StudyConfig:
    """``[study]``: when a study counts as complete."""

    stable_seconds: float = 10.0
    #: Classify instances as they arrive, during the stable wait; the SR still waits for
    #: the study to be stable (``cxrd.admit``). False: nothing is queued before then.
    classify_on_arrival: bool = True


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """``[model]``: the ONNX model and how onnxruntime runs it."""

    path: Path | None = None  # None: the embedded demo model
    providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    intra_op_threads: int = 0  # 0: the cores per worker process
    # A worker refuses to start (and `cxrd serve` before it listens) when CUDA is not in use.
    require_cuda: bool = False
    #: The lung-field segmenter's file; None: the embedded demo segmenter (unless
    #: ``segmenter_off``). It runs in the same session settings as the classifier.
    segmenter: Path | None = None
    #: ``segmenter = "off"``: no segmenter at all (no SEG, no lung-field gate).
    segmenter_off: bool = False
    #: The lung-field gate: an image whose predicted lung fields (both lungs together)
    #: cover less than this fraction of it is skipped (``no-lung-fields``); 0 turns the
    #: gate off. Chest phantoms measure 0.15-0.28, hand and knee ones 0 (docs).
    min_lung_fraction: float = 0.05

    @property
    def uses_embedded_model(self) -> bool:
        """True when no model file is configured and the embedded demo model is used."""
        return self.path is None

    @property
    def uses_segmenter(self) -> bool:
        """False when ``[model] segmenter = "off"``."""
        return not self.segmenter_off


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """``[workers]``: inference processes and job leasing."""

    #: None: "auto", see worker_processes(); 0: ``cxrd serve`` runs no workers (other
    #: nodes' ``cxrd worker`` do its jobs).
    processes: int | None = None
    batch_size: int = 4
    lease_seconds: float = 300.0
    max_attempts: int = 3
    retry_backoff_seconds: float = 30.0


#: The widest ``[results] lung_margin``: a quarter of the image side around the lungs
#: reaches the image border from nearly every lung, which is no restriction.
MAX_LUNG_MARGIN = 0.25


@dataclass(frozen=True, slots=True)
class ResultsConfig:
    """``[results]``: which result objects are made and where they are written.

    ``data_dir`` repeats ``storage.data_dir`` so that ``results_dir`` can be derived here.
    """

    data_dir: Path = field(metadata={"describe": False})
    folder: Path | None = None
    structured_report: bool = True
    heatmap_secondary_capture: bool = True
    heatmap_max_side: int = 1024
    heatmap_compression: HeatmapCompression = HeatmapCompression.NONE
    #: One lung-field Segmentation (DICOM SEG) per classified image; needs the segmenter.
    segmentation: bool = True
    parametric_map: bool = False
    sr_sop_class: SrSopClass = SrSopClass.COMPREHENSIVE_3D
    #: How far outside the lung fields the reported region may lie, a fraction of the
    #: image side (``cxrd.findings.LUNG_MARGIN``, which says why 0.04).
    lung_margin: float = 0.04

    @property
    def results_dir(self) -> Path:
        """``folder``, or ``data_dir/results`` when it is not set."""
        return self.folder if self.folder is not None else self.data_dir / "results"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint."""

    listen: str = "127.0.0.1:9464"

    @property
    def enabled(self) -> bool:
        """False when ``listen`` is empty."""
        return bool(self.listen)


#: ``[dicomweb] max_request_mb`` when the file does not set it: 2 GiB, room for a study of
#: large radiographs in one request.
DEFAULT_MAX_REQUEST_MB = 2048


@dataclass(frozen=True, slots=True)
class DicomwebConfig:
    """``[dicomweb]``: the STOW-RS receiver (``cxrd.dicomweb``), off while ``listen`` is "".

    Callers authenticate with a bearer token, the one ``token_file`` holds (required when
    ``listen`` is set: no token, no entry). The server speaks HTTPS with ``[node.tls]``'s
    certificate and key when that is set, plain HTTP otherwise. A request whose body is
    larger than ``max_request_mb`` is answered 413 (Payload Too Large).
    """

    listen: str = ""
    token_file: Path | None = None
    max_request_mb: int = DEFAULT_MAX_REQUEST_MB

    @property
    def enabled(self) -> bool:
        """False when ``listen`` is empty."""
        return bool(self.listen)

    @property
    def max_request_bytes(self) -> int:
        return self.max_request_mb * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """``[logging]``."""

    level: str = "INFO"
    format: LogFormat = LogFormat.TEXT


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """One ``[[destinations]]`` entry, which receives every result: a C-STORE SCP
    (``ae_title``, ``host``, ``port``) or, with ``url``, a DICOMweb STOW-RS service (the
    DICOMweb base URL; cxrd posts to ``url + "/studies"``).

    A STOW-RS destination may authenticate with a bearer token (``token_file`` or
    ``token_env``) or HTTP basic auth (``username`` and ``password_file`` or
    ``password_env``). The secret itself is never in the configuration: only the file or
    the environment variable that holds it, read by the sender at each pass
    (``cxrd.stow.credentials``), so a rotated token needs no reload. ``tls`` verifies an
    https destination (``ca``) and presents a client certificate.
    """

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: TlsConfig | None = None
    url: str = ""
    token_file: Path | None = None
    token_env: str = ""
    username: str = ""
    password_file: Path | None = None
    password_env: str = ""

    @property
    def is_stow(self) -> bool:
        """Whether results go by STOW-RS (``url``) rather than C-STORE."""
        return bool(self.url)

    @property
    def section(self) -> str:
        """The array of tables it comes from, as messages name it."""
        return "destinations"


class NotificationKind(StrEnum):
    """How an urgent-finding notification is sent (``notifications[i].kind``)."""

    WEBHOOK = "webhook"  # HTTP POST of a JSON document to ``url``
    HL7 = "hl7"  # HL7 v2.5.1 ORU^R01 over MLLP to ``host``:``port``


#: The study-level findings a notification may be sent for (NORM is never urgent).
URGENT_FINDINGS: tuple[str, ...] = ("TB", "NTB")


@dataclass(frozen=True, slots=True)
class NotificationConfig:
    """One ``[[notifications]]`` entry: told of each study whose SR reports one of
    ``findings`` (``cxrd.outbox.add_result`` decides, ``cxrd.notify`` sends). A webhook
    (``url``, an optional bearer token named by ``token_file`` or ``token_env``) or an HL7
    v2 receiver over MLLP (``host``, ``port``, the MSH's receiving application and
    facility). ``connect_timeout_seconds`` bounds the TCP connection, ``timeout_seconds``
    the wait for the answer (the HTTP response, the HL7 ACK)."""

    name: str
    kind: NotificationKind = NotificationKind.WEBHOOK
    findings: tuple[str, ...] = ("TB",)
    url: str = ""
    token_file: Path | None = None
    token_env: str = ""
    host: str = ""
    port: int = 0
    receiving_application: str = ""
    receiving_facility: str = ""
    sending_facility: str = ""
    connect_timeout_seconds: float = 10.0
    timeout_seconds: float = 30.0

    @property
    def section(self) -> str:
        """The array of tables it comes from, as messages name it."""
        return "notifications"


@dataclass(frozen=True, slots=True)
class SenderConfig:
    """``[sender]``: delivery retries to destinations."""

    calling_ae: str = "CXRD"
    max_age_hours: float = 168.0
    initial_backoff_seconds: float = 5.0
    max_backoff_seconds: float = 1800.0
    #: How long a destination may take to answer each C-STORE (and each association
    #: step) before the attempt is given up and the association aborted.
    dimse_timeout_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``source`` is the file read (None: defaults only)."""

    node: NodeConfig
    storage: StorageConfig
    watch: WatchConfig
    study: StudyConfig
    model: ModelConfig
    workers: WorkersConfig
    results: ResultsConfig
    metrics: MetricsConfig
    logging: LoggingConfig
    sender: SenderConfig
    destinations: tuple[DestinationConfig, ...]
    source: Path | None
    base_dir: Path
    #: ``[[notifications]]``: urgent findings, by webhook or HL7 v2 (``cxrd.notify``).
    notifications: tuple[NotificationConfig, ...] = ()
    #: ``[dicomweb]``: the STOW-RS receiver (``cxrd.dicomweb``).
    dicomweb: DicomwebConfig = field(default_factory=DicomwebConfig)

    @property
    def endpoint_names(self) -> tuple[str, ...]:
        """Every name a delivery row may carry: destinations and notifications (one
        namespace)."""
        return (*(d.name for d in self.destinations), *(n.name for n in self.notifications))


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration.

    ``path`` None means ``$CXRD_CONFIG`` when set (and not empty), else no file: all
    defaults, relative paths against the current directory. A file that is named but
    missing is an error. Raises ConfigError listing every problem found.
    """
    environ = os.environ if env is None else env
    origin = "--config"
    if path is None:
        named = environ.get(ENV_CONFIG, "")
        if not named:
            return validate({})
        path, origin = named, f"${ENV_CONFIG}"
    file = Path(os.path.abspath(Path(path).expanduser()))
    return validate(read_toml(file, origin=origin), source=file)


def read_toml(file: Path, *, origin: str = "--config") -> dict[str, Any]:
    """Parse one TOML file; a missing file or a syntax error raises ConfigError."""
    try:
        raw = file.read_bytes()
    except FileNotFoundError as exc:
        problem = f"{file}: no such configuration file (named by {origin})"
        raise ConfigError(problem, [problem]) from exc
    except OSError as exc:
        problem = f"{file}: cannot read the configuration file: {exc.strerror or exc}"
        raise ConfigError(problem, [problem]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"{file}: not UTF-8 text (byte {exc.start}); TOML files must be UTF-8"
        raise ConfigError(problem, [problem]) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problem = f"{file}: TOML syntax error: {exc}"
        match = re.search(r"at line (\d+)", str(exc))
        if match:
            lines = text.splitlines()
            number = int(match.group(1))
            if 1 <= number <= len(lines):
                problem += f"; the line reads: {lines[number - 1].strip()}"
        raise ConfigError(problem, [problem]) from exc


def validate(
    data: Mapping[str, Any],
    *,
    source: str | Path | None = None,
    base_dir: str | Path | None = None,
) -> Config:
    """Check parsed TOML and build the Config; every problem is collected before raising.

    Relative paths resolve against ``base_dir``, which defaults to the directory of
    ``source`` or, without a source, the current directory.
    """
    src = Path(os.path.abspath(source)) if source is not None else None
    if base_dir is not None:
        base = Path(os.path.abspath(base_dir))
    else:
        base = src.parent if src is not None else Path.cwd()

    problems: list[str] = []
    root = _Root(problems, data)

    node = _read_node(root.section("node"), base)
    storage = _read_storage(root.section("storage"), base)
    watch = _read_watch(root.section("watch"), base)
    study = _read_study(root.section("study"))
    model = _read_model(root.section("model"), base)
    workers = _read_workers(root.section("workers"))
    results = _read_results(root.section("results"), base, storage.data_dir)
    metrics = _read_metrics(root.section("metrics"))
    dicomweb = _read_dicomweb(root.section("dicomweb"), base, node, metrics)
    logging_ = _read_logging(root.section("logging"))
    sender = _read_sender(root.section("sender"), node.ae_title)
    destinations = _read_destinations(root.array("destinations"), problems, base)
    notifications = _read_notifications(root.array("notifications"), problems, base,
                                        {d.name: i for i, d in enumerate(destinations)})
    if notifications and not results.structured_report:
        problems.append("notifications: need results.structured_report = true (a "
                        "notification is queued with the study's SR, and names it)")
    root.finish()

    if problems:
        where = str(src) if src is not None else "the configuration"
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        message = "\n".join([f"{where} has {count}:", *(f"  {p}" for p in problems)])
        raise ConfigError(message, problems)
    return Config(
        node=node,
        storage=storage,
        watch=watch,
        study=study,
        model=model,
        workers=workers,
        results=results,
        metrics=metrics,
        logging=logging_,
        sender=sender,
        destinations=destinations,
        source=src,
        base_dir=base,
        notifications=notifications,
        dicomweb=dicomweb,
    )


def default_config(base_dir: str | Path | None = None) -> Config:
    """The configuration with every value at its default."""
    return validate({}, base_dir=base_dir)


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[ipv6]:port``; raises ValueError with the reason."""
    match = re.fullmatch(r"\[([0-9A-Za-z:.%]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", value)
    if not match:
        raise ValueError('"host:port", "[ipv6]:port" or "" (off)')
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError('"host:port" with a port from 1 to 65535')
    return host, port


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a systemd CPUAffinity=)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_processes(config: Config) -> int:
    """``workers.processes`` with "auto" resolved: one worker per core that the receivers
    do not need. The main process (the first receiver, the watcher and the scheduler)
    shares the cores with the workers; each extra receiver process takes one. 0: none
    (``cxrd serve`` on a receiving node whose jobs other nodes' ``cxrd worker`` do)."""
    if config.workers.processes is not None:
        return config.workers.processes
    return max(1, usable_cpus() - (config.node.receivers - 1))


def worker_threads(config: Config) -> int:
    """onnxruntime's intra-op threads per worker: ``model.intra_op_threads``, or the
    cores shared out among the workers (never more threads than cores in all)."""
    if config.model.intra_op_threads:
        return config.model.intra_op_threads
    return max(1, usable_cpus() // max(1, worker_processes(config)))


def describe(config: Config) -> dict[str, Any]:
    """A JSON-serialisable view of ``config`` for ``cxrd status`` and ``check-config``.

    Paths are strings, derived paths are included, and a password in a database URL is
    masked. TLS entries show the file paths, never their contents.
    """
    view: dict[str, Any] = {
        "source": str(config.source) if config.source is not None else None,
        "base_dir": str(config.base_dir),
    }
    for f in fields(config):
        if f.name not in ("source", "base_dir"):
            view[f.name] = _plain(getattr(config, f.name))
    storage = view["storage"]
    storage["database_url"] = _mask_url(config.storage.database_url)
    storage["database_url_resolved"] = _mask_url(config.storage.database_url_resolved)
    storage["incoming_dir"] = str(config.storage.incoming_dir)
    storage["spool_dir"] = str(config.storage.spool_dir)
    storage["rejected_dir"] = str(config.storage.rejected_dir)
    from cxrd.store import store_location

    storage["store_location"] = store_location(config)
    view["results"]["results_dir"] = str(config.results.results_dir)
    view["results"]["sr_sop_class_uid"] = config.results.sr_sop_class.uid
    view["model"]["uses_embedded_model"] = config.model.uses_embedded_model
    view["workers"]["processes"] = config.workers.processes or "auto"
    view["workers"]["processes_resolved"] = worker_processes(config)
    view["workers"]["intra_op_threads_resolved"] = worker_threads(config)
    view["metrics"]["enabled"] = config.metrics.enabled
    view["dicomweb"]["enabled"] = config.dicomweb.enabled
    return view


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in fields(value)
            if f.metadata.get("describe", True)
        }
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _mask_url(url: str) -> str:
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


# --------------------------------------------------------------------------- reading


def _kind(value: Any) -> str:
    """The TOML name of a value's type, for type-error messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__  # TOML dates and times


def _show(value: Any) -> str:
    """A value as it would be written in TOML-ish form, shortened."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggest(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice to a misspelt word, ignoring case, or None."""
    by_lower = {c.lower(): c for c in choices}
    matches = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[matches[0]] if matches else None


def _resolve(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


_E = TypeVar("_E", bound=StrEnum)


class _Table:
    """One TOML table being read.

    The getters record a problem and fall back to the default on a wrong type, so
    reading goes on and every problem is found. Keys read are remembered; ``finish``
    reports the rest as unknown.
    """

    def __init__(self, problems: list[str], prefix: str, data: Mapping[str, Any]) -> None:
        self.problems = problems
        self.prefix = prefix
        self.data = data
        self.known: list[str] = []

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}"

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{self.name(key)}: {text}")

    def bad(self, key: str, value: Any, expected: str) -> None:
        self.problem(key, f"{_show(value)} is not allowed; expected {expected}")

    def _raw(self, key: str, expected: str, required: bool) -> tuple[bool, Any]:
        self.known.append(key)
        if key not in self.data:
            if required:
                self.problem(key, f"missing; this key is required ({expected})")
            return False, None
        return True, self.data[key]

    def _typed(
        self, key: str, expected: str, required: bool, ok: type | tuple[type, ...]
    ) -> tuple[bool, Any]:
        present, value = self._raw(key, expected, required)
        if not present:
            return False, None
        if isinstance(value, bool) and bool not in (ok if isinstance(ok, tuple) else (ok,)):
            ok_type = False
        else:
            ok_type = isinstance(value, ok)
        if not ok_type:
            self.problem(key, f"expected {expected}, got {_kind(value)} {_show(value)}")
            return False, None
        return True, value

    def string(self, key: str, default: str, *, required: bool = False) -> str:
        present, value = self._typed(key, "a string", required, str)
        return value if present else default

    def choice(self, key: str, default: _E) -> _E:
        """One of a StrEnum's values; a wrong one is reported with the values allowed and
        the nearest, and the default is kept."""
        kind = type(default)
        text = self.string(key, default.value)
        try:
            return kind(text)
        except ValueError:
            allowed = ", ".join(f'"{c.value}"' for c in kind)
            hint = _suggest(text, [c.value for c in kind])
            self.bad(key, text, f"one of {allowed}" + (f'; did you mean "{hint}"?'
                                                        if hint else ""))
            return default

    def boolean(self, key: str, default: bool) -> bool:
        present, value = self._typed(key, "a boolean (true or false)", False, bool)
        return value if present else default

    def integer(
        self,
        key: str,
        default: int,
        *,
        low: int | None = None,
        high: int | None = None,
        allowed: str = "",
        required: bool = False,
    ) -> int:
        present, value = self._typed(key, "an integer", required, int)
        if not present:
            return default
        if (low is not None and value < low) or (high is not None and value > high):
            self.bad(key, value, allowed or _range_text("an integer", low, high))
            return default
        return int(value)

    def number(self, key: str, default: float, *, low: float, strict: bool = False) -> float:
        """A float or integer that is finite and at least ``low`` (above it if strict)."""
        present, value = self._typed(key, "a number", False, (int, float))
        if not present:
            return default
        number = float(value)
        too_low = number <= low if strict else number < low
        if not math.isfinite(number) or too_low:
            relation = "greater than" if strict else "at least"
            self.bad(key, value, f"a number {relation} {low:g}")
            return default
        return number

    def strings(
        self,
        key: str,
        default: tuple[str, ...],
        check: Callable[[str, str], None] | None = None,
    ) -> tuple[str, ...]:
        """An array of strings. ``check(where, item)`` is called for each string item,
        ``where`` naming it (``node.allowed_callers[2]``) for its messages."""
        present, value = self._typed(key, "an array of strings", False, list)
        if not present:
            return default
        items: list[str] = []
        for i, item in enumerate(value):
            where = f"{self.name(key)}[{i}]"
            if not isinstance(item, str):
                self.problems.append(f"{where}: expected a string, got {_kind(item)} {_show(item)}")
            else:
                if check is not None:
                    check(where, item)
                items.append(item)
        return tuple(items)

    def path(
        self,
        key: str,
        base: Path,
        *,
        expected: str,
        kind: Literal["file", "dir"],
        must_exist: bool = False,
    ) -> Path | None:
        """A path resolved against ``base``, or None when missing or "". When it exists
        it must be of ``kind``; ``must_exist`` also reports a path that is not there."""
        text = self.string(key, "")
        if not text:
            return None
        resolved = _resolve(base, text)
        shown = _show(text) + (f" (resolved to {resolved})" if str(resolved) != text else "")
        if must_exist and not resolved.exists():
            self.problem(key, f"{shown} does not exist; expected {expected}")
        elif kind == "file" and resolved.exists() and not resolved.is_file():
            self.problem(key, f"{shown} is not a file; expected {expected}")
        elif kind == "dir" and resolved.exists() and not resolved.is_dir():
            self.problem(key, f"{shown} is not a directory; expected {expected}")
        return resolved

    def table(self, key: str) -> Mapping[str, Any] | None:
        present, value = self._typed(key, "a table", False, dict)
        return value if present else None

    def finish(self) -> None:
        for key in self.data:
            if key in self.known:
                continue
            hint = _suggest(key, self.known)
            if hint:
                self.problem(key, f'unknown key; did you mean "{hint}"?')
            else:
                self.problem(key, f"unknown key; allowed keys: {', '.join(self.known)}")


def _range_text(what: str, low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"{what} from {low} to {high}"
    if low is not None:
        return f"{what} of at least {low}"
    return f"{what} of at most {high}"


class _Root:
    """The top level: sections (tables) and the ``destinations`` array of tables."""

    SECTIONS = (
        "node",
        "storage",
        "watch",
        "study",
        "model",
        "workers",
        "results",
        "metrics",
        "dicomweb",
        "logging",
        "sender",
        "destinations",
        "notifications",
    )

    def __init__(self, problems: list[str], data: Mapping[str, Any]) -> None:
        self.problems = problems
        self.data = data
        self.tables: list[_Table] = []

    def section(self, name: str) -> _Table:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            self.problems.append(
                f"{name}: expected a table ([{name}]), got {_kind(value)} {_show(value)}"
            )
            value = {}
        table = _Table(self.problems, name, value)
        self.tables.append(table)
        return table

    def array(self, name: str) -> list[Mapping[str, Any]]:
        value = self.data.get(name, [])
        if isinstance(value, dict):
            self.problems.append(
                f"{name}: expected an array of tables (write [[{name}]], not [{name}])"
            )
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problems.append(
                f"{name}: expected an array of tables ([[{name}]]), got {_show(value)}"
            )
            return []
        return value

    def finish(self) -> None:
        for table in self.tables:
            table.finish()
        # A key placed above the first [section] lands at the top level; say where it goes.
        owners: dict[str, list[str]] = {}
        for table in self.tables:
            for key in table.known:
                owners.setdefault(key, []).append(table.prefix)
        for key in self.data:
            if key in self.SECTIONS:
                continue
            if key in owners:
                where = " or ".join(f"[{s}]" for s in owners[key])
                self.problems.append(f"{key}: unknown section; this key belongs under {where}")
                continue
            hint = _suggest(key, self.SECTIONS)
            if hint:
                self.problems.append(f"{key}: unknown section; did you mean [{hint}]?")
            else:
                self.problems.append(
                    f"{key}: unknown section; allowed sections: {', '.join(self.SECTIONS)}"
                )


# --------------------------------------------------------------------------- value checks


def _ae_title_problem(value: str) -> str | None:
    if not 1 <= len(value) <= 16:
        return f"{len(value)} characters"
    if not value.strip(" "):
        return "all spaces"
    if "\\" in value:
        return "contains a backslash"
    if any(not (" " <= ch <= "~") for ch in value):
        return "contains a control or non-ASCII character"
    return None


def _check_ae(table: _Table, key: str, value: str) -> None:
    reason = _ae_title_problem(value)
    if reason:
        table.bad(key, value, f"an AE title of {_AE_ALLOWED} ({reason})")


def _check_host(table: _Table, key: str, value: str) -> None:
    if not value.strip():
        table.bad(key, value, "a host name or IP address (not empty)")
    elif any(ch.isspace() or not ch.isprintable() for ch in value):
        table.bad(key, value, "a host name or IP address without spaces")


def _read_tls(parent: _Table, base: Path, *, server: bool) -> TlsConfig | None:
    raw = parent.table("tls")
    if raw is None:
        return None
    t = _Table(parent.problems, parent.name("tls"), raw)
    pem = "an existing PEM file"
    certificate = t.path("certificate", base, expected=pem, kind="file", must_exist=True)
    key = t.path("key", base, expected=pem, kind="file", must_exist=True)
    ca = t.path(
        "ca", base, expected=pem + " of trusted CA certificates", kind="file", must_exist=True
    )
    require = t.boolean("require_client_cert", False)
    t.finish()
    if certificate is not None and key is None:
        t.problem("key", f"missing; {t.name('certificate')} and {t.name('key')} go together")
    elif key is not None and certificate is None:
        t.problem(
            "certificate", f"missing; {t.name('certificate')} and {t.name('key')} go together"
        )
    elif server and certificate is None:
        t.problem("certificate", "missing; a TLS server needs its certificate and key")
    if require and not server:
        t.bad("require_client_cert", require, "false; it applies only to node.tls")
    elif require and ca is None:
        t.bad("require_client_cert", require, f"false unless {t.name('ca')} is given")
    return TlsConfig(certificate=certificate, key=key, ca=ca, require_client_cert=require)


#: ``[node] id``: it begins lease owners (``id:pid:...``), so no ":", and is logged bare.
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _read_node(t: _Table, base: Path) -> NodeConfig:
    d = NodeConfig()
    node_id = t.string("id", d.id)
    if not _NODE_ID.fullmatch(node_id):
        t.bad("id", node_id, "1-64 letters, digits, '.', '_' or '-', starting with a letter "
              "or digit")
        node_id = d.id
    ae_title = t.string("ae_title", d.ae_title)
    _check_ae(t, "ae_title", ae_title)
    host = t.string("host", d.host)
    _check_host(t, "host", host)
    port = t.integer("port", d.port, low=1, high=65535)

    def check_caller(where: str, entry: str) -> None:
        ae, sep, caller_host = entry.rpartition("@")
        if not sep:
            ae = entry
        reason = _ae_title_problem(ae)
        if sep and not caller_host.strip():
            reason = "empty host after @"
        if reason:
            t.problems.append(
                f"{where}: {_show(entry)} is not allowed; expected "
                f'"AE" or "AE@host", the AE title {_AE_ALLOWED} ({reason})'
            )

    callers = t.strings("allowed_callers", d.allowed_callers, check_caller)
    tls = _read_tls(t, base, server=True)
    max_pdu = t.integer("max_pdu", d.max_pdu)
    if max_pdu != 0 and not _MIN_PDU <= max_pdu <= _MAX_PDU_LIMIT:
        t.bad("max_pdu", max_pdu, f"0 (unlimited) or {_MIN_PDU} to {_MAX_PDU_LIMIT} bytes")
        max_pdu = d.max_pdu
    receivers = t.integer("receivers", d.receivers, low=1, high=256)
    return NodeConfig(
        ae_title=ae_title,
        host=host,
        port=port,
        allowed_callers=callers,
        tls=tls,
        max_pdu=max_pdu,
        receivers=receivers,
        id=node_id,
    )


def _read_storage(t: _Table, base: Path) -> StorageConfig:
    text = t.string("data_dir", "./cxrd-data")
    if not text.strip():
        t.bad("data_dir", text, "a directory path (not empty)")
        text = "./cxrd-data"
    data_dir = _resolve(base, text)
    if data_dir.exists() and not data_dir.is_dir():
        t.problem("data_dir", f"{_show(text)} ({data_dir}) exists and is not a directory")
    url = t.string("database_url", "")
    if url and not re.match(r"(sqlite://|postgresql(\+[A-Za-z0-9_]+)?://)", url):
        t.bad(
            "database_url",
            _mask_url(url),
            '"" (SQLite in data_dir), "sqlite:///PATH" or "postgresql://..." '
            '(also "postgresql+DRIVER://...")',
        )
    elif url.startswith("sqlite:///"):
        url = _resolve_sqlite_url(url, base)
    min_free_mb = t.integer("min_free_mb", DEFAULT_MIN_FREE_MB, low=0, high=2**40)
    retention_days = t.integer("retention_days", 0, low=0, high=36500,
                               allowed="a whole number of days from 0 (keep for ever) to 36500")
    store = _read_store(t, base)
    endpoint = t.string("s3_endpoint_url", "")
    if endpoint:
        problem = _endpoint_problem(endpoint)
        if problem:
            t.bad("s3_endpoint_url", _mask_url(endpoint), problem)
            endpoint = ""
    _refuse_credentials(t)
    return StorageConfig(data_dir=data_dir, database_url=url, min_free_mb=min_free_mb,
                         retention_days=retention_days, store=store,
                         s3_endpoint_url=endpoint)


def _read_store(t: _Table, base: Path) -> str:
    """``[storage] store``: "", an S3 URL checked by ``cxrd.store.parse_s3_url``, or a
    folder resolved against ``base`` (absolute in the Config)."""
    text = t.string("store", "")
    if not text:
        return ""
    if text.startswith("s3://"):
        from cxrd.store import parse_s3_url

        try:
            parse_s3_url(text)
        except ValueError as exc:
            t.bad("store", text, f's3://bucket or s3://bucket/prefix ({exc})')
            return ""
        return text
    if "://" in text:
        t.bad("store", text, '"" (data_dir), a folder path, or "s3://bucket[/prefix]"')
        return ""
    folder = _resolve(base, text)
    if folder.exists() and not folder.is_dir():
        t.problem("store", f"{_show(text)} ({folder}) exists and is not a directory")
        return ""
    return str(folder)


def _endpoint_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) endpoint URL without credentials, or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        return "an http:// or https:// URL, e.g. \"http://127.0.0.1:9000\""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "an http:// or https:// URL with a host, e.g. \"http://127.0.0.1:9000\""
    if parts.username or parts.password:
        return ("a URL without user or password: credentials come from the AWS "
                "environment variables or files only")
    if parts.query or parts.fragment:
        return "a URL without query or fragment"
    return None


#: Key names in [storage] that look like credentials: refused with their own message.
_CREDENTIAL_KEY = re.compile(
    r"(access|secret|token|password|passwd|credential|aws_|(^|_)key$|profile)", re.I)


def _refuse_credentials(t: _Table) -> None:
    """Refuse credential-like keys in ``[storage]``: credentials are never read from the
    TOML file (which is often world-readable and copied around), only from the standard
    AWS environment variables and files. The value is never shown."""
    for key in t.data:
        if key in t.known or not _CREDENTIAL_KEY.search(key):
            continue
        t.known.append(key)  # reported here, not again as an unknown key
        t.problem(key, "credentials are not read from the configuration file; set "
                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) "
                       "in the environment, or a profile in ~/.aws/credentials "
                       "(AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE)")


def _resolve_sqlite_url(url: str, base: Path) -> str:
    """Make a relative SQLite file path absolute against ``base``, like other paths."""
    rest = url[len("sqlite:///") :]
    path, sep, query = rest.partition("?")
    if not path or path == ":memory:" or path.startswith("/"):
        return url
    return f"sqlite:///{_resolve(base, path)}{sep}{query}"


def _read_watch(t: _Table, base: Path) -> WatchConfig:
    d = WatchConfig()

    def check_folder(where: str, text: str) -> None:
        if not text.strip():
            t.problems.append(f"{where}: {_show(text)} is not allowed; expected a folder path")
            return
        folder = _resolve(base, text)
        if folder.exists() and not folder.is_dir():
            t.problems.append(
                f"{where}: {_show(text)} ({folder}) is not allowed; expected a directory"
            )

    texts = t.strings("folders", (), check_folder)
    folders = [_resolve(base, text) for text in texts if text.strip()]
    settle = t.number("settle_seconds", d.settle_seconds, low=0)
    return WatchConfig(folders=tuple(folders), settle_seconds=settle)


def _read_study(t: _Table) -> StudyConfig:
    d = StudyConfig()
    return StudyConfig(
        stable_seconds=t.number("stable_seconds", d.stable_seconds, low=0, strict=True),
        classify_on_arrival=t.boolean("classify_on_arrival", d.classify_on_arrival),
    )


def _read_model(t: _Table, base: Path) -> ModelConfig:
    d = ModelConfig()
    path = t.path(
        "path",
        base,
        expected='an existing ONNX model file, or "" for the embedded demo model',
        kind="file",
        must_exist=True,
    )
    seen: set[str] = set()

    def check_provider(where: str, name: str) -> None:
        if name not in KNOWN_PROVIDERS:
            hint = _suggest(name, KNOWN_PROVIDERS)
            text = f'did you mean "{hint}"?' if hint else f"allowed: {', '.join(KNOWN_PROVIDERS)}"
            t.problems.append(f"{where}: {_show(name)} is not an onnxruntime provider; {text}")
        elif name in seen:
            t.problems.append(f"{where}: {_show(name)} is listed twice; list each provider once")
        seen.add(name)

    providers = t.strings("providers", d.providers, check_provider)
    if t.data.get("providers") == []:
        t.bad("providers", [], f"a non-empty array of {', '.join(KNOWN_PROVIDERS)}")
    if not providers:
        providers = d.providers
    threads = t.integer(
        "intra_op_threads",
        d.intra_op_threads,
        low=0,
        high=1024,
        allowed="an integer from 0 (onnxruntime's default) to 1024",
    )
    require_cuda = t.boolean("require_cuda", d.require_cuda)
    if require_cuda and "CUDAExecutionProvider" not in providers:
        t.bad("require_cuda", True, 'false, or list "CUDAExecutionProvider" in providers')
    segmenter_off = t.data.get("segmenter") == "off"
    segmenter = None
    if segmenter_off:
        t.known.append("segmenter")
    else:
        segmenter = t.path(
            "segmenter",
            base,
            expected='an existing ONNX segmentation model file, "" for the embedded demo '
                     'segmenter, or "off"',
            kind="file",
            must_exist=True,
        )
    min_lung_fraction = t.number("min_lung_fraction", d.min_lung_fraction, low=0)
    if min_lung_fraction >= 1:
        t.bad("min_lung_fraction", t.data.get("min_lung_fraction"),
              "a fraction of the image from 0 (no gate) to below 1")
        min_lung_fraction = d.min_lung_fraction
    return ModelConfig(path=path, providers=providers, intra_op_threads=threads,
                       require_cuda=require_cuda, segmenter=segmenter,
                       segmenter_off=segmenter_off, min_lung_fraction=min_lung_fraction)


def _read_workers(t: _Table) -> WorkersConfig:
    d = WorkersConfig()
    processes: int | None = None
    if t.data.get("processes") == "auto":
        t.known.append("processes")
    elif "processes" in t.data:  # 0: a node that runs no workers (cxrd serve only)
        processes = t.integer("processes", -1, low=0, high=1024,
                              allowed='"auto" or an integer from 0 to 1024')
        processes = None if processes < 0 else processes
    return WorkersConfig(
        processes=processes,
        batch_size=t.integer("batch_size", d.batch_size, low=1, high=256),
        lease_seconds=t.number("lease_seconds", d.lease_seconds, low=0, strict=True),
        max_attempts=t.integer("max_attempts", d.max_attempts, low=1, high=1000),
        retry_backoff_seconds=t.number("retry_backoff_seconds", d.retry_backoff_seconds, low=0),
    )


def _read_results(t: _Table, base: Path, data_dir: Path) -> ResultsConfig:
    d = ResultsConfig(data_dir=data_dir)
    folder = t.path("folder", base, expected='a directory, or "" for data_dir/results', kind="dir")
    structured_report = t.boolean("structured_report", d.structured_report)
    heatmap = t.boolean("heatmap_secondary_capture", d.heatmap_secondary_capture)
    heatmap_max_side = t.integer("heatmap_max_side", d.heatmap_max_side, low=256, high=4096)
    heatmap_compression = t.choice("heatmap_compression", d.heatmap_compression)
    segmentation = t.boolean("segmentation", d.segmentation)
    parametric_map = t.boolean("parametric_map", d.parametric_map)
    if parametric_map:
        # The Parametric Map IOD requires a Frame of Reference (patient coordinates), which
        # projection radiographs (CR/DX) do not have; highdicom refuses to build one too.
        t.bad("parametric_map", parametric_map,
              "false: a Parametric Map needs a frame of reference that CR/DX images lack; "
              "the heatmap Secondary Capture and the SR's region carry the CAM")
    sr_sop_class = t.choice("sr_sop_class", d.sr_sop_class)
    lung_margin = t.number("lung_margin", d.lung_margin, low=0)
    if lung_margin > MAX_LUNG_MARGIN:
        t.bad("lung_margin", t.data["lung_margin"],
              f"a number from 0 to {MAX_LUNG_MARGIN:g} (a fraction of the image side; "
              f"wider lets evidence from the shoulders or the abdomen in)")
        lung_margin = d.lung_margin
    return ResultsConfig(
        data_dir=data_dir,
        folder=folder,
        structured_report=structured_report,
        heatmap_secondary_capture=heatmap,
        heatmap_max_side=heatmap_max_side,
        heatmap_compression=heatmap_compression,
        segmentation=segmentation,
        parametric_map=parametric_map,
        sr_sop_class=sr_sop_class,
        lung_margin=lung_margin,
    )


def _read_metrics(t: _Table) -> MetricsConfig:
    d = MetricsConfig()
    listen = t.string("listen", d.listen)
    if listen:
        try:
            parse_listen(listen)
        except ValueError as exc:
            t.bad("listen", listen, str(exc))
            listen = d.listen
    return MetricsConfig(listen=listen)


_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")


def _same_socket(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two listeners would take the same port (same host, or either on all)."""
    return a[1] == b[1] and (a[0] == b[0] or a[0] in _WILDCARD_HOSTS
                             or b[0] in _WILDCARD_HOSTS)


def _read_dicomweb(t: _Table, base: Path, node: NodeConfig,
                   metrics: MetricsConfig) -> DicomwebConfig:
    """``[dicomweb]``: ``listen`` as ``[metrics] listen``; a token file required while it
    is set (whether the file is readable and not empty is ``cxrd.preflight``'s check)."""
    d = DicomwebConfig()
    listen = t.string("listen", d.listen)
    if listen:
        try:
            where = parse_listen(listen)
        except ValueError as exc:
            t.bad("listen", listen, str(exc))
            listen = d.listen
        else:
            if _same_socket(where, (node.host, node.port)):
                t.bad("listen", listen, f"a port other than the DICOM port (node.port "
                                        f"{node.port})")
            elif metrics.listen and _same_socket(where, parse_listen(metrics.listen)):
                t.bad("listen", listen, f"a port other than metrics.listen's "
                                        f"({metrics.listen})")
    secret = "an existing file that holds the bearer token (its trailing newline is ignored)"
    # Whether it exists, is readable and holds a token: cxrd.preflight (one line, at start).
    token_file = t.path("token_file", base, expected=secret, kind="file")
    if listen and token_file is None and isinstance(t.data.get("token_file", ""), str):
        t.problem("token_file", "missing or empty; required while dicomweb.listen is set (callers "
                                "must present this bearer token: no token, no entry)")
    max_mb = t.integer("max_request_mb", d.max_request_mb, low=1, high=1024 * 1024)
    return DicomwebConfig(listen=listen, token_file=token_file, max_request_mb=max_mb)


def _read_logging(t: _Table) -> LoggingConfig:
    d = LoggingConfig()
    level = t.string("level", d.level)
    if level.upper() not in LOG_LEVELS:
        t.bad("level", level, f"one of {', '.join(LOG_LEVELS)}")
        level = d.level
    fmt_text = t.string("format", d.format.value)
    try:
        fmt = LogFormat(fmt_text)
    except ValueError:
        t.bad("format", fmt_text, '"text" or "json"')
        fmt = d.format
    return LoggingConfig(level=level.upper(), format=fmt)


def _read_sender(t: _Table, node_ae_title: str) -> SenderConfig:
    d = SenderConfig()
    calling_ae = t.string("calling_ae", "")
    if "calling_ae" in t.data and isinstance(t.data["calling_ae"], str):
        _check_ae(t, "calling_ae", calling_ae)
    initial = t.number("initial_backoff_seconds", d.initial_backoff_seconds, low=0, strict=True)
    maximum = t.number("max_backoff_seconds", d.max_backoff_seconds, low=0, strict=True)
    if maximum < initial:
        t.bad(
            "max_backoff_seconds",
            t.data.get("max_backoff_seconds", maximum),
            f"at least {t.name('initial_backoff_seconds')} ({initial:g})",
        )
    return SenderConfig(
        calling_ae=calling_ae or node_ae_title,
        max_age_hours=t.number("max_age_hours", d.max_age_hours, low=0, strict=True),
        initial_backoff_seconds=initial,
        max_backoff_seconds=maximum,
        dimse_timeout_seconds=t.number("dimse_timeout_seconds", d.dimse_timeout_seconds,
                                       low=0, strict=True),
    )


#: The keys of a C-STORE destination and those of a STOW-RS one.
_CSTORE_KEYS = ("ae_title", "host", "port")
_STOW_KEYS = ("url", "token_file", "token_env", "username", "password_file", "password_env")
#: Keys that would put a secret inline: refused with their own message, value never shown.
_INLINE_SECRETS = {"token": "token_file or token_env", "password": "password_file or "
                   "password_env", "bearer_token": "token_file or token_env",
                   "access_token": "token_file or token_env"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _entry_name(t: _Table, entry: Mapping[str, Any], i: int, section: str,
                first_use: dict[str, int],
                destination_names: Mapping[str, int] | None = None) -> str:
    """Entry ``i`` of ``section``'s required ``name``: not empty, unique in the section
    (``first_use``: the index that has each name, updated here) and, for notifications,
    among the destinations' names too (a delivery row names either)."""
    name = t.string("name", "", required=True)
    if "name" in entry and isinstance(entry["name"], str):
        if not name.strip():
            t.bad("name", name, "a non-empty name")
        elif destination_names is not None and name in destination_names:
            t.bad("name", name, "a name no destination has (destinations"
                                f"[{destination_names[name]}] has it already; "
                                "notifications and destinations share one namespace)")
        elif name in first_use:
            t.bad("name", name,
                  f"a unique name ({section}[{first_use[name]}] has it already)")
        else:
            first_use[name] = i
    return name


def _read_destinations(
    entries: list[Mapping[str, Any]], problems: list[str], base: Path
) -> tuple[DestinationConfig, ...]:
    result: list[DestinationConfig] = []
    first_use: dict[str, int] = {}
    for i, entry in enumerate(entries):
        t = _Table(problems, f"destinations[{i}]", entry)
        name = _entry_name(t, entry, i, "destinations", first_use)
        if not any(key in entry for key in (*_CSTORE_KEYS, "url")):
            t.problem("url", "missing; a destination needs url (STOW-RS: the DICOMweb base "
                             "URL) or ae_title, host and port (C-STORE)")
            t.known.extend(("url", *_CSTORE_KEYS))
            dest = DestinationConfig(name=name)
        elif "url" in entry:
            dest = _read_stow_destination(t, entry, name, base)
        else:
            dest = _read_cstore_destination(t, entry, name, base)
        t.finish()
        result.append(dest)
    return tuple(result)


def _read_cstore_destination(t: _Table, entry: Mapping[str, Any], name: str,
                             base: Path) -> DestinationConfig:
    ae_title = t.string("ae_title", "", required=True)
    if "ae_title" in entry and isinstance(entry["ae_title"], str):
        _check_ae(t, "ae_title", ae_title)
    host = t.string("host", "", required=True)
    if "host" in entry and isinstance(entry["host"], str):
        _check_host(t, "host", host)
    port = t.integer("port", 104, low=1, high=65535, required=True)
    tls = _read_tls(t, base, server=False)
    _refuse_inline_secrets(t)
    for key in _STOW_KEYS[1:]:
        if key in entry:
            t.known.append(key)
            t.problem(key, f"applies only to a STOW-RS destination (one with url); "
                           f"{t.prefix} is a C-STORE destination (ae_title, host, port)")
    return DestinationConfig(name=name, ae_title=ae_title, host=host, port=port, tls=tls)


def _read_stow_destination(t: _Table, entry: Mapping[str, Any], name: str,
                           base: Path) -> DestinationConfig:
    """A STOW-RS destination: ``url`` and its optional credentials, each named by a file
    or an environment variable (whether the variable is set, and the file readable and not
    empty, is checked by ``cxrd.preflight`` where the node sends)."""
    both = [key for key in _CSTORE_KEYS if key in entry]
    for key in both:
        t.known.append(key)
        t.problem(key, "not allowed with url: a destination is either STOW-RS (url) or "
                       "C-STORE (ae_title, host, port), not both")
    url = t.string("url", "", required=True)
    if isinstance(entry.get("url"), str):
        problem = _dicomweb_url_problem(url)
        if problem:
            t.bad("url", _mask_url(url), problem)
            url = ""
    url = url.rstrip("/")
    tls = _read_tls(t, base, server=False)
    if tls is not None and url.startswith("http://"):
        t.problem("tls", f"applies to an https:// url; {t.name('url')} is http://")
    secret = "an existing file that holds the secret (its trailing newline is ignored)"
    token_file = t.path("token_file", base, expected=secret, kind="file", must_exist=True)
    token_env = _env_name(t, "token_env")
    username = t.string("username", "")
    if "username" in entry and isinstance(entry["username"], str) and (
            not username or ":" in username or not username.isprintable()):
        t.bad("username", username, "a user name without ':' or control characters")
    password_file = t.path("password_file", base, expected=secret, kind="file",
                           must_exist=True)
    password_env = _env_name(t, "password_env")
    _refuse_inline_secrets(t)
    if token_file is not None and token_env:
        t.problem("token_env", f"not allowed with {t.name('token_file')}; name the token "
                               "once, in a file or in an environment variable")
    if password_file is not None and password_env:
        t.problem("password_env", f"not allowed with {t.name('password_file')}; name the "
                                  "password once, in a file or in an environment variable")
    has_password = password_file is not None or bool(password_env)
    if username and not has_password:
        t.problem("username", f"needs {t.name('password_file')} or "
                              f"{t.name('password_env')} (basic auth)")
    elif has_password and not username:
        t.problem("password_file" if password_file is not None else "password_env",
                  f"needs {t.name('username')} (basic auth)")
    if (token_file is not None or token_env) and (username or has_password):
        t.problem("username", "not allowed with a bearer token (token_file, token_env); "
                              "choose one: a bearer token or basic auth")
    return DestinationConfig(name=name, url=url, tls=tls, token_file=token_file,
                             token_env=token_env, username=username,
                             password_file=password_file, password_env=password_env)


#: The keys of each kind of notification, beside name, kind, findings and the timeouts.
_NOTIFY_KEYS: dict[NotificationKind, tuple[str, ...]] = {
    NotificationKind.WEBHOOK: ("url", "token_file", "token_env"),
    NotificationKind.HL7: ("host", "port", "receiving_application", "receiving_facility",
                           "sending_facility"),
}
#: HL7 v2 HD components (MSH-4 to MSH-6): no delimiter, no control character.
_HL7_DELIMITERS = set("|^~\\&\r\n")


def _read_notifications(entries: list[Mapping[str, Any]], problems: list[str], base: Path,
                        destination_names: Mapping[str, int]
                        ) -> tuple[NotificationConfig, ...]:
    """``[[notifications]]``: each one's kind and the keys of that kind; names unique
    among notifications and destinations together (a delivery row names either)."""
    result: list[NotificationConfig] = []
    first_use: dict[str, int] = {}
    for i, entry in enumerate(entries):
        t = _Table(problems, f"notifications[{i}]", entry)
        name = _entry_name(t, entry, i, "notifications", first_use, destination_names)
        allowed = " or ".join(f'"{k.value}"' for k in NotificationKind)
        kind_text = t.string("kind", "")
        kind: NotificationKind | None = None
        if "kind" not in entry:
            t.problem("kind", 'missing; a notification needs kind "webhook" (with url) or '
                              '"hl7" (with host and port)')
        if "kind" in entry and isinstance(entry["kind"], str):
            try:
                kind = NotificationKind(kind_text)
            except ValueError:
                hint = _suggest(kind_text, [k.value for k in NotificationKind])
                t.bad("kind", kind_text, f"{allowed}" + (f'; did you mean "{hint}"?'
                                                         if hint else ""))
        findings = _notification_findings(t)
        d = NotificationConfig(name=name)
        connect = t.number("connect_timeout_seconds", d.connect_timeout_seconds, low=0,
                           strict=True)
        timeout = t.number("timeout_seconds", d.timeout_seconds, low=0, strict=True)
        _refuse_inline_secrets(t)
        common = {"name": name, "findings": findings, "connect_timeout_seconds": connect,
                  "timeout_seconds": timeout}
        if kind is None:
            t.known.extend(k for keys in _NOTIFY_KEYS.values() for k in keys)
            t.finish()
            continue
        for other, keys in _NOTIFY_KEYS.items():
            if other is kind:
                continue
            for key in keys:
                if key in entry and key not in _NOTIFY_KEYS[kind]:
                    t.known.append(key)
                    t.problem(key, f'applies only to kind "{other.value}"; {t.prefix} is '
                                   f'kind "{kind.value}"')
        if kind is NotificationKind.WEBHOOK:
            result.append(_read_webhook(t, entry, base, common))
        else:
            result.append(_read_hl7(t, entry, common))
        t.finish()
    return tuple(result)


def _notification_findings(t: _Table) -> tuple[str, ...]:
    default = NotificationConfig(name="").findings
    present, value = t._typed("findings", "an array of strings", False, list)
    if not present:
        return default
    allowed = ", ".join(f'"{f}"' for f in URGENT_FINDINGS)
    if not value:
        t.bad("findings", value, f"one or more of {allowed}")
        return default
    found: list[str] = []
    for item in value:
        if not isinstance(item, str) or item not in URGENT_FINDINGS:
            why = " (a NORM study is never urgent)" if item == "NORM" else ""
            t.bad("findings", value, f"one or more of {allowed}{why}")
            return default
        if item not in found:
            found.append(item)
    return tuple(found)


def _read_webhook(t: _Table, entry: Mapping[str, Any], base: Path,
                  common: Mapping[str, Any]) -> NotificationConfig:
    url = t.string("url", "")
    if "url" not in entry:
        t.problem("url", 'missing; a kind "webhook" notification needs url (where the JSON '
                         'document is posted)')
    elif isinstance(entry.get("url"), str):
        problem = _webhook_url_problem(url)
        if problem:
            t.bad("url", _mask_url(url), problem)
            url = ""
    secret = "an existing file that holds the token (its trailing newline is ignored)"
    token_file = t.path("token_file", base, expected=secret, kind="file", must_exist=True)
    token_env = _env_name(t, "token_env")
    if token_file is not None and token_env:
        t.problem("token_env", f"not allowed with {t.name('token_file')}; name the token "
                               "once, in a file or in an environment variable")
    return NotificationConfig(kind=NotificationKind.WEBHOOK, url=url, token_file=token_file,
                              token_env=token_env, **common)


def _read_hl7(t: _Table, entry: Mapping[str, Any],
              common: Mapping[str, Any]) -> NotificationConfig:
    host = t.string("host", "")
    if "host" in entry and isinstance(entry["host"], str):
        _check_host(t, "host", host)
    port = t.integer("port", 0, low=1, high=65535)
    for key in ("host", "port"):
        if key not in entry:
            t.problem(key, 'missing; a kind "hl7" notification needs host and port (its MLLP '
                           "listener)")
    names: dict[str, str] = {}
    for key in ("receiving_application", "receiving_facility", "sending_facility"):
        names[key] = t.string(key, "")
        if len(names[key]) > 180 or any(c in _HL7_DELIMITERS or not c.isprintable()
                                        for c in names[key]):
            t.bad(key, names[key], "up to 180 printable characters without the HL7 "
                                   "delimiters | ^ ~ \\ &")
            names[key] = ""
    return NotificationConfig(kind=NotificationKind.HL7, host=host, port=port,
                              receiving_application=names["receiving_application"],
                              receiving_facility=names["receiving_facility"],
                              sending_facility=names["sending_facility"], **common)


def _http_url_problem(url: str, what: str, example: str, no_user: str, *,
                      no_query: bool) -> str | None:
    """Why ``url`` is not an http(s) URL with a host (``what``, e.g. "URL"), without user
    or password (``no_user`` says where credentials go instead), fragment or (with
    ``no_query``) query; or None. The problems end with ``example``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        return f"an http:// or https:// {what}, {example}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"an http:// or https:// {what} with a host, {example}"
    if parts.username or parts.password:
        return f"a URL without user or password: {no_user}"
    if parts.fragment or (no_query and parts.query):
        return f"a URL without {'query or ' if no_query else ''}fragment, {example}"
    return None


def _webhook_url_problem(url: str) -> str | None:
    """Why ``url`` is not a URL a webhook can be posted to, or None."""
    return _http_url_problem(url, "URL", 'e.g. "https://ris.example/hooks/cxrd"',
                             "name a bearer token with token_file or token_env",
                             no_query=False)


def _env_name(t: _Table, key: str) -> str:
    text = t.string(key, "")
    if key in t.data and isinstance(t.data[key], str) and not _ENV_NAME.fullmatch(text):
        t.bad(key, text, "the name of an environment variable (letters, digits and '_', "
                         "not starting with a digit)")
        return ""
    return text


def _refuse_inline_secrets(t: _Table) -> None:
    """A token or password written in the file itself is refused, its value never shown:
    the configuration is often world-readable and copied around."""
    for key in t.data:
        if key in _INLINE_SECRETS and key not in t.known:
            t.known.append(key)
            t.problem(key, "secrets are not written in the configuration file; name a file "
                           f"or an environment variable that holds it ({_INLINE_SECRETS[key]})")


def _dicomweb_url_problem(url: str) -> str | None:
    """Why ``url`` is not a DICOMweb base URL cxrd can post to, or None."""
    from urllib.parse import urlsplit

    example = 'e.g. "https://pacs.example/dicom-web"'
    problem = _http_url_problem(url, "DICOMweb base URL", example,
                                "set username and password_file (or password_env)",
                                no_query=True)
    if problem is not None:
        return problem
    parts = urlsplit(url)
    assert parts.hostname is not None
    if ":" in parts.hostname:  # dicomweb-client's Host header would be "["
        return f"a URL with a host name or an IPv4 address (not an IPv6 literal), {example}"
    if parts.path.rstrip("/").endswith("/studies"):
        return (f"the DICOMweb base URL, without /studies (cxrd adds it), {example}")
    return None
