"""DICOM content encoded once and spliced: what makes a study SR and a lung SEG cheap to
build and write.

A TID 1500 SR of a four-image study is about 300 content items, nearly all of them the same
in every SR one model writes (the observation context, the algorithm identification, the
findings, finding sites and evaluations, the concept names). Building each with highdicom
and writing each with pydicom's writer, per SR, was almost all of a report job's cost.
``cxrd.sr`` builds them with highdicom once, as prototypes; this module keeps pydicom's own
encoding of them (Explicit VR Little Endian, the SR's character set) and, per SR, encodes
only the elements that differ (a tracking UID, a probability, an image reference) and puts
them in their places. A finished sequence is a ``RawDataElement``, which pydicom's writer
copies as it is.

``DatasetTemplate`` does the same for a whole data set written as a file (``cxrd.seg``:
each lung SEG is its kind's first SEG, as highdicom built it and pydicom wrote it, with the
source's elements, its own UIDs, clock and frames put in their places).

Two headers are written here by hand, as pydicom writes them (``write_sequence_item``,
``write_data_element``; PS3.5 7.1.2 and 7.5): an item's, (FFFE,E000) and its length, and a
sequence's, its tag, "SQ", two zero bytes and its length (defined lengths, Explicit VR
Little Endian). Everything else is pydicom's.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Sequence
from typing import Any, cast

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_sequence_item
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

#: A character set as a data set's Specific Character Set gives it (None: the default).
Charset = str | tuple[str, ...] | None

_ITEM_HEADER = struct.Struct("<HHL")
_SQ_HEADER = struct.Struct("<HH2sHL")
#: An element of a 4-byte-length VR (OB, OW, SQ, ...): tag, VR, two zero bytes, length.
_ELEMENT_HEADER = _SQ_HEADER


def _buffer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    return fp


def _encodings(charset: Charset) -> list[str]:
    if charset is None:
        return ["iso8859"]
    return [charset] if isinstance(charset, str) else list(charset)


def encode_items(items: Iterable[Dataset], charset: Charset) -> bytes:
    """Data sets encoded by pydicom as the items of a sequence (headers included)."""
    fp = _buffer()
    for ds in items:
        write_sequence_item(fp, ds, _encodings(charset))
    return fp.getvalue()


def encode_element(elem: DataElement | RawDataElement, charset: Charset) -> bytes:
    """One element as pydicom encodes it: tag, VR, length and value."""
    fp = _buffer()
    write_data_element(fp, elem, _encodings(charset))
    return fp.getvalue()


def item(body: bytes) -> bytes:
    """A sequence item of defined length holding the encoded elements ``body``."""
    return _ITEM_HEADER.pack(0xFFFE, 0xE000, len(body)) + body


def sequence(keyword: str, items: bytes) -> RawDataElement:
    """A sequence element whose value is the encoded ``items``; pydicom writes it as it is."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown DICOM keyword {keyword!r}")
    return RawDataElement(BaseTag(tag), "SQ", len(items), items, 0, False, True)


