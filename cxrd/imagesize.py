"""How much memory an image's pixel data would take once decoded, and the limit on it.

A compressed image states its own size: a JPEG 2000 codestream of a few hundred bytes can
say 30000 x 30000 and decode (its missing tiles as zeros) to gigabytes, and a native image
can declare 60000 x 60000 over 1 KB of data. Nothing is decoded or allocated on the word
of such a header: the ingest refuses an object whose header declares more than
``MAX_DECODED_BYTES`` (reject reason ``image-too-large``), and a worker refuses, before it
decodes, a codestream whose own size is not the header's (skip reason ``decode-failed``).

Only pydicom and the standard library are imported: the ingest runs in the receiver.
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset

#: The most bytes an image's pixel data may take decoded (Rows x Columns x frames x
#: samples x bytes per sample): 256 MiB, seven times a 4320 x 4320 16-bit radiograph
#: (37 MB), the largest a flat-panel detector makes. A worker's peak while it classifies
#: an image is about three times its decoded size, so the node stays within a few hundred
#: megabytes per worker whatever it is sent.
MAX_DECODED_BYTES = 256 * 1024 * 1024


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError, IndexError):
        return default


def declared_bytes(ds: Dataset) -> int:
    """Rows x Columns x frames x samples x bytes per sample, from the header alone."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames = max(1, _int(ds, "NumberOfFrames", 1))
    samples = max(1, _int(ds, "SamplesPerPixel", 1))
    bits = max(1, _int(ds, "BitsAllocated", 16))
    return rows * cols * frames * samples * ((bits + 7) // 8)


def too_large(ds: Dataset, limit: int = MAX_DECODED_BYTES) -> str | None:
    """Why the image's declared size is refused, or None when it is within ``limit``."""
    size = declared_bytes(ds)
    if size <= limit:
        return None
    return (f"declared {_int(ds, 'Rows', 0)} x {_int(ds, 'Columns', 0)} x "
            f"{max(1, _int(ds, 'NumberOfFrames', 1))} frame(s) x "
            f"{max(1, _int(ds, 'SamplesPerPixel', 1))} sample(s) x "
            f"{_int(ds, 'BitsAllocated', 16)} bits = {size} bytes decoded, "
            f"more than the {limit} allowed")


#: Where a JPEG 2000 codestream's SOC and SIZ markers are looked for (a JP2 wrapper,
#: which DICOM does not allow but some writers add, comes before them).
_J2K_SEARCH = 64 * 1024
#: JPEG start-of-frame markers (ITU T.81 B.1.1.3; 0xF7 is JPEG-LS's SOF55): every one but
#: DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def j2k_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 codestream's SIZ marker; None if it has none."""
    at = frame.find(b"\xff\x4f\xff\x51", 0, _J2K_SEARCH)
    if at < 0 or len(frame) < at + 24:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", frame, at + 8)
    return max(0, ysiz - yosiz), max(0, xsiz - xosiz)


def jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG (or JPEG-LS) frame header; None if there is none.
    Rows is 0 where the frame defers it to a DNL marker."""
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", frame, pos + 2)
        if marker in _SOF_MARKERS:
            if pos + 9 > len(frame):
                return None
            rows, cols = struct.unpack_from(">HH", frame, pos + 5)
            return rows, cols
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


#: What a deflated data set may inflate to: the largest image allowed plus room for the
#: rest of the data set (``deflated_too_large``).
MAX_INFLATED_BYTES = MAX_DECODED_BYTES + 16 * 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024


def deflated_too_large(data: bytes, limit: int = MAX_INFLATED_BYTES) -> str | None:
    """For a Part 10 file in a deflated transfer syntax (Deflated Explicit VR Little
    Endian): why its data set would inflate beyond ``limit``, or None (also for any other
    file). pydicom inflates such a data set whole, in memory, before it reads one element,
    so a few megabytes on the wire can become gigabytes; here it is inflated a megabyte at
    a time and counted, never held. Only the file meta is read to know the syntax."""
    import io
    import zlib

    from pydicom.filereader import read_dataset

    from cxrd.dicom import DEFLATED

    if data[128:132] != b"DICM" or len(data) < 144:
        return None
    start = 144 + int.from_bytes(data[140:144], "little")  # after the meta group
    try:  # the meta group after its length element: explicit VR little endian
        meta = read_dataset(io.BytesIO(data[144:start]), is_implicit_VR=False,
                            is_little_endian=True)
        syntax = str(meta.get("TransferSyntaxUID", ""))
    except Exception:
        return None  # not this check's business: the parse that follows says what is wrong
    if syntax not in DEFLATED:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = data[start:]
    total = 0
    try:
        while pending:
            total += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if total > limit:
                return (f"the deflated data set inflates to more than {limit} bytes "
                        f"({len(data)} bytes on the wire)")
            pending = inflater.unconsumed_tail
    except zlib.error:
        return None  # corrupt: the parse that follows refuses it
    return None
