"""cxrd.store against its real peers: a local folder, and moto's S3 server.

moto's standalone server (``python -m moto.server``, from ``moto[server]`` in the
``[test]`` extra) is started once per module on a free loopback port; buckets are made
with boto3, and the store talks to the server over HTTP through boto3 as it would to AWS,
MinIO or Ceph: no client is mocked. moto accepts any credentials unless told to check
them (``INITIAL_NO_AUTH_ACTION_COUNT``), which the credential tests do in a server of
their own. moto's region is us-east-1.

The same test functions run on both backends (``store`` is parametrised): round trips of
put/get/head/delete/list, a 10 MB object, key validation. Locally, a full file system (a
real 1 MB tmpfs) -> StoreUnavailable. Then the S3 error taxonomy: an endpoint that is
down, a server that goes away, one that never answers, one that answers 503 SlowDown (a
small HTTP server: moto does not throttle) -> StoreUnavailable; a missing bucket, refused
credentials -> StoreFailed naming the bucket and key and never a secret; credentials from
the environment and the shared credentials file only.
"""

from __future__ import annotations

import http.server
import io
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from dicomfactory import make_dataset, part10_bytes
from dicompeers import free_port
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from s3peer import (
    FAKE_KEY_ID,
    FAKE_SECRET,
    REGION,
    new_bucket,
    start_moto,
    stop,
)

from cxrd.config import validate
from cxrd.errors import InvalidKey, ObjectMissing, StoreFailed, StoreUnavailable
from cxrd.store import LocalStore, S3Store, Store, open_store

#: Credentials from the environment only (``fake_aws``, tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("fake_aws")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("moto_endpoint")
    return S3Store(new_bucket(endpoint), "site-a", endpoint_url=endpoint)


# ----------------------------------------------------------------------- both backends


def test_round_trip(store: Store) -> None:
    key = "spool/1.2.3/1.2.3.4.dcm"
    assert store.head(key) is None
    with pytest.raises(ObjectMissing, match="1.2.3.4.dcm"):
        store.get(key)
    store.put(key, b"first")
    assert store.get(key) == b"first"
    assert store.head(key) == 5
    store.put(key, bytearray(b"second one"))  # replaces
    assert store.get(key) == b"second one"
    assert store.head(key) == 10
    assert list(store.list()) == [key]
    store.delete(key)
    assert store.head(key) is None
    assert list(store.list()) == []
    store.delete(key)  # idempotent


