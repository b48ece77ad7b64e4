"""SR content encoded once and spliced: what makes a study SR cheap to build and write.

A TID 1500 SR of a four-image study is about 300 content items, nearly all of them the same
in every SR one model writes (the observation context, the algorithm identification, the
findings, finding sites and evaluations, the concept names). Building each with highdicom
and writing each with pydicom's writer, per SR, was almost all of a report job's cost.
``cxrd.sr`` builds them with highdicom once, as prototypes; this module keeps pydicom's own
encoding of them (Explicit VR Little Endian, the SR's character set) and, per SR, encodes
only the elements that differ (a tracking UID, a probability, an image reference) and puts
them in their places. A finished sequence is a ``RawDataElement``, which pydicom's writer
copies as it is.

Two headers are written here by hand, as pydicom writes them (``write_sequence_item``,
``write_data_element``; PS3.5 7.1.2 and 7.5): an item's, (FFFE,E000) and its length, and a
sequence's, its tag, "SQ", two zero bytes and its length (defined lengths, Explicit VR
Little Endian). Everything else is pydicom's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import cast

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_sequence_item
from pydicom.tag import BaseTag

#: A character set as a data set's Specific Character Set gives it (None: the default).
Charset = str | tuple[str, ...] | None

_ITEM_HEADER = struct.Struct("<HHL")
_SQ_HEADER = struct.Struct("<HH2sHL")


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