class ItemTemplate:
    """A data set encoded once as a sequence item, except for the elements named.

    ``fill(*values)`` gives the item with those elements, in the order the keywords were
    given, encoded by pydicom and placed among the prototype's other elements in tag
    order. A value is the element's value; for a sequence, its encoded items (bytes).
    """

    def __init__(self, prototype: Dataset, keywords: Sequence[str], charset: Charset) -> None:
        self.charset = charset
        slots = []
        for keyword in keywords:
            elem = prototype[keyword]  # KeyError: the prototype lacks a slot
            slots.append((int(elem.tag), elem.VR))
        #: Positions of the given values in tag order, and each slot's tag and VR.
        self._order = sorted(range(len(slots)), key=lambda i: slots[i][0])
        self._slots = [slots[i] for i in self._order]
        runs: list[list[bytes]] = [[] for _ in range(len(slots) + 1)]
        tags = [tag for tag, _ in self._slots]
        for elem in prototype:
            tag = int(elem.tag)
            if tag in tags:
                continue
            runs[sum(t < tag for t in tags)].append(encode_element(elem, charset))
        self._runs = [b"".join(run) for run in runs]

    def fill(self, *values: object) -> bytes:
        if len(values) != len(self._slots):
            raise TypeError(f"{len(self._slots)} values expected, got {len(values)}")
        parts = [self._runs[0]]
        for (tag, vr), i, run in zip(self._slots, self._order, self._runs[1:], strict=True):
            value = values[i]
            if vr == "SQ":
                items = cast(bytes, value)
                parts += [_SQ_HEADER.pack(tag >> 16, tag & 0xFFFF, b"SQ", 0, len(items)), items]
            else:
                parts.append(encode_element(DataElement(tag, vr, value), self.charset))
            parts.append(run)
        return item(b"".join(parts))


# ------------------------------------------------------------------ whole data sets

#: A compiled part of a ``DatasetTemplate``: encoded bytes, a value slot (its name, tag
#: and VR), an element slot (a tag), or a sequence holding slots (its tag, and each item's
#: parts).
_Part = bytes | tuple[str, str, int, str] | tuple[str, int] | tuple[str, int, list[list["_Part"]]]


class DatasetTemplate:
    """A whole data set encoded once, with slots anywhere in its tree, written as pydicom's
    ``dcmwrite(..., enforce_file_format=True)`` writes it (Explicit VR Little Endian).

    ``values`` names value slots: ``{name: (keyword, prototype value)}``. Every element of
    that keyword whose value in ``prototype`` equals that value, at any depth, takes the
    value ``fill`` is given under ``name``; a value that is the same in two places (a
    source image's UID, referenced three times) is one slot, and two elements of one
    keyword with different prototype values (the object's own Series Instance UID, its
    source's) are two. Each slot must occur at least once. ``elements`` names top-level
    tags whose whole element ``fill`` is given (elements copied from a source, as they
    are). Everything else is encoded by pydicom here, once; ``fill`` encodes only the
    slots, and writes the headers of the items and sequences that hold them (defined
    lengths, as pydicom writes them).
    """

    def __init__(self, prototype: Dataset, *, values: dict[str, tuple[str, object]],
                 elements: Iterable[int], charset: Charset) -> None:
        from pydicom.filewriter import correct_ambiguous_vr

        self.charset = charset
        self._by_value = {(keyword, _comparable(value)): name
                          for name, (keyword, value) in values.items()}
        if len(self._by_value) != len(values):
            raise ValueError("two slots name the same keyword and prototype value")
        self._elements = {int(tag) for tag in elements}
        self._met: set[str] = set()
        ds = Dataset()
        for elem in prototype:
            ds.add(elem)
        correct_ambiguous_vr(ds, True)
        self._parts = self._compile(ds, top=True)
        missing = set(values) - self._met
        if missing:
            raise ValueError(f"slots not found in the prototype: {sorted(missing)}")

    def _compile(self, ds: Dataset, *, top: bool) -> list[_Part]:
        parts: list[_Part] = []
        for elem in ds:
            tag = int(elem.tag)
            if tag & 0xFFFF == 0 and tag >> 16 > 6:
                continue  # a retired Group Length: pydicom's writer leaves it out too
            if top and tag in self._elements:
                parts.append(("element", tag))
                continue
            name = (None if elem.VR == "SQ"
                    else self._by_value.get((elem.keyword, _comparable(elem.value))))
            if name is not None:
                self._met.add(name)
                parts.append(("value", name, tag, elem.VR))
            elif elem.VR == "SQ" and elem.value:
                items = [self._compile(ds_item, top=False) for ds_item in elem.value]
                if any(not isinstance(p, bytes) for item_parts in items for p in item_parts):
                    parts.append(("sequence", tag, items))
                else:
                    parts.append(encode_element(elem, self.charset))
            else:
                parts.append(encode_element(elem, self.charset))
        merged: list[_Part] = []
        for part in parts:  # runs of encoded elements as one
            if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] = merged[-1] + part
            else:
                merged.append(part)
        return merged

    def fill(self, values: dict[str, object], elements: dict[int, DataElement]) -> bytes:
        """The data set's encoding with ``values`` in its slots and ``elements`` (by tag;
        one missing is left out)."""
        return self._fill(self._parts, values, elements)

    def _fill(self, parts: list[_Part], values: dict[str, object],
              elements: dict[int, DataElement]) -> bytes:
        out = []
        for part in parts:
            if isinstance(part, bytes):
                out.append(part)
            elif part[0] == "value":
                _, name, tag, vr = cast(tuple[str, str, int, str], part)
                out.append(encode_element(DataElement(tag, vr, values[name]), self.charset))
            elif part[0] == "element":
                elem = elements.get(cast(tuple[str, int], part)[1])
                if elem is not None:
                    out.append(encode_element(elem, self.charset))
            else:
                _, tag, items = cast(tuple[str, int, list[list[_Part]]], part)
                body = b"".join(item(self._fill(p, values, elements)) for p in items)
                out += [_SQ_HEADER.pack(tag >> 16, tag & 0xFFFF, b"SQ", 0, len(body)), body]
        return b"".join(out)


