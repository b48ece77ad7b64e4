"""Storage behind one small interface: a local folder, or S3-compatible object storage.

A store holds **objects** under **keys**, relative POSIX paths such as
``spool/<study>/<sop>.dcm`` and ``results/<uid>.dcm``; the database records keys
(``instances.path``, ``results.path``, schema 7), never a backend's path or URL, so that
every host sharing the store finds the same object under the same key. The node reaches
its objects through :class:`NodeStore` (``open_node_store``), the one home of the mapping
from a key to a file: with the default store the spool is ``data_dir/spool`` and the
results ``[results] folder``, as they always were.

The interface (:class:`Store`):

- ``put(key, content)``: bytes, a file (``Path``) or a function that writes to a file
  handle; returns only once the object is durable (local: fsync and rename, the folder
  fsynced; S3: the service answered success). A reader sees the old object (or none) or
  the whole new one, never part of one;
- ``get(key) -> bytes``: the whole object. A radiograph is about 10 MB and the worker
  decodes it from memory: ``pydicom.dcmread(io.BytesIO(data))`` reads a buffer, and so do
  pylibjpeg's decoders. No streaming read is offered: nothing needs one yet;
- ``local_path(key) -> Path | None``: the local backend's file, for readers that map it
  (``cxrd.preprocess.read_dicom`` leaves native Pixel Data in the file and maps it, no
  copy); None on S3, where the reader calls ``get``;
- ``head(key) -> int | None``: the object's size, None when there is none;
- ``delete(key)``: idempotent (a missing object is no error), as S3's DELETE is;
- ``list(prefix) -> Iterator[str]``: the keys under the folder ``prefix`` ("" for all),
  in sorted order (keys are ASCII, so byte order and string order agree on both
  backends).

Errors, the same on both backends (``cxrd.errors``):

- :class:`~cxrd.errors.StoreUnavailable`: try again later (a timeout, a 5xx, throttling,
  an endpoint that is down; locally a full disk or a shared mount that went away). A
  caller treats it like a database that is down: the image waits, it is not failed;
- :class:`~cxrd.errors.StoreFailed`: refused until an operator acts (no such bucket,
  access denied, missing or wrong credentials; locally a permission or read-only file
  system). The message names the store, the bucket and the key, never a credential;
- :class:`~cxrd.errors.ObjectMissing`: ``get`` of a key with no object;
- :class:`~cxrd.errors.InvalidKey`: a key that is not a relative POSIX path of parts of
  ``[A-Za-z0-9_.-]``, none empty, ``.`` or ``..``, none starting with a dot (hidden names
  are the local backend's temp files, ``cxrd.durable.temp_path``), 1024 bytes at most
  (S3's limit).

The S3 backend uses boto3, AWS's own SDK: maintained with the service, the standard
credential chain (the ``AWS_*`` environment variables, the shared credentials and config
files, ``AWS_PROFILE``, and on AWS the instance or container role), retries with backoff
for throttling and 5xx (``retries`` mode "standard"), and a checksum (CRC32) of every PUT
body, which S3 and MinIO verify before they answer success (moto accepts a wrong one),
and which ``get`` checks the bytes it read against. obstore was the other candidate
(Rust, async-first, faster for many small requests); boto3's error codes are S3's own,
which the error taxonomy here is written against, and its client is thread-safe, which the
receiver's and sender's threads need. A client is not fork-safe: each process opens its
own store (``open_store``) after it starts. Credentials are never read from the
configuration file (``cxrd.config`` refuses credential-like keys in ``[storage]``).

Measured (``bench/store.py``, 10 MB object, a 2-core VM; S3 against moto's server on
loopback, whose own CPU is not counted): see docs/architecture.md, "Storage".
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable

from cxrd import durable
from cxrd.errors import (
    InvalidKey,
    ObjectMissing,
    StoreError,
    StoreFailed,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from cxrd.config import Config

__all__ = [
    "Content",
    "InvalidKey",
    "LocalStore",
    "ObjectMissing",
    "S3Store",
    "Store",
    "StoreError",
    "StoreFailed",
    "StoreUnavailable",
    "NodeStore",
    "check_key",
    "open_node_store",
    "open_store",
    "result_key",
    "spool_key",
    "parse_s3_url",
]

#: What ``put`` stores: bytes, a file's contents, or a function that writes them to an
#: open binary file.
Content = bytes | bytearray | memoryview | Path | Callable[[BinaryIO], object]

# ----------------------------------------------------------------------------------- keys

_PART = re.compile(r"[A-Za-z0-9_.-]+")
#: S3's limit on a key, in bytes; with the prefix included.
MAX_KEY_BYTES = 1024
#: A file name's limit on common Linux file systems.
MAX_PART_BYTES = 255


def check_key(key: str, *, what: str = "key") -> str:
    """``key`` when it is a valid store key, else InvalidKey saying why.

    A relative POSIX path: parts of ``[A-Za-z0-9_.-]``, none empty (no leading, trailing or
    doubled slash), ``.`` or ``..``, and none starting with a dot; 1024 bytes at most.
    ASCII only, so that both backends sort keys alike and no file system or URL escapes
    them differently."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"invalid store {what} {key!r}: empty")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidKey(f"invalid store {what} {key[:60]!r}...: longer than "
                         f"{MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidKey(f"invalid store {what} {key!r}: absolute; keys are relative paths")
    for part in key.split("/"):
        if not part:
            raise InvalidKey(f"invalid store {what} {key!r}: an empty part (a leading, "
                             "trailing or doubled slash)")
        if part in (".", ".."):
            raise InvalidKey(f"invalid store {what} {key!r}: {part!r} is not allowed")
        if part.startswith("."):
            raise InvalidKey(f"invalid store {what} {key!r}: a part starts with a dot "
                             "(hidden names are temp files)")
        if not _PART.fullmatch(part):
            raise InvalidKey(f"invalid store {what} {key!r}: only A-Z a-z 0-9 _ . - "
                             "and / between parts are allowed")
        if len(part) > MAX_PART_BYTES:
            raise InvalidKey(f"invalid store {what} {key!r}: a part is longer than "
                             f"{MAX_PART_BYTES} bytes")
    return key