def test_put_from_file_and_from_writer(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "in.dcm"
    source.write_bytes(b"from a file")
    store.put("results/a.dcm", source)
    store.put("results/b.dcm", lambda fh: fh.write(b"from a writer"))
    store.put("results/c.dcm", memoryview(b"from a view"))
    assert store.get("results/a.dcm") == b"from a file"
    assert store.get("results/b.dcm") == b"from a writer"
    assert store.get("results/c.dcm") == b"from a view"
    assert source.read_bytes() == b"from a file"  # the source is left as it was
    with pytest.raises(FileNotFoundError, match="no file"):  # the caller's mistake
        store.put("results/d.dcm", tmp_path / "missing.dcm")
    assert store.head("results/d.dcm") is None


def test_ten_megabytes(store: Store, tmp_path: Path) -> None:
    data = os.urandom(10 << 20)
    store.put("spool/1.2/big.dcm", data)
    assert store.head("spool/1.2/big.dcm") == len(data)
    assert store.get("spool/1.2/big.dcm") == data
    source = tmp_path / "big.dcm"
    source.write_bytes(data[::-1])
    store.put("spool/1.2/big2.dcm", source)
    assert store.get("spool/1.2/big2.dcm") == data[::-1]


def test_s3_multipart_above_the_threshold(moto_endpoint: str, tmp_path: Path) -> None:
    """Objects above ``multipart_threshold`` go as a multipart upload (5 MB parts here,
    S3's smallest); they read back whole."""
    store = S3Store(new_bucket(moto_endpoint), endpoint_url=moto_endpoint,
                    multipart_threshold=5 << 20)
    data = os.urandom(12 << 20)
    source = tmp_path / "big.dcm"
    source.write_bytes(data)
    store.put("spool/1/bytes.dcm", data)
    store.put("spool/1/file.dcm", source)
    store.put("spool/1/writer.dcm", lambda fh: fh.write(data))
    raw = boto3.client("s3", endpoint_url=moto_endpoint)
    for key in ("spool/1/bytes.dcm", "spool/1/file.dcm", "spool/1/writer.dcm"):
        assert store.get(key) == data
        # A multipart object's ETag ends in "-<parts>": three parts of 5, 5 and 2 MB.
        assert raw.head_object(Bucket=store.bucket, Key=key)["ETag"].endswith('-3"')


def test_list_is_by_folder_and_sorted(store: Store) -> None:
    keys = ["spool/1.3/5.dcm", "spool/1.2/4.dcm", "results/9.dcm", "spool/1.2/3.dcm",
            "spool/1.20/6.dcm"]
    for key in keys:
        store.put(key, key.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("spool")) == ["spool/1.2/3.dcm", "spool/1.2/4.dcm",
                                         "spool/1.20/6.dcm", "spool/1.3/5.dcm"]
    assert list(store.list("spool/1.2")) == ["spool/1.2/3.dcm", "spool/1.2/4.dcm"]
    assert list(store.list("spool/1")) == []  # a folder, not a string prefix
    assert list(store.list("nothing")) == []


BAD_KEYS = ["", "/etc/passwd", "../x.dcm", "spool/../../x", "spool/./x", "spool//x",
            "spool/x/", ".hidden", "spool/.x.dcm.123.abc.tmp", "spool\\x", "spool/x y",
            "spool/é.dcm", "a" * 1025, "spool/" + "b" * 256, "spool/x\x00"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=range(len(BAD_KEYS)))
def test_invalid_keys_are_refused(store: Store, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.put(key, b"x")
    for call in (store.get, store.head, store.delete, store.local_path):
        with pytest.raises(InvalidKey):
            call(key)
    if key:  # "" lists everything
        with pytest.raises(InvalidKey):
            list(store.list(key))
    assert list(store.list()) == []  # nothing was written anywhere


def test_local_path(store: Store) -> None:
    store.put("results/1.2.dcm", b"abc")
    path = store.local_path("results/1.2.dcm")
    if isinstance(store, LocalStore):
        assert path == store.root / "results" / "1.2.dcm"
        assert path.read_bytes() == b"abc"
    else:
        assert path is None


# ------------------------------------------------------------------------ local folder


def test_local_writes_leave_no_temp_file_and_link_a_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    source = tmp_path / "watched.dcm"
    source.write_bytes(b"x" * 5000)
    store.put("spool/1.2/3.dcm", source)
    stored = tmp_path / "objects" / "spool" / "1.2" / "3.dcm"
    # Same file system: the file is taken in as a hard link (cxrd.durable.link_temp).
    assert stored.stat().st_ino == source.stat().st_ino
    store.put("spool/1.2/4.dcm", b"y" * (2 << 20))  # O_DIRECT path of cxrd.durable
    assert sorted(p.name for p in stored.parent.iterdir()) == ["3.dcm", "4.dcm"]
    store.delete("spool/1.2/3.dcm")
    store.delete("spool/1.2/4.dcm")
    assert not (tmp_path / "objects" / "spool").exists()  # emptied folders go too
    assert (tmp_path / "objects").is_dir()


def test_local_full_disk_is_unavailable(tmpfs: Callable[[Path, int], Path],
                                        tmp_path: Path) -> None:
    store = LocalStore(tmpfs(tmp_path / "small", 1))  # a real 1 MB file system
    with pytest.raises(StoreUnavailable, match="No space left"):
        store.put("spool/1/big.dcm", os.urandom(2 << 20))
    assert store.head("spool/1/big.dcm") is None
    assert [p.name for p in (tmp_path / "small" / "spool" / "1").iterdir()] == []  # no temp
    store.put("spool/1/small.dcm", b"fits")  # space is there again for what fits
    assert store.get("spool/1/small.dcm") == b"fits"
    # pydicom's writer re-raises ENOSPC as an OSError without an errno (the original is
    # its context): still a full disk, so still StoreUnavailable
    big = dcmread(io.BytesIO(part10_bytes(make_dataset("OT", rows=1024, columns=1024,
                                                       seed=1))))
    with pytest.raises(StoreUnavailable, match="No space left"):
        store.put("results/big.dcm", lambda fh: dcmwrite(fh, big, enforce_file_format=True))


def test_local_root_that_is_a_file_is_a_permanent_error(tmp_path: Path) -> None:
    (tmp_path / "objects").write_bytes(b"")
    store = LocalStore(tmp_path / "objects")
    with pytest.raises(StoreFailed, match="objects"):
        store.put("spool/1.dcm", b"x")


# ------------------------------------------------------------------------ S3 error taxonomy


def quick(endpoint: str, bucket: str = "cxrd-test", attempts: int = 2) -> S3Store:
    return S3Store(bucket, endpoint_url=endpoint, connect_timeout=0.5, read_timeout=0.5,
                   max_attempts=attempts)


def all_calls_raise(store: S3Store, error: type[Exception]) -> list[str]:
    messages = []
    for call in (lambda: store.put("spool/1/2.dcm", b"x"), lambda: store.get("spool/1/2.dcm"),
                 lambda: store.head("spool/1/2.dcm"), lambda: store.delete("spool/1/2.dcm"),
                 lambda: list(store.list("spool"))):
        with pytest.raises(error) as info:
            call()
        messages.append(str(info.value))
    return messages


def test_endpoint_down_is_unavailable() -> None:
    store = quick(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for message in all_calls_raise(store, StoreUnavailable):
        assert "s3://cxrd-test" in message


def test_server_that_goes_away_is_unavailable() -> None:
    proc, endpoint = start_moto()
    try:
        bucket = new_bucket(endpoint)
        store = quick(endpoint, bucket)
        store.put("spool/1/2.dcm", b"kept")
        assert store.get("spool/1/2.dcm") == b"kept"
    finally:
        stop(proc)
    with pytest.raises(StoreUnavailable, match=bucket):
        store.get("spool/1/2.dcm")
    with pytest.raises(StoreUnavailable, match=bucket):
        store.put("spool/1/3.dcm", b"waits")


def test_endpoint_that_never_answers_is_unavailable() -> None:
    with socket.socket() as sock:  # connections complete in the backlog, nobody reads
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        store = quick(f"http://127.0.0.1:{sock.getsockname()[1]}")
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Timeout"):
            store.get("spool/1/2.dcm")
        assert time.monotonic() - t0 < 10


class _SlowDown(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint under overload: every request answered 503 SlowDown, as S3 does."""

    protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue" (boto3's PUTs)

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.BODY) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.BODY)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_throttling_and_5xx_are_unavailable() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # One attempt: botocore's own retries back off for seconds before they give up.
        messages = all_calls_raise(quick(f"http://127.0.0.1:{server.server_port}",
                                         attempts=1), StoreUnavailable)
        assert "SlowDown" in messages[0]
        assert "503" in messages[2]  # HEAD: a status, no body
    finally:
        server.shutdown()
        server.server_close()


def test_no_such_bucket_is_permanent_and_named(moto_endpoint: str) -> None:
    store = quick(moto_endpoint, "cxrd-no-such-bucket")
    messages = all_calls_raise(store, StoreFailed)
    for message in messages:
        assert "no such bucket 'cxrd-no-such-bucket'" in message
    assert all("spool/1/2.dcm" in message for message in messages[:4])
    with pytest.raises(StoreFailed, match="no such bucket 'cxrd-no-such-bucket'"):
        store.check()
    # A HEAD's 404 tells a missing key from a missing bucket by asking about the bucket
    # once: on a bucket that is there, a missing key is None.
    assert quick(moto_endpoint, new_bucket(moto_endpoint)).head("spool/1/2.dcm") is None


def test_open_store_builds_the_backend(moto_endpoint: str, tmp_path: Path) -> None:
    base = validate({"storage": {"data_dir": str(tmp_path / "data")}}, base_dir=tmp_path)
    local = open_store(base)
    assert isinstance(local, LocalStore) and local.root == tmp_path / "data"
    folder = open_store(validate({"storage": {"store": "shared"}}, base_dir=tmp_path))
    assert isinstance(folder, LocalStore) and folder.root == tmp_path / "shared"
    bucket = new_bucket(moto_endpoint)
    s3 = open_store(validate({"storage": {"store": f"s3://{bucket}/cxrd/node",
                                          "s3_endpoint_url": moto_endpoint}},
                             base_dir=tmp_path))
    assert isinstance(s3, S3Store) and s3.location == f"s3://{bucket}/cxrd/node"
    s3.put("results/1.dcm", b"sr")
    # The prefix is the store's own: the object sits under it in the bucket.
    raw = boto3.client("s3", endpoint_url=moto_endpoint).get_object(
        Bucket=bucket, Key="cxrd/node/results/1.dcm")
    assert raw["Body"].read() == b"sr"
    assert list(s3.list()) == ["results/1.dcm"]


# --------------------------------------------------------------------------- credentials


@pytest.fixture(scope="module")
def checking_moto() -> Iterator[tuple[str, str, str, str]]:
    """A moto server that checks credentials after its first four requests, which make
    an IAM user with an access key and an S3 policy, and a bucket.
    (endpoint, bucket, key id, secret)."""
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        env = {"aws_access_key_id": FAKE_KEY_ID, "aws_secret_access_key": FAKE_SECRET,
               "region_name": REGION, "endpoint_url": endpoint}
        iam = boto3.client("iam", **env)
        iam.create_user(UserName="cxrd")
        key = iam.create_access_key(UserName="cxrd")["AccessKey"]
        iam.put_user_policy(UserName="cxrd", PolicyName="s3", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
            '"Action": "s3:*", "Resource": "*"}]}'))
        boto3.client("s3", **env).create_bucket(Bucket="cxrd-auth")
        yield endpoint, "cxrd-auth", key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        stop(proc)


def test_credentials_from_the_environment(checking_moto: tuple[str, str, str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, bucket, key_id, secret = checking_moto
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = quick(endpoint, bucket)
    store.put("spool/1/2.dcm", b"ok")
    assert store.get("spool/1/2.dcm") == b"ok"
    # The same store with a wrong secret in the environment: refused, and the message
    # holds neither secret.
    wrong = "not-the-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    refused = quick(endpoint, bucket)
    with pytest.raises(StoreFailed) as info:
        refused.put("spool/1/3.dcm", b"no")
    message = str(info.value)
    assert bucket in message and "spool/1/3.dcm" in message
    assert wrong not in message and secret not in message
    assert store.head("spool/1/3.dcm") is None


def test_credentials_from_the_shared_file(checking_moto: tuple[str, str, str, str],
                                          monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    endpoint, bucket, key_id, secret = checking_moto
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreFailed, match="no AWS credentials found"):
        quick(endpoint, bucket).put("spool/1/4.dcm", b"x")
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[cxrd]\naws_access_key_id = {key_id}\n"
                           f"aws_secret_access_key = {secret}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "cxrd")
    store = quick(endpoint, bucket)
    store.put("spool/1/4.dcm", b"from the file")
    assert store.get("spool/1/4.dcm") == b"from the file"


# ----------------------------------------------------------------- the node's objects


def test_node_store_maps_results_keys_to_the_results_folder(tmp_path: Path) -> None:
    """The default store (``open_node_store`` with ``[storage] store = ""``): ``spool/``
    keys are files under ``data_dir``, ``results/`` keys files in ``[results] folder``
    wherever it is; an absolute path (a row from before schema 7) is read as a file."""
    from cxrd.store import open_node_store

    outside = tmp_path / "elsewhere"
    config = validate({"storage": {"data_dir": str(tmp_path / "data")},
                       "results": {"folder": str(outside)}})
    objects = open_node_store(config)
    assert objects.is_local and objects.spool_dir == tmp_path / "data" / "spool"
    assert objects.results_dir == outside
    objects.put("spool/1.2/3.4.dcm", b"image")
    objects.put("results/5.6.dcm", lambda fh: fh.write(b"result"))
    assert (tmp_path / "data" / "spool" / "1.2" / "3.4.dcm").read_bytes() == b"image"
    assert (outside / "5.6.dcm").read_bytes() == b"result"
    assert objects.local_path("results/5.6.dcm") == outside / "5.6.dcm"
    assert objects.head("results/5.6.dcm") == 6 and objects.get("results/5.6.dcm") == b"result"
    objects.delete("results/5.6.dcm")
    assert objects.head("results/5.6.dcm") is None and outside.is_dir()  # the folder stays
    old = tmp_path / "old" / "x.dcm"
    old.parent.mkdir()
    old.write_bytes(b"old")
    assert objects.get(str(old)) == b"old" and objects.head(str(old)) == 3
    objects.delete(str(old))
    assert not old.exists() and objects.head(str(old)) is None
    with pytest.raises(ObjectMissing):
        objects.get(str(old))
    with pytest.raises(InvalidKey):
        objects.put("results/../x.dcm", b"no")
