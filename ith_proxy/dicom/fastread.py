"""The common case of ``files.read_split``'s parse, without pydicom's generator.

pydicom's ``read_dataset`` reads an element with several ``fp.read`` calls
and a dozen checks (issue 11: ~140 of the ~200 µs ``read_split`` spends on
a 64x64 CT).  The functions here parse the same bytes with ``unpack_from``
over one buffer and build exactly the elements ``data_element_generator``
yields: ``RawDataElement(BaseTag(tag), vr, length, value, value_tell,
is_implicit_VR, is_little_endian)``, with the same empty value for a
zero-length element, value_tell the file offset of the value (of the meta
group's bytes for the file meta, which pydicom reads from a BytesIO of
them) and undefined-length sequences read by pydicom's own
``read_sequence`` from the file at the same offset, with the encoding the
generator would pass.

They return None for anything they do not reproduce exactly, and the
caller then takes pydicom's path from the start: an element with an
unknown VR (pydicom's implicit-VR switch, or its 2-byte-length guess), the
first element of an implicit VR dataset that looks explicit, an undefined
length other than an explicit VR SQ, a value or header cut by the end of
the file, a value over 16 MiB (BIG_VALUE) not in the first read, bytes
left that are not a whole element header, item tags or
groups below 0004 at the top level (pydicom stops there, or the caller
refuses), and a meta group holding other groups.  Errors are always left
to pydicom's path, so their classes and messages are its.
``tests/test_read_equal.py`` compares both paths over a corpus.
"""

from __future__ import annotations

import struct
from collections.abc import MutableSequence
from typing import BinaryIO, cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.filereader import ENCODED_VR, read_sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_string

# Every 2-byte VR pydicom knows, as the str it yields (vr.decode(default_encoding))
_VRS = {vr: vr.decode(default_encoding) for vr in ENCODED_VR if len(vr) == 2}
_VRS_32 = frozenset(vr for vr, name in _VRS.items() if name in EXPLICIT_VR_LENGTH_32)
PIXEL_TAGS = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))  # also files.py's
_UNDEFINED = 0xFFFFFFFF
_CHARSET = 0x00080005
FIRST_DATASET_GROUP = 0x0004  # as files.FIRST_DATASET_GROUP (0000-0003: refused there)
READ_SIZE = 1 << 15  # the header of most instances, with the start of its pixels
# A longer value before the pixels is left to pydicom, which reads it once
# (here the buffer would be joined with it: twice the memory for a moment)
BIG_VALUE = 1 << 24
# The elements are built as tuple.__new__(RawDataElement, (...9 fields)): only
# while its fields and defaults are those of pydicom 3.0
_FIELDS = "tag VR length value value_tell is_implicit_VR is_little_endian is_raw is_buffered"
_SAME_TUPLE = RawDataElement._fields == tuple(_FIELDS.split()) and (
    RawDataElement._field_defaults == {"is_raw": True, "is_buffered": False}
)


class _Unhandled(Exception):
    """Not the common case: the caller reads the file with pydicom."""


def _upper(b: int) -> bool:
    return 0x40 < b < 0x5B


Elements = dict[BaseTag, DataElement | RawDataElement]  # a Dataset's _dict


def meta_elements(raw: bytes) -> Elements | None:
    """The file meta group's elements (after its group length) as
    ``read_dataset(BytesIO(raw), False, True)`` reads them, or None."""
    try:
        elements, _ = _parse(None, raw, 0, len(raw), False, True, meta=True)
    except _Unhandled:
        return None
    return elements


def dataset_elements(
    fh: BinaryIO, start: int, size: int, implicit: bool, little: bool
) -> tuple[Elements, int] | None:
    """The dataset's elements from ``start`` up to the pixel data, and the
    pixel data element's offset (``size`` if there is none), as
    ``read_dataset(fh, implicit, little, stop_when=<pixel tags>)`` reads
    them; or None.  ``fh`` is left anywhere."""
    fh.seek(start)
    try:
        return _parse(fh, fh.read(READ_SIZE), start, size, implicit, little, meta=False)
    except _Unhandled:
        return None


