"""Durable files: written whole or not at all, and still there after a power loss.

Every file cxrd writes for keeps (spooled instances, SR and SC results) goes the same way:

1. its folder, when new, is created and fsynced into its parent (``make_dirs_durably``);
2. the bytes go to a hidden temp file beside the target, ``.<name>.<pid>.h<host>-<random>.tmp``,
   which is flushed and fsynced (``write_temp``; a megabyte or more goes past the page
   cache, ``O_DIRECT``, and is fsynced all the same); a file that is already on the same file
   system (a watched folder's) gets that temp name as a hard link instead, and is fsynced
   (``link_temp``);
3. the temp file is renamed over the target and the folder fsynced (``write_file``; the
   ingest does these two steps itself, inside its group commit, one folder fsync per
   group).

A crash between 2 and 3 leaves the temp file behind, and nothing else would remove it: the
writer's pid and host in its name let ``remove_stale_temp_files`` take away those whose
writer is gone; those another host wrote (a data folder shared by nodes on several hosts)
are left to that host.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: What goes into a file: its bytes, or a function that writes them to the open file.
Content = bytes | Callable[[BinaryIO], object]

# ----------------------------------------------------------------------- temp file names


def _host_tag() -> str:
    """This host's mark in temp file names: 8 hex digits of its name's hash. A pid means
    something only on the host that wrote the file, and nodes on several hosts can share
    a data folder (``cxrd worker``)."""
    return hashlib.sha1(socket.gethostname().encode(), usedforsecurity=False).hexdigest()[:8]


HOST_TAG = _host_tag()


def temp_path(path: Path) -> Path:
    """A hidden temp file beside ``path``: ``.<name>.<pid>.h<host>-<random>.tmp``.

    Unique per call, not just per process: the receiver stores from several threads, and
    two threads writing the same temp file would interleave their bytes."""
    return path.with_name(f".{path.name}.{os.getpid()}.h{HOST_TAG}-{uuid.uuid4().hex}.tmp")


def _writer_pid(name: str) -> int | None:
    """The writer's pid in a temp file's name (``temp_path``), or None for another name
    and for one another host wrote (its pid is not this host's to judge). A name without
    a host mark (written before there was one) is this host's."""
    parts = name.split(".")
    try:
        pid = int(parts[-3])
    except (IndexError, ValueError):
        return None
    tag, dash, _ = parts[-2].partition("-")
    if dash and tag.startswith("h") and tag[1:] != HOST_TAG:
        return None
    return pid


# ------------------------------------------------------------------------------ folders


def fsync_dir(path: Path) -> None:
    """Make the entries of the folder ``path`` (a rename into it, a new subfolder) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Folders this process has made durable (created or found, then their parent fsynced).
_durable_dirs: set[Path] = set()
_DURABLE_DIRS_MAX = 10_000


def make_dirs_durably(folder: Path) -> None:
    """Create ``folder`` and its missing parents so that they survive a power loss.

    A file renamed into a new folder is only as durable as the folder's own entry in its
    parent, so the parent is fsynced: once per folder and process. A folder found already
    there is fsynced into its parent too (its creator, another thread or process, may not
    have done so yet); it is remembered only after that, so no caller goes on early.
    """
    if folder in _durable_dirs:
        return
    if not folder.parent.is_dir():
        make_dirs_durably(folder.parent)
    folder.mkdir(exist_ok=True)
    fsync_dir(folder.parent)
    if len(_durable_dirs) >= _DURABLE_DIRS_MAX:
        _durable_dirs.clear()  # a cache: forgetting costs one more fsync per folder
    _durable_dirs.add(folder)


def _forget_dirs(folder: Path) -> None:
    for path in (folder, *folder.parents):
        _durable_dirs.discard(path)


# -------------------------------------------------------------------------------- files


def write_temp(path: Path, content: Content) -> Path:
    """Write ``content`` durably (flushed, fsynced) to a new temp file beside ``path``, its
    folder created durably when missing; returns the temp file. Nothing is left behind on
    failure."""
    folder = path.parent
    make_dirs_durably(folder)
    tmp = temp_path(path)
    try:
        _write_synced(tmp, content)
    except FileNotFoundError:
        if folder.is_dir():
            raise
        # The folder was removed after this process made it (an operator's clean-up):
        # make it again.
        _forget_dirs(folder)
        make_dirs_durably(folder)
        _write_synced(tmp, content)
    return tmp


def link_temp(path: Path, source: Path) -> Path | None:
    """Give ``source`` a second name: a new temp file beside ``path`` (its folder created
    durably when missing), fsynced; returns the temp file, or None when the file system
    cannot link the two (another device, no hard links, ...). No byte is copied, so a
    file already on the same file system is taken in for the cost of an fsync.

    The caller owns the check that ``source`` is what it read (``cxrd.ingest``)."""
    folder = path.parent
    make_dirs_durably(folder)
    tmp = temp_path(path)
    try:
        os.link(source, tmp)
    except FileNotFoundError:
        if not folder.is_dir():  # removed after this process made it: make it again
            _forget_dirs(folder)
            make_dirs_durably(folder)
            return link_temp(path, source)
        raise
    except OSError as exc:
        if exc.errno in _CANNOT_LINK:
            return None
        raise
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the writer of ``source`` may not have synced it
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


#: link(2) errors that mean "copy instead": another file system, none allowed here, too
#: many links, or not the caller's file (fs.protected_hardlinks).
_CANNOT_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP,
                          errno.ENOTSUP, errno.EACCES})


#: Bytes of at least this size are written past the page cache (``O_DIRECT``), this
#: much at a time from a page-aligned buffer of the writing thread.
DIRECT_CHUNK = 1 << 20
#: The alignment ``O_DIRECT`` asks of buffer, length and file offset (a multiple of the
#: logical block size of any common device).
_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux and a few others
_chunk_buffers = threading.local()


def _write_synced(tmp: Path, content: Content) -> None:
    try:
        if callable(content) or len(content) < DIRECT_CHUNK or not _O_DIRECT:
            with open(tmp, "wb") as fh:
                if callable(content):
                    content(fh)
                else:
                    fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            with memoryview(content) as view:
                done = _write_direct(fd, view)
                _write_all(fd, view[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_direct(fd: int, view: memoryview) -> int:
    """Write the aligned bulk of ``view`` to ``fd`` with ``O_DIRECT``; returns how many
    bytes were written (the rest goes through the page cache).

    A 10 MB image copied into the page cache cost the receiver 3 ms of CPU, and 20 ms
    where the kernel had to take fresh memory for it (a VM whose free memory went back to
    the host), holding a core while other associations waited. From the device's side
    the write is the same, and the fsync that follows stays: ``O_DIRECT`` does not
    flush a device's cache. The file is then not in the page cache: its one later reader
    (the worker) reads it from the device. Where the file system refuses ``O_DIRECT``
    (EINVAL), the bytes go through the page cache as before."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
    except OSError:
        return 0
    buffer = getattr(_chunk_buffers, "buffer", None)
    if buffer is None:  # anonymous memory is page-aligned; kept for the thread's next file
        buffer = _chunk_buffers.buffer = mmap.mmap(-1, DIRECT_CHUNK)
    done = 0
    try:
        with memoryview(buffer) as chunk:
            while len(view) - done >= _ALIGN:
                size = min(DIRECT_CHUNK, (len(view) - done) // _ALIGN * _ALIGN)
                chunk[:size] = view[done:done + size]
                try:
                    written = os.write(fd, chunk[:size])
                except OSError as exc:
                    if exc.errno == errno.EINVAL:  # alignment refused: the rest buffered
                        break
                    raise
                done += written
                if written < size:  # short (nearly full): the rest buffered, or its error
                    break
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return done


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def write_file(path: Path, content: Content) -> None:
    """Write ``content`` to ``path`` atomically and durably: a reader sees either the old
    file (or none) or the whole new one, and after the return a power loss keeps it."""
    tmp = write_temp(path, content)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# -------------------------------------------------------------------- stale temp files


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (whoever owns it). A zombie does not: it
    has exited and only waits to be reaped, which may take long when its parent died too
    and the host's init is slow to reap (it then still answers ``kill(pid, 0)``), yet it
    will never finish a file or a job."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (not Linux), or it is gone meanwhile
        return True
    return state not in ("Z", "X")


def remove_stale_temp_files(folder: Path, *, recursive: bool = False) -> int:
    """Remove temp files left by writers that died mid-write (kill -9, power loss).

    One whose writer (on this host) is gone can go; one of a live process is left alone,
    and so are one written on another host (a shared data folder) and a hidden ``.tmp``
    file not named by ``temp_path``. Returns how many were removed.
    """
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        pid = _writer_pid(path.name)
        if pid is None:
            continue  # not one of ours
        if pid == os.getpid() or pid_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    if removed:
        log.warning("action=removed-temp-files folder=%s count=%d", folder, removed)
    return removed


def save_dataset(ds: Dataset, folder: Path) -> Path:
    """Write ``ds`` to ``folder/<SOPInstanceUID>.dcm`` atomically and durably.

    A temporary file in the same folder is written, flushed and fsynced, renamed over the
    target and the folder fsynced, so a reader sees either nothing or the whole file.
    Raises InvalidUID when the SOPInstanceUID is not a valid UID.
    """
    from pydicom.filewriter import dcmwrite

    from cxrd.uids import validate_uid

    uid = validate_uid(str(ds.get("SOPInstanceUID", "")))
    target = Path(folder) / f"{uid}.dcm"
    # A new folder is made durably too; a crash leaves the temp file behind, and the node
    # removes those whose writer is gone (cxrd.durable.remove_stale_temp_files).
    write_file(target, lambda fh: dcmwrite(fh, ds, enforce_file_format=True))
    return target