def _check_prefix(prefix: str) -> str:
    """A ``list`` prefix: "" (everything) or a valid key naming a folder."""
    return prefix if prefix == "" else check_key(prefix, what="prefix")


# ------------------------------------------------------------------------------ interface


@runtime_checkable
class Store(Protocol):
    """Objects under keys (module docstring). Implementations are thread-safe."""

    #: Where the store is, for logs and messages: a folder or ``s3://bucket/prefix``.
    location: str

    def put(self, key: str, content: Content) -> None:
        """Store ``content`` under ``key``, replacing any object there; returns once it
        is durable."""

    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectMissing when there is none."""
        ...

    def head(self, key: str) -> int | None:
        """The object's size in bytes, or None when there is none."""

    def delete(self, key: str) -> None:
        """Remove the object; nothing happens when there is none."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """The keys under the folder ``prefix`` ("" for all), sorted."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The file holding the object on this host, or None (S3)."""


# ---------------------------------------------------------------------------- local folder

#: OSError numbers that mean "wait": the disk or quota is full, or a shared mount is
#: away (NFS stale handle, FUSE transport gone, a network file system timing out).
_LOCAL_TRANSIENT = frozenset(
    code for code in (
        errno.ENOSPC, errno.EDQUOT, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT,
        errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN, errno.EINTR,
    )
)