def _comparable(value: object) -> object:
    """A value as a dictionary key: a multi-valued one as a tuple of strings, any other as
    its string."""
    if isinstance(value, list | tuple | MultiValue):
        return tuple(str(v) for v in cast(Iterable[object], value))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return str(value) if value is not None else None


def file_meta_bytes(meta: Dataset, preamble: bytes | None) -> bytes:
    """The preamble, ``DICM`` and the File Meta Information as ``dcmwrite(...,
    enforce_file_format=True)`` writes them before the data set."""
    from pydicom.filewriter import write_file_meta_info

    fp = _buffer()
    fp.write(preamble or b"\0" * 128)
    fp.write(b"DICM")
    write_file_meta_info(fp, cast(Any, meta), enforce_standard=True)
    return fp.getvalue()


_PIXEL_DATA = 0x7FE00010


def part10_bytes(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file: what ``dcmwrite(fp, ds, enforce_file_format=True)`` writes,
    byte for byte. Native Pixel Data (Explicit VR Little Endian) that ends the data set,
    as a heatmap SC's 3 MB do, does not go through pydicom's writer, which copies it into a
    buffer and the buffer into the file: pydicom writes everything before it, and the
    element's header and bytes are joined to that here, one copy."""
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRLittleEndian

    fp = io.BytesIO()
    pixel = ds.get_item(_PIXEL_DATA) if _PIXEL_DATA in ds else None
    meta = getattr(ds, "file_meta", None)
    value = None if pixel is None or pixel.is_raw else pixel.value
    if (not isinstance(value, bytes | bytearray) or pixel is None or pixel.is_undefined_length
            or meta is None or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian
            or max(int(t) for t in ds.keys()) != _PIXEL_DATA):  # noqa: SIM118
        dcmwrite(fp, ds, enforce_file_format=True)
        return fp.getvalue()
    head = Dataset()
    for elem in ds:
        if int(elem.tag) != _PIXEL_DATA:
            head.add(elem)
    head.file_meta = meta
    head.preamble = getattr(ds, "preamble", None)
    dcmwrite(fp, head, enforce_file_format=True)
    vr = pixel.VR if len(pixel.VR) == 2 else (
        "OW" if int(ds.get("BitsAllocated", 8) or 8) > 8 else "OB")
    pad = b"\0" if len(value) % 2 else b""
    return b"".join((fp.getvalue(), _ELEMENT_HEADER.pack(0x7FE0, 0x0010, vr.encode(), 0,
                                                         len(value) + len(pad)), value, pad))
