"""What would stop a node from doing its job, checked before it listens.

``cxrd serve`` runs these checks before the DICOM port opens and before any worker is
spawned, and refuses to start (one line per problem, naming the cause and the fix) when one
fails; ``cxrd check-config`` runs the same checks and lists every problem at once.

- the onnxruntime module is importable (the ``[cpu]`` or ``[gpu]`` extra is installed);
- the model file exists and its metadata follow the model-file contract;
- the lung-field segmenter's file (unless ``[model] segmenter = "off"``) exists and is a
  segmentation model (``cxrd.kind``);
- the database can be reached and migrated;
- the credentials of each STOW-RS destination (a token or password file, an environment
  variable) can be read, and so can the STOW-RS receiver's token (``[dicomweb]
  token_file``);
- the DICOM port (``[node] host``/``port``), the metrics port (``[metrics] listen``) and
  the STOW-RS port (``[dicomweb] listen``) can be bound. The check binds a socket and
  closes it at once; the real listeners are opened later, metrics first, and a port taken
  in between still stops the node (``Node.run`` closes whatever it opened).

``cxrd worker`` (``find_worker_problems``) runs the runtime and model checks and the
metrics port's; its database must be PostgreSQL at this cxrd's schema (a worker node never
migrates), and ``[storage] data_dir``, the folder shared with the receiving node, must exist.

``[model] require_cuda`` is checked separately, in ``Node.prepare`` (``infer.check_cuda``):
it starts a process and an inference session, too slow for ``check-config``.
"""

from __future__ import annotations

import errno
import importlib.util
import socket
from dataclasses import dataclass
from pathlib import Path

from cxrd.config import Config, DestinationConfig, NotificationConfig, parse_listen
from cxrd.errors import CxrdError

RUNTIME_MODULE = "onnxruntime"


@dataclass(frozen=True)
class Problem:
    """One reason the node cannot start: what is wrong and what to do about it."""

    check: str  # runtime, model, database, dicomweb, dicom-port, metrics-port, ...
    cause: str
    fix: str

    def __str__(self) -> str:
        return f"{self.cause}; {self.fix}"


