"""Bad input on the network, and decompression bombs, against a real ``cxrd serve``.

Each case is sent by a real peer: dcmtk's ``storescu`` where it can produce the case, else
a pynetdicom SCU that writes the C-STORE's command and data set itself (what no tool would
send: a data set without its SOP Instance UID, a command that names another SOP class, a
data set cut short on the wire). Each must end in a failure status (or a refused
association) or a recorded reason, with a log line; afterwards the node still answers
C-ECHO, and a good image sent after it gets its SR and SC.

The decompression bombs (a JPEG 2000 codestream of a few hundred bytes that decodes to
gigabytes) are refused before any allocation: the node's total RSS, main process and
workers read from /proc, stays under 2 GB while it deals with them.
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from dicomfactory import CT, bare_bytes, make_dataset, part10_bytes, uid
from dicompeers import (
    echoscu,
    output,
    phantom_study,
    storescu,
    storescu_profile,
)
from nodehelpers import DbView, NodeDirs, NodeProcess, Nodes, children, wait_until, write_config
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy import select

from cxrd.db import Instance, Rejection, Result, Study
from cxrd.dicom import (
    CR,
    DX_PRESENTATION,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
)
from cxrd.domain import InstanceState, ResultKind, StudyState

#: The node's whole RSS (main process and workers) must stay under this.
RSS_LIMIT = 2 * 1024**3


# --------------------------------------------------------------------------- the node


@dataclass
class Node:
    dirs: NodeDirs
    proc: NodeProcess
    db: DbView
    port: int
    folder: Path
    good: int = 0

    def log(self) -> str:
        return self.proc.log()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("badinput")
    dirs = write_config(root, batch_size=1)
    nodes = Nodes()
    db = DbView(dirs.database)
    try:
        proc = nodes.start(dirs)
        port = int(next(ln for ln in dirs.config.read_text().splitlines()
                        if ln.startswith("port")).split("=")[1])
        yield Node(dirs, proc, db, port, root / "files")
    finally:
        db.dispose()
        nodes.close()


# ------------------------------------------------------------------------ the senders


def send_raw(port: int, context_class: str, command_class: str, command_uid: str,
             dataset: bytes) -> int:
    """One C-STORE whose command and data set bytes are given as they are (explicit VR
    little endian), from a pynetdicom SCU; returns the status the node answered."""
    ae = AE(ae_title="BADSCU")
    ae.add_requested_context(context_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRD")
    assert assoc.is_established
    try:
        context = assoc.accepted_contexts[0]
        req = C_STORE()
        req.MessageID = 1
        req.Priority = 2
        req.AffectedSOPClassUID = command_class
        req.AffectedSOPInstanceUID = command_uid
        req.DataSet = io.BytesIO(dataset)
        # as Association.send_c_store does: the reactor pauses while the SCU waits
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            pass
        assoc.dimse.send_msg(req, int(context.context_id))  # type: ignore[arg-type]
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)
    finally:
        assoc.release()


# ----------------------------------------------------------------------- the checks


def rejections(node: Node, reason: str) -> list[Rejection]:
    with node.db.session() as s:
        return list(s.scalars(select(Rejection).where(Rejection.reason == reason)).all())


def instance(node: Node, sop_uid: str) -> Instance | None:
    with node.db.session() as s:
        return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).first()


def skipped_with(node: Node, sop_uid: str, reason: str) -> Instance:
    """Wait until the instance is skipped, and check its reason."""
    def done() -> Instance | None:
        inst = instance(node, sop_uid)
        return inst if inst is not None and inst.state in (
            InstanceState.SKIPPED.value, InstanceState.DONE.value,
            InstanceState.FAILED.value) else None
    inst = wait_until(done, 120, f"instance {sop_uid} to be dealt with")
    assert (inst.state, inst.reason) == (InstanceState.SKIPPED.value, reason), (
        inst.state, inst.reason, inst.detail)
    return inst


def still_serving(node: Node) -> None:
    """C-ECHO is answered, and a good image sent now gets its SR, SC and SEG."""
    done = echoscu(node.port)
    assert done.returncode == 0, output(done)
    node.good += 1
    [good] = phantom_study(node.folder / f"good{node.good}", 1, seed=100 + node.good)
    done = storescu(node.port, [good.path])
    assert done.returncode == 0 and "Success" in done.stderr + done.stdout, output(done)

    def reported() -> bool:
        with node.db.session() as s:
            study = s.scalars(select(Study).where(
                Study.study_instance_uid == good.study_instance_uid)).first()
            if study is None or study.state != StudyState.REPORTED.value:
                return False
            kinds = s.scalars(select(Result.kind).where(
                Result.study_instance_uid == good.study_instance_uid)).all()
        return sorted(kinds) == [ResultKind.SC.value, ResultKind.SEG.value,
                                 ResultKind.SR.value]
    wait_until(reported, 120, "the good image's SR, SC and SEG")


def logged(node: Node, *needles: str) -> None:
    wait_until(lambda: any(all(n in line for n in needles) for line in node.log().splitlines()),
               30, f"a log line with {needles}")


# ------------------------------------------------------------------------ the images


def good_dataset(seed: int, **kwargs: object) -> Dataset:
    """A frontal chest CR (so that admission sends it to a worker)."""
    return make_dataset("CR", rows=64, columns=64, seed=seed, **kwargs)


def j2k_codestream(tile: int, size: int) -> bytes:
    """A lossless JPEG 2000 codestream of a ``tile`` x ``tile`` black image whose SIZ
    marker then says the image is ``size`` x ``size`` (in tiles of ``tile``): OpenJPEG
    decodes it, the tiles it lacks as zeros, into ``size``**2 samples. A few hundred bytes
    that decode to gigabytes."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((tile, tile), dtype=np.uint16)).save(
        buf, format="JPEG2000", no_jp2=True, tile_size=(tile, tile), irreversible=False)
    codestream = bytearray(buf.getvalue())
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    struct.pack_into(">II", codestream, 8, size, size)  # SIZ: Xsiz, Ysiz
    return bytes(codestream)