def _parse(
    fh: BinaryIO | None,
    buf: bytes,
    pos: int,
    size: int,
    implicit: bool,
    little: bool,
    *,
    meta: bool,
) -> tuple[Elements, int]:
    """Elements of ``buf`` (the file's bytes from ``pos``; more are read from
    ``fh``, which is at the end of ``buf``, when needed) up to ``size``."""
    if not _SAME_TUPLE:
        raise _Unhandled
    order = "<" if little else ">"
    head = struct.Struct(order + "HHL" if implicit else order + "HH2sH").unpack_from
    long_length = struct.Struct(order + "L").unpack_from
    base, limit = pos, pos + len(buf)  # the file offsets of buf[0] and of its end
    elements: Elements = {}
    charset: bytes | None = None  # the last (0008,0005) value, for read_sequence
    vr: str | None = None
    new, raw, vrs, vrs_32 = tuple.__new__, RawDataElement, _VRS, _VRS_32
    if pos + 6 <= size:  # read_dataset's guess from the first element
        first = buf[4:6] if len(buf) >= 6 else b""
        if len(first) < 2 or implicit == (_upper(first[0]) and _upper(first[1])):
            raise _Unhandled  # a VR where none is expected, or none where one is
    while pos < size:
        if pos + 12 > limit:  # the longest element header
            if pos + 8 > size:
                raise _Unhandled  # pydicom stops at a cut header, at the end of the file
            buf, base = _more(fh, buf, base, pos, min(pos + 12, size))
            limit = base + len(buf)
        i = pos - base
        if implicit:
            group, elem, length = head(buf, i)
            value_tell = pos + 8
        else:
            group, elem, vr_bytes, length = head(buf, i)
            vr = vrs.get(vr_bytes)
            if vr is None:
                raise _Unhandled  # pydicom's implicit switch or 2-byte guess
            if vr_bytes in vrs_32:
                if pos + 12 > size:
                    raise _Unhandled
                length = long_length(buf, i + 8)[0]
                value_tell = pos + 12
            else:
                value_tell = pos + 8
        tag = group << 16 | elem
        if not FIRST_DATASET_GROUP <= group < 0x7FE0 or meta:
            if meta:
                if group != 0x0002:
                    raise _Unhandled  # refused by the caller's pydicom path
            elif tag in PIXEL_TAGS:
                return elements, pos
            elif group < FIRST_DATASET_GROUP or group == 0xFFFE:
                raise _Unhandled  # refused by the caller, or where pydicom stops
        if length == _UNDEFINED:
            if meta or vr != "SQ" or fh is None:
                raise _Unhandled
            btag = BaseTag(tag)
            elements[btag] = _sequence(fh, btag, value_tell, implicit, little, charset)
            pos = fh.tell()
            if pos > size:
                raise _Unhandled
            buf, base, limit = b"", pos, pos  # fh is at pos
            continue
        end = value_tell + length
        if end > limit:
            if end > size or length > BIG_VALUE:
                raise _Unhandled  # a cut value (pydicom keeps it, or fails); a huge one
            buf, base = _more(fh, buf, base, pos, end)
            limit = base + len(buf)
        value = buf[value_tell - base : end - base] if length else _empty(vr)
        if tag == _CHARSET:
            charset = value or b""
        btag = BaseTag(tag)
        # RawDataElement(btag, vr, ...) without its Python __new__: the same tuple
        fields = (btag, vr, length, value, value_tell, implicit, little, True, False)
        elements[btag] = new(raw, fields)
        pos = end
    if pos != size:
        raise _Unhandled
    return elements, size


def _sequence(
    fh: BinaryIO, tag: BaseTag, value_tell: int, implicit: bool, little: bool, charset: bytes | None
) -> DataElement:
    """An undefined-length sequence, read by pydicom as its generator does."""
    fh.seek(value_tell)
    encoding: str | MutableSequence[str] = default_encoding
    if charset is not None:
        encoding = convert_encodings(convert_string(charset, little))
    try:
        seq = read_sequence(fh, implicit, little, _UNDEFINED, encoding)
    except MemoryError:
        raise
    except Exception:
        raise _Unhandled from None  # pydicom's path fails the same way
    return DataElement(tag, "SQ", seq, value_tell, is_undefined_length=True)


def _empty(vr: str | None) -> bytes | None:
    """The value pydicom gives a zero-length raw element (b"" or None)."""
    return cast("bytes | None", empty_value_for_VR(vr, raw=True))


def _more(fh: BinaryIO | None, buf: bytes, base: int, pos: int, need: int) -> tuple[bytes, int]:
    """The buffer from ``pos`` to at least ``need``; ``fh`` is at its end."""
    if fh is None:
        raise _Unhandled  # the meta: all of it was given
    end = base + len(buf)
    more = fh.read(max(READ_SIZE, need - end))
    buf = buf[pos - base :] + more
    if pos + len(buf) < need:
        raise _Unhandled  # the file is shorter than it was
    return buf, pos