class StartupError(CxrdError):
    """cxrd cannot start."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_runtime() -> Problem | None:
    """onnxruntime is installed (the main process does not import it: workers do)."""
    try:
        found = importlib.util.find_spec(RUNTIME_MODULE) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return Problem("runtime", "onnxruntime is not installed",
                   "install cxrd with an onnxruntime: pip install '.[cpu]' "
                   "(or '.[gpu]' on a machine with an NVIDIA GPU)")


def check_model(config: Config) -> Problem | None:
    """The model file exists and its metadata are valid (read without onnxruntime)."""
    from cxrd.infer import resolve_model_path
    from cxrd.modelinfo import read_model_info

    path = resolve_model_path(config.model.path)
    where = "[model] path" if config.model.path else "the embedded demo model"
    if not path.is_file():
        return Problem("model", f"model file {path} ({where}) does not exist",
                       "set [model] path to an .onnx file exported by training/, "
                       "or leave it empty for the demo model")
    try:
        read_model_info(path)
    except Exception as exc:  # ModelError, or what onnx raises on a damaged file
        detail = exc.__cause__ or exc  # onnx's own words when it could not parse the file
        return Problem("model", f"model file {path} ({where}) cannot be used: "
                       f"{_first_line(detail).rstrip('.')}",
                       "set [model] path to an .onnx file that follows the model-file "
                       "contract (exported by training/), or leave it empty for the demo "
                       "model")
    return None


def check_segmenter(config: Config) -> Problem | None:
    """The lung-field segmenter's file (``[model] segmenter``) exists and is a
    segmentation model whose metadata are valid; nothing to check when it is "off"."""
    from cxrd.infer import resolve_segmenter_path
    from cxrd.modelinfo import read_segmentation_info

    if not config.model.uses_segmenter:
        return None
    path = resolve_segmenter_path(config.model.segmenter)
    where = "[model] segmenter" if config.model.segmenter else "the embedded demo segmenter"
    fix = ('set [model] segmenter to an .onnx file exported by `python -m training '
           'export-seg`, "" for the demo segmenter, or "off"')
    if not path.is_file():
        return Problem("model", f"segmenter file {path} ({where}) does not exist", fix)
    try:
        read_segmentation_info(path)
    except Exception as exc:  # ModelError, or what onnx raises on a damaged file
        detail = exc.__cause__ or exc
        return Problem("model", f"segmenter file {path} ({where}) cannot be used: "
                       f"{_first_line(detail).rstrip('.')}", fix)
    return None


def check_database(config: Config) -> Problem | None:
    """The database can be reached and migrated to this cxrd's schema (the same step
    ``Node.prepare`` runs; migrating twice is a no-op)."""
    from cxrd.config import _mask_url
    from cxrd.db import Database
    from cxrd.store import key_folders

    url = config.storage.database_url_resolved
    db = None
    try:
        db = Database(url)
        db.migrate(key_folders(config))
    except ImportError as exc:  # a postgresql:// URL without the driver
        return Problem("database", f"database {_mask_url(url)} needs a driver that is not "
                       f"installed: {_first_line(exc)}",
                       "install it with pip install '.[postgres]'")
    except Exception as exc:  # sqlalchemy, the driver, or the file system
        cause = getattr(exc, "orig", None) or exc
        return Problem("database", f"database {_mask_url(url)} cannot be reached or "
                       f"migrated: {type(cause).__name__}: {_first_line(cause)}",
                       "start the database server, or correct [storage] database_url "
                       "(empty: SQLite in [storage] data_dir, which must be writable)")
    finally:
        if db is not None:
            db.dispose()
    return None


def check_worker_database(config: Config) -> Problem | None:
    """``cxrd worker``: the database is PostgreSQL (a node on another machine cannot share
    an SQLite file), can be reached, and is at this cxrd's schema. A worker node never
    migrates: the receiving node (``cxrd serve``, ``cxrd check-config``) does; a worker of
    an older cxrd than the schema, or a newer one, would read or write what it does not
    know."""
    from cxrd.config import _mask_url
    from cxrd.db import SCHEMA_VERSION, Database

    url = config.storage.database_url_resolved
    if not url.startswith("postgresql"):
        return Problem("database", "cxrd worker needs PostgreSQL ([storage] database_url): "
                       "a worker node on another machine cannot share an SQLite file",
                       "set [storage] database_url to the PostgreSQL database of the "
                       "receiving node (cxrd serve)")
    db = None
    try:
        db = Database(url)
        version = db.schema_version()
    except ImportError as exc:  # a postgresql:// URL without the driver
        return Problem("database", f"database {_mask_url(url)} needs a driver that is not "
                       f"installed: {_first_line(exc)}",
                       "install it with pip install '.[postgres]'")
    except Exception as exc:  # sqlalchemy or the driver
        cause = getattr(exc, "orig", None) or exc
        return Problem("database", f"database {_mask_url(url)} cannot be reached: "
                       f"{type(cause).__name__}: {_first_line(cause)}",
                       "start the database server, or correct [storage] database_url")
    finally:
        if db is not None:
            db.dispose()
    if version < SCHEMA_VERSION:
        return Problem("database", f"database {_mask_url(url)} is at schema version "
                       f"{version}, this cxrd needs {SCHEMA_VERSION} (a worker node never "
                       "migrates)",
                       "start cxrd serve (or run cxrd check-config) of this version on the "
                       "receiving node first, which migrates it")
    if version > SCHEMA_VERSION:
        return Problem("database", f"database {_mask_url(url)} is at schema version "
                       f"{version}, newer than this cxrd's {SCHEMA_VERSION}",
                       "upgrade cxrd on this node to the receiving node's version")
    return None


def check_store(config: Config) -> Problem | None:
    """An S3 store (``[storage] store = "s3://..."``) answers and its bucket may be used
    (``S3Store.check``: one HEAD of the bucket); None for a local store, whose folders the
    node makes. The message names the store and the endpoint, never a credential."""
    from cxrd.errors import StoreError, StoreFailed
    from cxrd.store import open_node_store

    if not config.storage.store.startswith("s3://"):
        return None
    try:
        objects = open_node_store(config)
        objects.check()
    except StoreError as exc:
        fix = ("create the bucket, or correct [storage] store, and give this node's "
               "credentials access to it (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
               "a profile in ~/.aws/credentials)" if isinstance(exc, StoreFailed) else
               "start the object store, or correct [storage] s3_endpoint_url")
        return Problem("storage", f"store {config.storage.store} cannot be used: "
                       f"{_first_line(exc)}", fix)
    except Exception as exc:  # boto3 missing, a bad region: not the store's answer
        return Problem("storage", f"store {config.storage.store} cannot be opened: "
                       f"{type(exc).__name__}: {_first_line(exc)}",
                       "install boto3 (it comes with cxrd), or correct [storage] store")
    return None


def check_shared_folder(config: Config) -> Problem | None:
    """``cxrd worker``: the objects the receiving node stores are reachable. With the
    default store (``[storage] store = ""``) ``[storage] data_dir`` is the folder shared
    with the receiving node, at the same path; with a folder store, that folder (a shared
    mount) must exist: a worker node that made a local one would fail every image it
    cannot find. With S3 the bucket must answer (``check_store``) and ``data_dir`` is this
    node's own (made when missing)."""
    store = config.storage.store
    if store.startswith("s3://"):
        return check_store(config)
    if store:
        if Path(store).is_dir():
            return None
        return Problem("storage", f"[storage] store {store} does not exist",
                       "mount the store folder shared with the receiving node, then start "
                       "cxrd worker again")
    data_dir = config.storage.data_dir
    if data_dir.is_dir():
        return None
    return Problem("storage", f"[storage] data_dir {data_dir} does not exist",
                   "mount the folder shared with the receiving node at the same path "
                   "(the data_dir of its cxrd serve), then start cxrd worker again")