class LocalStore:
    """Objects as files under ``root``: key ``a/b.dcm`` is ``root/a/b.dcm``.

    Writes are ``cxrd.durable``'s: a temp file beside the target, fsynced, renamed over
    it, the folder fsynced; a new folder is made durably; a file put from a ``Path`` on
    the same file system is hard-linked, not copied (as the ingest takes in a watched
    file: the caller must not change that file afterwards). ``root`` may be a shared
    mount (NFS and the like honour fsync and an atomic rename within one folder).
    ``root`` is ``data_dir`` by default, so today's layout (``spool/``, ``results/``) is
    the keys' layout.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _error(self, action: str, key: str, exc: OSError) -> StoreError:
        # A writer function's library may re-raise the OSError without its errno (pydicom
        # wraps ENOSPC met while writing an element): the errno is then in the chain.
        cause: BaseException | None = exc
        for _ in range(8):
            if cause is None or (isinstance(cause, OSError) and cause.errno):
                break
            cause = cause.__cause__ or cause.__context__
        found = cause if isinstance(cause, OSError) else exc
        text = (f"{action} {key!r} in the folder {self.root}: "
                f"{found.strerror or found} (errno {found.errno})")
        if found.errno in _LOCAL_TRANSIENT:
            return StoreUnavailable(text)
        return StoreFailed(text)

    def put(self, key: str, content: Content) -> None:
        path = self._path(key)
        try:
            if isinstance(content, Path):
                tmp = durable.link_temp(path, content)
                if tmp is None:  # another file system: copy
                    tmp = durable.write_temp(path, _copier(content))
                try:
                    os.replace(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                durable.fsync_dir(path.parent)
            elif isinstance(content, bytearray | memoryview):
                durable.write_file(path, bytes(content))
            else:
                durable.write_file(path, content)
        except FileNotFoundError as exc:
            if isinstance(content, Path) and not content.exists():
                raise FileNotFoundError(f"put {key!r}: no file {content}") from exc
            raise self._error("put", key, exc) from exc
        except IsADirectoryError as exc:
            raise StoreFailed(f"put {key!r} in the folder {self.root}: a folder is there")\
                from exc
        except OSError as exc:
            raise self._error("put", key, exc) from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectMissing(f"no object {key!r} in the folder {self.root}") from exc
        except OSError as exc:
            raise self._error("get", key, exc) from exc

    def head(self, key: str) -> int | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error("head", key, exc) from exc
        return st.st_size if path.is_file() else None

    def delete(self, key: str) -> None:
        """Unlink the file and fsync its folder (the removal survives a power loss); a
        folder it leaves empty goes too, up to the root (S3 has no folders; retention
        removes emptied study folders the same way)."""
        path = self._path(key)
        try:
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return
            except IsADirectoryError:
                return  # a folder is no object
            folder = path.parent
            while folder != self.root:
                try:
                    folder.rmdir()  # only when empty: a writer's temp file keeps it
                except OSError:
                    break
                folder = folder.parent
            durable.fsync_dir(folder)
        except OSError as exc:
            raise self._error("delete", key, exc) from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        top = self.root / _check_prefix(prefix)
        keys: list[str] = []
        errors: list[OSError] = []
        for folder, dirs, files in os.walk(top, onerror=errors.append):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(".") or not _PART.fullmatch(name):
                    continue  # temp files, and names no key can have
                keys.append(name if rel == "." else f"{rel}/{name}")
        for exc in errors:
            if not isinstance(exc, FileNotFoundError | NotADirectoryError):
                raise self._error("list", prefix, exc) from exc
        keys.sort()
        return iter(keys)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


def _copier(source: Path) -> Callable[[BinaryIO], object]:
    def copy(fh: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, fh, durable.DIRECT_CHUNK)
    return copy


# -------------------------------------------------------------------------------------- S3

#: Objects up to this size go in one PUT; larger ones in parts of this size (S3's single
#: PUT takes up to 5 GiB; parts go in parallel threads, which a radiograph does not need).
MULTIPART_THRESHOLD = 64 << 20
#: Seconds to open a connection, and to wait for each read of an answer.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
#: Attempts per request, the first one included, for throttling, 5xx, timeouts and
#: connection errors (botocore's "standard" retry mode: exponential backoff with jitter).
MAX_ATTEMPTS = 3

#: Error codes that mean "wait": the service is overloaded, throttles or timed out.
_S3_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "RequestLimitExceeded", "ProvisionedThroughputExceededException", "BandwidthLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "OperationAborted",
})

_S3_URL = re.compile(r"s3://([^/]*)(?:/(.*))?")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> (bucket, prefix without slashes at either end);
    ValueError saying what is wrong."""
    match = _S3_URL.fullmatch(url)
    if not match:
        raise ValueError("expected s3://bucket or s3://bucket/prefix")
    bucket, prefix = match.group(1), (match.group(2) or "").strip("/")
    problem = bucket_name_problem(bucket)
    if problem:
        raise ValueError(f"bucket {bucket!r}: {problem}")
    if prefix:
        try:
            check_key(prefix, what="prefix")
        except InvalidKey as exc:
            raise ValueError(str(exc)) from None
    return bucket, prefix


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]*[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")


def bucket_name_problem(name: str) -> str | None:
    """Why ``name`` breaks S3's bucket naming rules (general purpose buckets), or None."""
    if not 3 <= len(name) <= 63:
        return "3 to 63 characters"
    if not _BUCKET.fullmatch(name):
        return ("lowercase letters, digits, dots and hyphens, beginning and ending with a "
                "letter or digit")
    if ".." in name or ".-" in name or "-." in name:
        return "no two dots, nor a dot beside a hyphen"
    if _IPV4.fullmatch(name):
        return "not an IP address"
    if name.startswith(("xn--", "sthree-", "amzn-s3-demo-")) or name.endswith(
            ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")):
        return "a prefix or suffix S3 reserves"
    return None


class S3Store:
    """Objects in an S3 bucket under ``prefix`` (``s3://bucket/prefix``); any
    S3-compatible service with ``endpoint_url`` (MinIO, Ceph RGW, moto).

    A ``put`` returns only after the service answered success, and the body carries a
    checksum (CRC32, botocore's default) that the service checks first, so an acknowledged
    object is whole; S3 objects appear atomically, no rename is needed. ``get`` checks the
    bytes against that stored checksum (a mismatch is StoreFailed). Credentials come
    from boto3's standard chain only (module docstring).
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 max_attempts: int = MAX_ATTEMPTS,
                 multipart_threshold: int = MULTIPART_THRESHOLD) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config as BotoConfig

        problem = bucket_name_problem(bucket)
        if problem:
            raise ValueError(f"bucket {bucket!r}: {problem}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix, what="prefix")
        self.location = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or None
        self.multipart_threshold = multipart_threshold
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            config=BotoConfig(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": "standard", "max_attempts": max_attempts},
                # Path-style requests (endpoint/bucket/key): what MinIO, Ceph and moto
                # serve without wildcard DNS; AWS serves both.
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            ),
        )
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=multipart_threshold,
                                        use_threads=True)
        self._bucket_seen = False

    # ------------------------------------------------------------------------- helpers

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, action: str, key: str, exc: BaseException) -> StoreError:
        """The store error for a boto3/botocore exception (module docstring's taxonomy)."""
        from botocore.exceptions import (
            BotoCoreError,
            ChecksumError,
            ClientError,
            ConnectionClosedError,
            FlexibleChecksumError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = f"s3://{self.bucket}/{self._full(key) if key else self.prefix}"
        if self.endpoint_url:
            where += f" at {self.endpoint_url}"
        cause = _client_error(exc) or exc
        if isinstance(cause, ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            message = str(err.get("Message", "")) or code
            text = f"{action} {where}: {code or status} {message}".rstrip()
            if code == "NoSuchBucket":
                text = (f"{action} {where}: no such bucket {self.bucket!r} "
                        "(create it, or correct [storage] store)")
            if (status >= 500 or status == 429 or code in _S3_TRANSIENT_CODES):
                return StoreUnavailable(text)
            return StoreFailed(text)
        if isinstance(cause, NoCredentialsError | PartialCredentialsError):
            return StoreFailed(
                f"{action} {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones) in the "
                "environment, or a profile in ~/.aws/credentials (AWS_PROFILE)")
        if isinstance(cause, BotoConnectionError | HTTPClientError | ReadTimeoutError
                      | ConnectionClosedError | IncompleteReadError | ResponseStreamingError):
            return StoreUnavailable(f"{action} {where}: {type(cause).__name__}: {cause}")
        if isinstance(cause, FlexibleChecksumError | ChecksumError):
            # The bytes read do not match the checksum stored with the object. Over TCP
            # (and TLS) that is a damaged object far more often than a damaged transfer:
            # asking again would most likely read the same bytes.
            return StoreFailed(f"{action} {where}: the object does not match its stored "
                               f"checksum: {cause}")
        if isinstance(cause, BotoCoreError):
            return StoreUnavailable(f"{action} {where}: {type(cause).__name__}: {cause}")
        return StoreFailed(f"{action} {where}: {type(cause).__name__}: {cause}")

    def _call(self, action: str, key: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(action, key, exc) from None
        except Exception as exc:
            if _client_error(exc) is not None:  # wrapped by boto3's transfer layer
                raise self._error(action, key, exc) from None
            raise

    # ----------------------------------------------------------------------- interface

    def put(self, key: str, content: Content) -> None:
        full = self._full(key)
        if isinstance(content, Path):
            try:
                size = content.stat().st_size
            except FileNotFoundError:
                raise FileNotFoundError(f"put {key!r}: no file {content}") from None
            if size <= self.multipart_threshold:
                with open(content, "rb") as fh:
                    self._call("put", key, self._client.put_object, Bucket=self.bucket,
                               Key=full, Body=fh)
            else:
                with open(content, "rb") as fh:
                    self._call("put", key, self._client.upload_fileobj, Fileobj=fh,
                               Bucket=self.bucket, Key=full, Config=self._transfer)
            return
        if callable(content):
            buffer = io.BytesIO()
            content(buffer)
            size = buffer.tell()
            buffer.seek(0)  # botocore reads it for the checksums, then rewinds to send it
            if size <= self.multipart_threshold:
                self._call("put", key, self._client.put_object, Bucket=self.bucket,
                           Key=full, Body=buffer)
            else:
                self._call("put", key, self._client.upload_fileobj, Fileobj=buffer,
                           Bucket=self.bucket, Key=full, Config=self._transfer)
            return
        data = content
        if len(data) <= self.multipart_threshold:
            self._call("put", key, self._client.put_object, Bucket=self.bucket, Key=full,
                       Body=bytes(data) if not isinstance(data, bytes) else data)
        else:
            self._call("put", key, self._client.upload_fileobj, Fileobj=io.BytesIO(data),
                       Bucket=self.bucket, Key=full, Config=self._transfer)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._full(key),
                                             ChecksumMode="ENABLED")
            # botocore checks the length read against Content-Length, and the body
            # against the checksum stored with the PUT.
            return bytes(answer["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectMissing(f"no object s3://{self.bucket}/{self._full(key)}") \
                    from None
            raise self._error("get", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("get", key, exc) from None

    def head(self, key: str) -> int | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 404:
                raise self._error("head", key, exc) from None
            # A HEAD's 404 has no body, so no code: a missing object and a missing bucket
            # look alike. The bucket is asked about once.
            self._check_bucket("head", key)
            return None
        except BotoCoreError as exc:
            raise self._error("head", key, exc) from None
        self._bucket_seen = True
        return int(answer["ContentLength"])

    def delete(self, key: str) -> None:
        self._call("delete", key, self._client.delete_object, Bucket=self.bucket,
                   Key=self._full(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        folder = _check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        return self._list(base, base + (f"{folder}/" if folder else ""), prefix)

    def _list(self, base: str, query: str, prefix: str) -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=query):
                for item in page.get("Contents", ()):
                    yield str(item["Key"])[len(base):]
        except (ClientError, BotoCoreError) as exc:
            raise self._error("list", prefix, exc) from None

    def local_path(self, key: str) -> Path | None:
        check_key(key)
        return None

    def check(self) -> None:
        """Raise the store error that the bucket's state gives (HEAD bucket): StoreFailed
        when it does not exist or may not be used, StoreUnavailable when the service
        cannot be reached. Asked once per store; later calls return at once."""
        self._check_bucket("check", "")

    def _check_bucket(self, action: str, key: str) -> None:
        if self._bucket_seen:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                exc.response.setdefault("Error", {})["Code"] = "NoSuchBucket"
            raise self._error(action, key, exc) from None
        except BotoCoreError as exc:
            raise self._error(action, key, exc) from None
        self._bucket_seen = True


def _client_error(exc: BaseException) -> BaseException | None:
    """The botocore ClientError behind ``exc`` (boto3's transfer layer wraps it), if any."""
    from botocore.exceptions import ClientError

    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        if isinstance(current, ClientError):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


# ------------------------------------------------------------------------------- opening


def open_store(config: Config) -> Store:
    """The store ``[storage] store`` names: ``""`` -> ``data_dir``; a folder -> that
    folder (both :class:`LocalStore`); ``s3://bucket/prefix`` -> :class:`S3Store`, at
    ``[storage] s3_endpoint_url`` when set. Opening sends no request: the first
    operation (or ``S3Store.check``) meets the errors. Call it in each process."""
    storage = config.storage
    if storage.store.startswith("s3://"):
        bucket, prefix = parse_s3_url(storage.store)
        return S3Store(bucket, prefix, endpoint_url=storage.s3_endpoint_url or None)
    return LocalStore(Path(storage.store) if storage.store else storage.data_dir)


# ------------------------------------------------------------------------ the node's objects

#: The first part of every key of a received instance, and of every result's key.
SPOOL = "spool"
RESULTS = "results"


def spool_key(study_uid: str, sop_uid: str) -> str:
    """The key of a received instance: ``spool/<Study UID>/<SOP UID>.dcm``."""
    return check_key(f"{SPOOL}/{study_uid}/{sop_uid}.dcm")


def result_key(sop_uid: str) -> str:
    """The key of a result object (SR, SC, SEG): ``results/<SOP UID>.dcm``."""
    return check_key(f"{RESULTS}/{sop_uid}.dcm")


def is_legacy_path(ref: str) -> bool:
    """Whether a ``path`` column's value is an absolute file path, not a key: a row written
    before schema 7 that the migration could not turn into a key (``cxrd.db._v7``)."""
    return ref.startswith("/")


class NodeStore:
    """The node's objects under their keys: the one home of key -> object.

    ``main`` holds every key, except that with ``results`` (the default store: a
    :class:`LocalStore` rooted at ``[results] folder``) the ``results/`` keys are that
    folder's files, so that ``[results] folder`` outside ``data_dir`` keeps working.
    ``export``: with an S3 or folder store, ``[results] folder`` when it is set, where each
    result is also written (a local copy for other software; the store's object is the one
    the node reads and sends).

    A ``path`` value that is an absolute path (``is_legacy_path``) names a local file
    directly: rows from before schema 7 that did not lie under the spool or the results
    folder. Thread-safe as its stores are; open one per process (``open_node_store``).
    """

    def __init__(self, main: Store, *, results: LocalStore | None = None,
                 export: Path | None = None) -> None:
        self.main = main
        self.results = results
        self.export = LocalStore(export) if export is not None else None

    @property
    def location(self) -> str:
        """Where the objects are, for logs and status (never a credential)."""
        if self.results is not None:
            return f"{self.main.location} (results: {self.results.location})"
        return self.main.location

    @property
    def is_local(self) -> bool:
        """Whether every object is a file on this host (a :class:`LocalStore`): the free
        space check (``cxrd.space``) applies, and readers map files."""
        return isinstance(self.main, LocalStore)

    @property
    def spool_dir(self) -> Path | None:
        """The local folder of ``spool/`` keys; None on S3."""
        return self.main.root / SPOOL if isinstance(self.main, LocalStore) else None

    @property
    def results_dir(self) -> Path | None:
        """The local folder of ``results/`` keys; None on S3."""
        if self.results is not None:
            return self.results.root
        return self.main.root / RESULTS if isinstance(self.main, LocalStore) else None

    def _route(self, key: str) -> tuple[Store, str]:
        if self.results is not None and key.startswith(RESULTS + "/"):
            return self.results, key[len(RESULTS) + 1:]
        return self.main, key

    def put(self, key: str, content: Content) -> None:
        """Store ``content`` durably under ``key`` (``Store.put``); a result is also
        written to the export folder, when there is one, after the store took it."""
        store, sub = self._route(key)
        if self.export is None or not key.startswith(RESULTS + "/"):
            store.put(sub, content)
            return
        if callable(content):  # encode once, write twice
            buffer = io.BytesIO()
            content(buffer)
            content = buffer.getvalue()
        store.put(sub, content)
        self.export.put(key[len(RESULTS) + 1:], content)

    def get(self, key: str) -> bytes:
        if is_legacy_path(key):
            return _legacy_file(key, "get", lambda p: p.read_bytes())
        store, sub = self._route(key)
        return store.get(sub)

    def head(self, key: str) -> int | None:
        if is_legacy_path(key):
            try:
                return _legacy_file(key, "head", lambda p: p.stat().st_size)
            except ObjectMissing:
                return None
        store, sub = self._route(key)
        return store.head(sub)

    def delete(self, key: str) -> None:
        """Remove the object (idempotent); a local file's emptied folders go too
        (``LocalStore.delete``). The export folder's copy stays: it is not the node's."""
        if is_legacy_path(key):
            with contextlib.suppress(ObjectMissing):
                _legacy_file(key, "delete", lambda p: p.unlink())
            return
        store, sub = self._route(key)
        store.delete(sub)

    def local_path(self, key: str) -> Path | None:
        """The file holding the object on this host, or None (S3)."""
        if is_legacy_path(key):
            return Path(key)
        store, sub = self._route(key)
        return store.local_path(sub)

    def check(self) -> None:
        """Raise the store error an S3 bucket's state gives (``S3Store.check``); nothing
        for a local store, whose errors come with each file."""
        if isinstance(self.main, S3Store):
            self.main.check()


def _legacy_file(ref: str, action: str, fn: Callable[[Path], Any]) -> Any:
    path = Path(ref)
    try:
        return fn(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise ObjectMissing(f"no file {ref}") from exc
    except OSError as exc:
        text = f"{action} {ref}: {exc.strerror or exc} (errno {exc.errno})"
        raise (StoreUnavailable(text) if exc.errno in _LOCAL_TRANSIENT
               else StoreFailed(text)) from exc


def local_folders(config: Config) -> tuple[Path | None, Path | None]:
    """The local folders of ``spool/`` and ``results/`` keys under ``[storage] store``
    (what ``open_node_store`` gives as ``spool_dir`` and ``results_dir``), without opening
    a store: (None, None) on S3."""
    store = config.storage.store
    if not store:
        return config.storage.spool_dir, config.results.results_dir
    if store.startswith("s3://"):
        return None, None
    root = Path(os.path.abspath(store))
    return root / SPOOL, root / RESULTS


def store_location(config: Config) -> str:
    """Where the node's objects are, for ``cxrd status`` and ``check-config``: the
    folders, or the S3 URL and its endpoint (never a credential: none is in the
    configuration, and ``s3_endpoint_url`` may not carry one)."""
    store = config.storage.store
    if not store:
        return f"{config.storage.data_dir} (results: {config.results.results_dir})"
    if store.startswith("s3://") and config.storage.s3_endpoint_url:
        return f"{store} at {config.storage.s3_endpoint_url}"
    return store


def key_folders(config: Config) -> dict[str, Path]:
    """The folders in which the schema 7 migration recognises the absolute paths it turns
    into keys (``cxrd.db.key_of_path``): with the default store, the spool and
    ``[results] folder``, where the node always wrote. With a folder or S3 store none: an
    older node's files are not in that store, and their rows keep their absolute paths,
    which ``NodeStore`` reads as local files."""
    if config.storage.store:
        return {}
    return {SPOOL: config.storage.spool_dir, RESULTS: config.results.results_dir}


def open_node_store(config: Config) -> NodeStore:
    """The node's objects as ``[storage] store`` says (``open_store``): the default
    (``""``) keeps ``data_dir/spool`` and ``[results] folder`` (``data_dir/results``
    unless set) as today; a folder or S3 holds both, and ``[results] folder``, when set,
    becomes a local export of the results. Sends no request; call it in each process."""
    store = open_store(config)
    if not config.storage.store:
        return NodeStore(store, results=LocalStore(config.results.results_dir))
    return NodeStore(store, export=config.results.folder)