def j2k_file(path: Path, rows: int, codestream: bytes, seed: int) -> Dataset:
    ds = good_dataset(seed, pixels=False)
    ds.Rows = ds.Columns = rows
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEG2000Lossless
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return ds


def j2k_options(node: Node) -> list[str | Path]:
    return list(storescu_profile(node.folder, [JPEG2000Lossless]))


# ------------------------------------------------------------------------- the cases


def test_no_sop_instance_uid(node: Node) -> None:
    ds = good_dataset(1)
    del ds.SOPInstanceUID
    command_uid = uid()
    status = send_raw(node.port, CR, CR, command_uid, bare_bytes(ds, implicit=False))
    assert status == STATUS_CANNOT_UNDERSTAND
    assert any("SOPInstanceUID" in r.detail for r in rejections(node, "missing-uid"))
    assert instance(node, command_uid) is None
    logged(node, "action=rejected", "reason=missing-uid")
    still_serving(node)


def test_pixel_data_shorter_than_declared(node: Node) -> None:
    # The Pixel Data element is whole, but holds fewer bytes than Rows x Columns need.
    ds = good_dataset(2)
    ds.PixelData = ds.PixelData[:1000]
    path = node.folder / "short.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10_bytes(ds))
    done = storescu(node.port, [path])
    assert done.returncode == 0, output(done)
    inst = skipped_with(node, str(ds.SOPInstanceUID), "decode-failed")
    assert inst.detail
    logged(node, "action=skipped", str(ds.SOPInstanceUID), "reason=decode-failed")
    still_serving(node)


def test_data_set_cut_short_on_the_wire(node: Node) -> None:
    # The Pixel Data element's length says more than the data set holds.
    ds = good_dataset(3)
    data = bare_bytes(ds, implicit=False)
    status = send_raw(node.port, CR, CR, str(ds.SOPInstanceUID), data[:-500])
    assert status == STATUS_CANNOT_UNDERSTAND
    assert instance(node, str(ds.SOPInstanceUID)) is None
    assert rejections(node, "truncated")
    logged(node, "action=rejected", str(ds.SOPInstanceUID), "reason=truncated")
    still_serving(node)


