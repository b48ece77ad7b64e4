"""Real DICOM peers for the integration and acceptance tiers: dcmtk's ``echoscu``,
``storescu`` and ``storescp``, Orthanc, a faulty Storage SCP (pynetdicom, on loopback: slow,
aborting, or answering a warning status), and a throw-away PKI made with the ``openssl``
command line; plus phantom studies to send through them.

A missing peer fails the test, it never skips it: CI installs every one of them
(``scripts/test``), and a skipped peer test would pass without testing anything.

Debian's dcmtk and Orthanc leave Nagle's algorithm on unless ``TCP_NODELAY=1`` is in their
environment (each DIMSE message then waits about 50 ms), so every peer started here gets it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset

from training.phantoms import DicomOptions, make_phantom, random_patient_study, to_dataset

ORTHANC = "/usr/sbin/Orthanc"  # Debian installs it outside a normal user's PATH
#: Debian's orthanc-dicomweb: the DICOMweb plugin (STOW-RS at ``/dicom-web/studies``).
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PEER_TIMEOUT = 60.0


def tool(name: str) -> str:
    """The path of a peer program; the test fails (not skips) when it is not installed."""
    path = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK)
                                  else None)
    if path is None:
        pytest.fail(f"{name} is not installed: the DICOM peer tests need dcmtk, Orthanc and "
                    f"openssl (scripts/test installs them)")
    return path


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    """A loopback TCP port that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def listening(port: int) -> bool:
    """Whether some socket listens on TCP ``port``, read from /proc/net (a probe
    connection would count as an association at the peer and upset its log)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


# ----------------------------------------------------------------------------- dcmtk SCUs


def dcmtk(name: str, *args: str | Path, timeout: float = PEER_TIMEOUT
          ) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool to completion; stdout and stderr are captured as text."""
    return subprocess.run([tool(name), *map(str, args)], env=peer_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def start_dcmtk(name: str, *args: str | Path) -> subprocess.Popen[str]:
    """Start a dcmtk tool in the background (stdout and stderr captured together)."""
    return subprocess.Popen([tool(name), *map(str, args)], env=peer_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def echoscu(port: int, *, aet: str = "ECHOSCU", aec: str = "CXRD",
            options: Sequence[str | Path] = ()) -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", "-v", "-aet", aet, "-aec", aec, *options, "127.0.0.1", str(port))


def storescu_args(port: int, files: Sequence[Path], *, aet: str = "STORESCU",
                  aec: str = "CXRD", options: Sequence[str | Path] = ()) -> list[str | Path]:
    return ["-v", "-aet", aet, "-aec", aec, *options, "127.0.0.1", str(port), *files]


def storescu(port: int, files: Sequence[Path], *, aet: str = "STORESCU", aec: str = "CXRD",
             options: Sequence[str | Path] = (), timeout: float = PEER_TIMEOUT
             ) -> subprocess.CompletedProcess[str]:
    return dcmtk("storescu", *storescu_args(port, files, aet=aet, aec=aec, options=options),
                 timeout=timeout)


#: storescu's names of the compressed syntaxes cxrd decodes, for a ``-xf`` profile.
DCMTK_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.90": "JPEG2000LosslessOnly",
    "1.2.840.10008.1.2.4.80": "JPEGLSLossless",
    "1.2.840.10008.1.2.5": "RLELossless",
}


def storescu_profile(folder: Path, syntaxes: Sequence[str]) -> list[str | Path]:
    """storescu options proposing each of ``syntaxes`` (in a context of its own, for CR and
    DX) plus the uncompressed ones, so one association carries files compressed several
    ways, each sent as it is (the ``-x?`` options propose one compressed syntax only)."""
    names = [DCMTK_SYNTAX_NAMES[ts] for ts in syntaxes]
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]",
             "TransferSyntax1 = LittleEndianExplicit",
             "TransferSyntax2 = LittleEndianImplicit"]
    for name in names:
        lines += [f"[{name}]", f"TransferSyntax1 = {name}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    n = 0
    for sop_class in ("ComputedRadiographyImageStorage",
                      "DigitalXRayImageStorageForPresentation"):
        for name in [*names, "Uncompressed"]:
            n += 1
            lines.append(f"PresentationContext{n} = {sop_class}\\{name}")
    lines += ["[[Profiles]]", "[Compressed]", "PresentationContexts = Contexts"]
    config = folder / "storescu-compressed.cfg"
    config.write_text("\n".join(lines) + "\n")
    return ["-xf", config, "Compressed"]


def output(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: everything after its file meta."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


# ----------------------------------------------------------------------------- storescp


class StoreSCP:
    """dcmtk's ``storescp`` on a free port, storing into ``folder``; verbose log in a file,
    from which associations are counted."""

    def __init__(self, folder: Path, *, options: Sequence[str] = (),
                 port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.store_dir = folder / "received"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"storescp-{self.port}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [tool("storescp"), "-v", "-aet", "STORESCP", "-od", str(self.store_dir), *options,
             str(self.port)], env=peer_env(), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or listening(self.port), 20,
                 "storescp to listen")
        if self.proc.poll() is not None:
            pytest.fail(f"storescp exited with {self.proc.returncode}:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def associations(self) -> int:
        """Association requests seen (accepted or refused)."""
        return self.log().count("Association Received")

    def received(self) -> list[Path]:
        return sorted(p for p in self.store_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ------------------------------------------------------------------- faulty destinations

#: The SOP classes cxrd sends: Secondary Capture, the SR IODs and Segmentation.
RESULT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.11",
                      "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
                      "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4")


class FaultySCP:
    """A Storage SCP on a free loopback port (pynetdicom, in this process: a real peer on
    the wire) that misbehaves on every C-STORE once it has received the data set:
    ``"slow"`` answers Success only after ``delay`` seconds, ``"abort"`` sends an A-ABORT
    instead of an answer, ``"warning"`` answers ``status`` (a 0xBxxx warning). It records
    the SOP Instance UIDs it received and the associations it saw."""

    def __init__(self, fault: str, *, delay: float = 0.0, status: int = 0xB000,
                 ae_title: str = "FAULTY") -> None:
        assert fault in ("slow", "abort", "warning"), fault
        self.fault = fault
        self.delay = delay
        self.status = status
        self.ae_title = ae_title
        self.received: list[str] = []
        self.associations = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.ae = AE(ae_title=ae_title)
        for sop_class in RESULT_SOP_CLASSES:
            self.ae.add_supported_context(sop_class)
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False,
            evt_handlers=[(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_C_STORE, self._on_store)])
        self.port = int(self.server.server_address[1])

    def _on_open(self, event: Any) -> None:
        with self._lock:
            self.associations += 1

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        if self.fault == "slow":
            self._stopping.wait(self.delay)
            return 0x0000
        if self.fault == "abort":
            event.assoc.abort()
            return 0x0000  # never sent: the association is gone
        return self.status

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()


# ---------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate and a client certificate (PEM, unencrypted keys)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # another CA, which signed:
    rogue_cert: Path  # a client certificate cxrd must refuse
    rogue_key: Path
    rogue_server_cert: Path  # and a server certificate cxrd must not send to
    rogue_server_key: Path


#: ECDSA P-256 keys: generated in milliseconds (RSA takes seconds on a small machine).
KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _openssl(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run([tool("openssl"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)
    if done.returncode:
        pytest.fail(f"openssl {' '.join(map(str, args))} failed:\n{done.stderr}")


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("req", "-x509", *KEY, "-nodes", "-sha256", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", key, "-out", cert,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    ext = folder / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,"
                   f"keyEncipherment\nextendedKeyUsage={usage}\n"
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-new", *KEY, "-nodes", "-sha256", "-subj", f"/CN={name}",
             "-keyout", key, "-out", csr, cwd=folder)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-sha256", "-days", "2", "-extfile", ext, "-out", cert, cwd=folder)
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    server = _leaf(folder, "cxrd-server", ca, "serverAuth")
    client = _leaf(folder, "modality-client", ca, "clientAuth")
    rogue_ca = _ca(folder, "rogue-ca")
    rogue = _leaf(folder, "rogue-client", rogue_ca, "clientAuth")
    rogue_server = _leaf(folder, "rogue-server", rogue_ca, "serverAuth")
    return Pki(ca[0], *server, *client, rogue_ca[0], *rogue, *rogue_server)


# ------------------------------------------------------------------------------ Orthanc


class Orthanc:
    """An Orthanc subprocess with its storage and index in ``root``, on free ports. It can
    be stopped and started again on the same storage."""

    def __init__(self, root: Path, *, aet: str = "ORTHANC", dicomweb: bool = False,
                 users: dict[str, str] | None = None) -> None:
        self.root = root
        self.aet = aet
        #: the DICOMweb plugin loaded (``dicomweb_url``); ``users``: HTTP basic auth
        #: required of every REST and DICOMweb request (user name -> password)
        self.dicomweb = dicomweb
        self.users = dict(users or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config = root / "orthanc.json"
        #: name -> (AE title, host, port): the peers Orthanc may send to (C-STORE SCPs)
        self.modalities: dict[str, tuple[str, str, int]] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps({
            "Name": "cxrd-test-pacs",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "Plugins": [plugin(ORTHANC_DICOMWEB)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowStore": True,
            "DicomScuTimeout": 30,
            "SaveJobs": False,
        }, indent=2))

    def start(self, timeout: float = 30.0) -> None:
        """Start it (again: same storage, index and ports) and wait for REST and DICOM."""
        self.write_config()
        self.starts += 1
        log = (self.root / f"orthanc-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen([tool(ORTHANC), str(self.config)], cwd=self.root,
                                     env=peer_env(), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system")
            except OSError:
                return False
            return listening(self.dicom_port)

        wait_for(up, timeout, "Orthanc to start")

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (a STOW-RS destination's ``url``)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def log(self) -> str:
        return (self.root / f"orthanc-{self.starts}.log").read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM to its PID, and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    # -- REST (urllib; loopback only) --------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", timeout: float = 60.0) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body,
                                     method=method, headers={"Content-Type": content_type,
                                                             **self._auth()})
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            data = rsp.read()
        return json.loads(data) if data else None

    def _auth(self) -> dict[str, str]:
        """The test's own requests authenticate as the first registered user."""
        if not self.users:
            return {}
        user, password = next(iter(self.users.items()))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def instance_file(self, orthanc_instance: str) -> bytes:
        """The Part 10 file Orthanc stores for an instance (its Orthanc ID)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/instances/{orthanc_instance}/file",
            headers=self._auth())
        with urllib.request.urlopen(req, timeout=60) as rsp:
            data: bytes = rsp.read()
        return data

    def post(self, path: str, body: Any, timeout: float = 60.0) -> Any:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        ctype = "application/dicom" if isinstance(body, bytes) else "application/json"
        return self._request("POST", path, raw, ctype, timeout)

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /instances``: store one DICOM file; returns Orthanc's answer."""
        answer: dict[str, Any] = self.post("/instances", path.read_bytes())
        return answer

    def study_id(self, study_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_instance_uid.encode())
        ids = [f["ID"] for f in found or [] if f.get("Type") == "Study"]
        return ids[0] if ids else None

    def instances_of_study(self, orthanc_study: str) -> list[dict[str, str]]:
        """Every instance of a study with its SOP class, modality and study UID."""
        rows = []
        for inst in self.get(f"/studies/{orthanc_study}/instances"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            rows.append({"id": inst["ID"], "sop_class_uid": tags.get("SOPClassUID", ""),
                         "sop_instance_uid": tags.get("SOPInstanceUID", ""),
                         "modality": tags.get("Modality", ""),
                         "study_instance_uid": tags.get("StudyInstanceUID", "")})
        return rows


def plugin(path: str) -> str:
    """An Orthanc plugin's library; the test fails (not skips) when it is not installed."""
    if not os.path.isfile(path):
        pytest.fail(f"{path} is not installed: the DICOMweb tests need Debian's "
                    "orthanc-dicomweb (scripts/test installs it)")
    return path


def http_error_text(exc: urllib.error.HTTPError) -> str:
    with contextlib.suppress(Exception):
        return exc.read().decode(errors="replace")
    return str(exc)


# ----------------------------------------------------------------------------- phantoms


@dataclass(frozen=True)
class SentFile:
    path: Path
    study_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str


def phantom_study(folder: Path, n: int, *, seed: int, modality: str = "CR",
                  transfer_syntaxes: Sequence[str] = (ExplicitVRLittleEndian,),
                  size: tuple[int, int] = (256, 208), label_cycle: Sequence[str] = (
                      "TB", "NTB", "NORM")) -> list[SentFile]:
    """``n`` frontal chest radiographs of one fake patient study, written to ``folder``;
    image ``i`` is encoded with ``transfer_syntaxes[i % len(transfer_syntaxes)]``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study = random_patient_study(rng)
    series_uid = str(generate_uid())
    files = []
    for i in range(n):
        ph = make_phantom(rng, label_cycle[i % len(label_cycle)], *size)
        ts = transfer_syntaxes[i % len(transfer_syntaxes)]
        ds: Dataset = to_dataset(ph, study, DicomOptions(modality=modality, transfer_syntax=ts),
                                 series_instance_uid=series_uid, instance_number=i + 1)
        path = folder / f"img{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(SentFile(path, study.study_instance_uid, str(ds.SOPInstanceUID),
                              str(ds.SOPClassUID), str(ts)))
    return files