def check_destinations(config: Config) -> list[Problem]:
    """The credentials of each STOW-RS destination and webhook notification can be read
    now: the file the
    configuration names is readable and not empty, the environment variable is set (the
    sender reads them again at each pass; one missing then holds that destination's
    deliveries at the maximum backoff). The message names the key, never the secret."""
    from cxrd.stow import SecretUnavailable, credentials

    problems = []
    holders: list[DestinationConfig | NotificationConfig] = [*config.destinations,
                                                             *config.notifications]
    for dest in holders:
        if isinstance(dest, DestinationConfig) and not dest.is_stow:
            continue
        try:
            credentials(dest)
        except SecretUnavailable as exc:
            problems.append(Problem(dest.section, str(exc),
                                    "make the file readable by this user, or set the "
                                    "environment variable for cxrd serve (e.g. "
                                    "Environment= or EnvironmentFile= in its systemd unit)"))
    return problems


def check_dicomweb(config: Config) -> Problem | None:
    """With ``[dicomweb] listen`` set, the bearer token can be read now: the token file is
    readable and holds a token (the receiver reads it again when it changes). The message
    names the file, never the token."""
    from cxrd.dicomweb import TokenUnavailable, read_token

    token_file = config.dicomweb.token_file
    if not config.dicomweb.enabled or token_file is None:
        return None
    try:
        read_token(token_file)
    except TokenUnavailable as exc:
        return Problem("dicomweb", str(exc),
                       "write the token into the file, make it readable by this user, or "
                       'set [dicomweb] listen = "" to turn the STOW-RS receiver off')
    return None


def _bind_error(host: str, port: int, *, reuse_port: bool = False) -> OSError | None:
    """Bind (and close at once) a TCP socket as a listener on ``host:port`` would."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        return exc
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # as socketserver's allow_reuse_address: a port in TIME_WAIT is free, a listener not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc
    return None


def _port_problem(check: str, what: str, key: str, host: str, port: int,
                  exc: OSError, other: str) -> Problem:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return Problem(check, f"{what} {where} ({key}) is already in use (by another "
                       "process, or by this node if it is running)",
                       f"stop what listens there, or set {key} to a free port{other}")
    if exc.errno == errno.EACCES:
        return Problem(check, f"{what} {where} ({key}) may not be bound by this user",
                       "use a port from 1024 up, or grant CAP_NET_BIND_SERVICE "
                       "(deploy/cxrd.service.d/low-port.conf)")
    return Problem(check, f"{what} {where} ({key}) cannot be bound: {_first_line(exc)}",
                   f"set {key} to an address of this machine{other}")


def check_ports(config: Config, *, dicom: bool = True) -> list[Problem]:
    """The DICOM and STOW-RS ports (unless ``dicom`` is false: ``cxrd worker`` listens on
    neither) and the metrics port can be bound now."""
    problems = []
    node = config.node
    exc = _bind_error(node.host, node.port, reuse_port=node.receivers > 1) if dicom else None
    if exc is not None:
        problems.append(_port_problem("dicom-port", "DICOM port", "[node] host/port",
                                      node.host, node.port, exc, ""))
    if config.metrics.enabled:
        host, port = parse_listen(config.metrics.listen)
        exc = _bind_error(host, port)
        if exc is not None:
            problems.append(_port_problem("metrics-port", "metrics port", "[metrics] listen",
                                          host, port, exc, ' ("" turns the endpoint off)'))
    if dicom and config.dicomweb.enabled:
        host, port = parse_listen(config.dicomweb.listen)
        exc = _bind_error(host, port)
        if exc is not None:
            problems.append(_port_problem("dicomweb-port", "STOW-RS port",
                                          "[dicomweb] listen", host, port, exc,
                                          ' ("" turns the STOW-RS receiver off)'))
    return problems


def find_problems(config: Config) -> list[Problem]:
    """Every problem at once, in the order an operator would fix them."""
    found = [check_runtime(), check_model(config), check_segmenter(config),
             check_database(config), check_store(config), check_dicomweb(config)]
    return ([p for p in found if p is not None] + check_destinations(config)
            + check_ports(config))


def find_worker_problems(config: Config) -> list[Problem]:
    """What stops ``cxrd worker``: the checks of ``cxrd serve`` less the DICOM port, the
    database as a worker node needs it (never migrated), and the shared folder."""
    database = check_worker_database(config)
    if database is not None and not config.storage.database_url_resolved.startswith(
            "postgresql"):
        return [database]  # SQLite: nothing else matters until that is changed
    found = [check_runtime(), check_model(config), check_segmenter(config), database,
             check_shared_folder(config)]
    problems = [p for p in found if p is not None]
    if config.workers.processes == 0:
        problems.append(Problem("workers", "[workers] processes = 0: cxrd worker would run "
                                "no workers", 'set [workers] processes to "auto" or 1-1024'))
    return problems + check_ports(config, dicom=False)


def require_worker_startable(config: Config) -> None:
    """Raise StartupError naming every problem ``cxrd worker`` found; return when none."""
    problems = find_worker_problems(config)
    if problems:
        raise StartupError(problems)


def require_startable(config: Config) -> None:
    """Raise StartupError naming every problem found; return when there is none."""
    problems = find_problems(config)
    if problems:
        raise StartupError(problems)