def test_huge_declared_size_with_1kb_of_data(node: Node) -> None:
    ds = good_dataset(4, pixels=False)
    ds.Rows = ds.Columns = 60000
    ds.PixelData = bytes(1024)
    path = node.folder / "huge.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10_bytes(ds))
    done = storescu(node.port, [path])
    # refused at ingest: 0xC000
    assert "Error: CannotUnderstand" in done.stderr, output(done)
    assert instance(node, str(ds.SOPInstanceUID)) is None
    assert [r for r in rejections(node, "image-too-large") if r.name == ds.SOPInstanceUID]
    logged(node, "action=rejected", str(ds.SOPInstanceUID), "reason=image-too-large")
    still_serving(node)


@pytest.mark.parametrize("command_class", [CR, DX_PRESENTATION])
def test_command_and_data_set_disagree_on_sop_class(node: Node, command_class: str) -> None:
    # In a CR context: a DX data set sent as CR, or a CR data set whose command says DX.
    ds = good_dataset(5, sop_class_uid=DX_PRESENTATION if command_class == CR else CR)
    status = send_raw(node.port, CR, command_class, str(ds.SOPInstanceUID),
                      bare_bytes(ds, implicit=False))
    assert status == STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert instance(node, str(ds.SOPInstanceUID)) is None
    logged(node, "action=rejected", str(ds.SOPInstanceUID), "reason=sop-class-mismatch")
    still_serving(node)


def test_garbage_in_jpeg2000(node: Node) -> None:
    path = node.folder / "garbage.dcm"
    rng = np.random.default_rng(6)
    ds = j2k_file(path, 64, rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(), seed=6)
    done = storescu(node.port, [path], options=j2k_options(node))
    assert done.returncode == 0, output(done)
    skipped_with(node, str(ds.SOPInstanceUID), "decode-failed")
    logged(node, "action=skipped", str(ds.SOPInstanceUID), "reason=decode-failed")
    still_serving(node)


def test_association_with_only_unsupported_sop_classes(node: Node) -> None:
    path = node.folder / "ct.dcm"
    ds = make_dataset("CT", sop_class_uid=CT, body_part="CHEST")
    path.write_bytes(part10_bytes(ds))
    # -R: only the contexts the file needs (by default storescu proposes every storage
    # SOP class it knows)
    done = storescu(node.port, [path], options=["-R"])
    text = (done.stdout + done.stderr).lower()
    assert done.returncode != 0 and "association rejected" in text, output(done)
    assert [r for r in rejections(node, "unsupported-sop-class") if CT in r.detail]
    logged(node, "action=association-rejected", "calling_ae=STORESCU", CT)
    assert instance(node, str(ds.SOPInstanceUID)) is None
    still_serving(node)


# --------------------------------------------------------------- decompression bombs


def node_rss(pid: int) -> int:
    """Bytes resident in the node: the main process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo.extend(children(p))
    return total


class RssWatch:
    """Samples the node's RSS every 20 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, node_rss(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


BOMB_SIDE = 20000  # 20000 x 20000 16-bit samples: 800 MB, 1.6 GB in OpenJPEG


@pytest.mark.parametrize("declared", ["header", "codestream"])
def test_decompression_bomb(node: Node, declared: str) -> None:
    """A 20000 x 20000 JPEG 2000 image in ~150 bytes. ``header``: the DICOM header says so
    too (refused at ingest); ``codestream``: the header says 1024 x 1024 and only the
    codestream says 20000 (refused by the worker before decoding)."""
    watch = RssWatch(node.proc.pid)
    try:
        path = node.folder / f"bomb-{declared}.dcm"
        rows = BOMB_SIDE if declared == "header" else 1024
        ds = j2k_file(path, rows, j2k_codestream(1024, BOMB_SIDE), seed=7)
        done = storescu(node.port, [path], options=j2k_options(node))
        sop_uid = str(ds.SOPInstanceUID)
        if declared == "header":
            assert "Error: CannotUnderstand" in done.stderr, output(done)
            assert instance(node, sop_uid) is None
            logged(node, "action=rejected", sop_uid, "reason=image-too-large")
        else:
            assert done.returncode == 0, output(done)
            inst = skipped_with(node, sop_uid, "decode-failed")
            assert str(BOMB_SIDE) in (inst.detail or ""), inst.detail
            logged(node, "action=skipped", sop_uid, "reason=decode-failed")
        still_serving(node)
    finally:
        peak = watch.stop()
    assert peak < RSS_LIMIT, f"the node's RSS reached {peak / 1024**2:.0f} MB"
