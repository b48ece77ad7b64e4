"""cxrd.reactor's data set buffer: fragments kept as they come, joined once."""

from __future__ import annotations

import io
import os

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE

from cxrd import reactor


def _p_data(dataset: bytes, max_pdu: int) -> list:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    request.AffectedSOPInstanceUID = "1.2.3.4"
    request.Priority = 0
    request.DataSet = io.BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(1, max_pdu))


def test_a_data_set_in_many_fragments_is_kept_as_it_came() -> None:
    """The fragments are kept as they come (the BytesIO itself is not written, grown nor
    copied); the receiver takes them as they are, and any other reader gets them joined."""
    dataset = os.urandom(100_000)
    primitives = _p_data(dataset, 4096)
    assert len(primitives) > 20
    message = reactor._message()
    for primitive in primitives[:-1]:
        assert message.decode_msg(primitive) is False
    assert message.decode_msg(primitives[-1]) is True
    assert isinstance(message, C_STORE_RQ)
    received = message.message_to_primitive().DataSet
    assert isinstance(received, io.BytesIO)
    fragments = reactor.data_set_fragments(received)
    assert len(fragments) == len(primitives) - 1  # one per data set fragment
    assert b"".join(fragments) == dataset
    assert io.BytesIO.getvalue(received) == b""  # not joined: nothing read it
    assert reactor.data_set_fragments(received) == fragments  # taking them is no read
    # any other reader: joined once, then an ordinary BytesIO
    assert received.read(10) == dataset[:10]
    assert received.getvalue() == dataset
    assert reactor.data_set_fragments(received) == [dataset]
    received.seek(0, io.SEEK_END)
    received.write(b"more")
    assert received.getvalue() == dataset + b"more"
    # a plain BytesIO (the reactor off): its value, in one piece
    assert reactor.data_set_fragments(io.BytesIO(b"abc")) == [b"abc"]


def test_a_message_without_a_data_set() -> None:
    """A C-ECHO (no data set): complete after its command, the data set empty."""
    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO

    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    msg = C_ECHO_RQ()
    msg.primitive_to_message(echo)
    message = reactor._message()
    assert all(message.decode_msg(p) for p in msg.encode_msg(1, 16384))
    assert message.data_set.getvalue() == b""
    assert isinstance(message, DIMSEMessage) and isinstance(message.command_set, Dataset)


class _Dul:
    """What ``_decode_p_data`` uses of a DULServiceProvider: its association."""

    def __init__(self) -> None:
        from pynetdicom import AE
        from pynetdicom.association import Association

        self.assoc = Association(AE(), mode="acceptor")


def test_a_p_data_pdu_decodes_into_views_of_the_bytes_received() -> None:
    from pynetdicom.pdu import P_DATA_TF

    # one PDU with two PDV items: a command fragment and a data set fragment
    parts = []
    for primitive in _p_data(os.urandom(50_000), 16384)[:2]:
        one = P_DATA_TF()
        one.from_primitive(primitive)
        parts.append(one.encode()[6:])
    items = b"".join(parts)
    received = bytearray(b"\x04\x00" + len(items).to_bytes(4, "big") + items)
    theirs = P_DATA_TF()
    theirs.decode(bytes(received))

    pdu, event = reactor._decode_p_data(_Dul(), received, lambda b: pytest.fail("theirs"))
    assert event == "Evt10" and isinstance(pdu, P_DATA_TF)
    values = [(i.presentation_context_id, i.presentation_data_value)
              for i in pdu.presentation_data_value_items]
    assert len(values) == 2
    assert all(isinstance(v, memoryview) and v.obj is received for _, v in values)
    # the same primitive for DIMSE as pynetdicom's
    assert [(c, bytes(v)) for c, v in pdu.to_primitive().presentation_data_value_list] == \
        theirs.to_primitive().presentation_data_value_list

    # another PDU type: pynetdicom's own decoder
    release = bytearray(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert reactor._decode_p_data(_Dul(), release, lambda b: ("theirs", b)) == ("theirs",
                                                                                release)


@pytest.mark.parametrize("damage", ["short-header", "length-past-end", "empty-value"])
def test_a_malformed_p_data_pdu_raises(damage: str) -> None:
    """pynetdicom turns an exception of its PDU decoder into Evt19 (an A-P-ABORT)."""
    good = bytearray(b"\x04\x00\x00\x00\x00\x08" + b"\x00\x00\x00\x04\x01\x02ab")
    bad = {"short-header": good[:-5] + b"\x00\x00",
           "length-past-end": good[:6] + b"\x00\x00\x00\x09" + good[10:],
           "empty-value": bytearray(b"\x04\x00\x00\x00\x00\x05\x00\x00\x00\x01\x01")}[damage]
    with pytest.raises(ValueError):
        reactor._decode_p_data(_Dul(), bad, lambda b: pytest.fail("not a P-DATA-TF"))
    pdu, _ = reactor._decode_p_data(_Dul(), good, None)
    [item] = pdu.presentation_data_value_items
    assert (item.presentation_context_id, bytes(item.presentation_data_value)) == (1, b"\x02ab")
