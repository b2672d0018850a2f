"""A Part 10 header as flat elements: the indexer's common case without pydicom.

``read`` parses the file meta and the data set up to the pixel data into
``Elem`` objects (tag, VR, value bytes, or items for a sequence) held in
dicts by tag, in file order; ``encode`` frames them back, and ``write``
writes a whole output (meta, header, the pixel bytes copied as they are).
Nothing is converted: values stay the bytes that were received.

This is the fast lane of issue 11.  It takes only what it reproduces
exactly as the pydicom path does (``dicom/files.py``): little endian data
sets (explicit or implicit VR), every VR known and none UN, sequences of
defined or undefined length with items of either kind, no nested character
set, file meta, command or pixel data elements inside items, no elements
after the pixel data.  ``read`` returns None for anything else, and for
anything broken, and the caller takes the pydicom path from the start, so
errors keep that path's classes and messages.  Which output the two paths
make for the same file is compared by ``tests/test_flat_equal.py``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.uid import UID

from ith_proxy.dicom import file_meta, files
from ith_proxy.dicom.scu_wire import WireError, meta_group

READ_SIZE = 1 << 15  # most headers, with the start of the pixel data
MAX_HEADER = 1 << 24  # a longer header is left to pydicom's reader
MAX_DEPTH = 16  # sequences nested deeper are left to pydicom's reader
PIXEL_TAGS = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))
CHARSET = 0x00080005
_LONG = files.LONG_VR_NAMES
_SHORT = frozenset(
    ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH")
)
_SHORT |= frozenset(("SL", "SS", "ST", "TM", "UI", "UL", "US"))
_VRS = {vr.encode(): vr for vr in _LONG | _SHORT}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # native little endian
_HEAD = struct.Struct("<HH2sH")
_HEAD_LONG = struct.Struct("<HH2s2xL")
_HEAD_IMPLICIT = struct.Struct("<HHL")
_U32 = struct.Struct("<L")


class Elem:
    """One element: ``value`` is its bytes, or a list of items for a sequence
    read here (``items``); ``span`` is where it was read in the header buffer
    ((0, 0) for a new element)."""

    __slots__ = ("items", "span", "tag", "undefined", "value", "vr")

    def __init__(
        self,
        tag: int,
        vr: str,
        value: bytes = b"",
        items: list[Item] | None = None,
        undefined: bool = False,
        span: tuple[int, int] = (0, 0),
    ) -> None:
        self.tag, self.vr, self.value, self.items = tag, vr, value, items
        self.undefined, self.span = undefined, span


@dataclass
class Item:
    elements: dict[int, Elem]
    undefined: bool  # read with an undefined length: written so again


@dataclass
class Header:
    """What ``read`` found: the buffer the spans point into, the meta and
    data set elements, and where the pixel data is (as ``files.SplitFile``)."""

    buf: bytes
    meta: dict[int, Elem]
    elements: dict[int, Elem]
    implicit: bool
    transfer_syntax: str
    pixel_start: int
    pixel_end: int
    size: int
    meta_buf: bytes  # the file meta group's bytes (after its group length), where meta spans point


class _Unhandled(Exception):
    """Not the common case: the caller reads the file with pydicom."""


def read(fh: BinaryIO) -> Header | None:
    """The header of the Part 10 file ``fh``, or None (see the module doc)."""
    try:
        size = fh.seek(0, 2)
        fh.seek(0)
        try:
            _, raw = meta_group(fh)
        except WireError:
            raise _Unhandled from None
        meta = _elements(raw, 0, len(raw), False, meta=True)[0]
        ts = meta.get(0x00020010)
        if ts is None:
            raise _Unhandled
        syntax = _uid_text(ts.value)
        implicit = syntax == _LE_SYNTAXES[0]
        if syntax not in _LE_SYNTAXES:
            uid = UID(syntax)
            if (
                not uid.is_transfer_syntax
                or not uid.is_little_endian
                or uid.is_implicit_VR
                or uid.is_deflated
            ):
                raise _Unhandled  # big endian, deflated, private: pydicom's path
        body = fh.tell()
        want = READ_SIZE
        while True:  # a header longer than the first read is read again, whole
            fh.seek(body)
            buf = fh.read(min(want, size - body))
            try:
                elements, start, _ = _elements(buf, 0, len(buf), implicit)
            except _More:
                if len(buf) >= size - body or want >= MAX_HEADER:
                    raise _Unhandled from None
                want *= 4
                continue
            break
        pixel_start = body + start
        try:
            pixel_end = files.element_end(fh, pixel_start, implicit, True)
        except files.DicomFileError:
            raise _Unhandled from None
        if pixel_end != size:
            raise _Unhandled  # cut, or elements after the pixel data: pydicom's path
        return Header(
            buf[:start], meta, elements, implicit, syntax, pixel_start, pixel_end, size, raw
        )
    except (_Unhandled, struct.error, UnicodeDecodeError):
        return None


class _More(Exception):
    """The buffer ends inside the header."""


def _elements(
    buf: bytes,
    pos: int,
    end: int,
    implicit: bool,
    *,
    meta: bool = False,
    nested: bool = False,
    delimited: bool = False,
    depth: int = 0,
) -> tuple[dict[int, Elem], int, bool]:
    """The elements of ``buf[pos:end]``: the dict, where they stop, and whether
    an item delimiter stopped them (nested) or the pixel data (at the top
    level).  Running past ``end`` is ``_More`` when ``end`` is the buffer's
    end (more of the file may hold the rest), else a broken structure."""
    out: dict[int, Elem] = {}
    head, long_length = _HEAD_IMPLICIT.unpack_from, _U32.unpack_from
    explicit = _HEAD.unpack_from
    short = _More if end == len(buf) and not meta else _Unhandled
    while pos < end:
        if pos + 8 > end:
            raise short
        if implicit:
            group, element, length = head(buf, pos)
            tag = group << 16 | element
            value_at = pos + 8
            vr = _implicit_vr(tag) if group != 0xFFFE and tag not in PIXEL_TAGS else ""
        else:
            group, element, vr_bytes, length = explicit(buf, pos)
            tag = group << 16 | element
            if group == 0xFFFE:
                vr = ""
                length, value_at = head(buf, pos)[2], pos + 8
            else:
                vr = _VRS.get(vr_bytes, "")
                if not vr or vr == "UN":
                    raise _Unhandled
                if vr in _LONG:
                    if pos + 12 > end:
                        raise short
                    length, value_at = long_length(buf, pos + 8)[0], pos + 12
                else:
                    value_at = pos + 8
        if meta:
            if group != 0x0002 or length == _UNDEFINED:
                raise _Unhandled
        elif group == 0xFFFE:
            if nested and tag == _ITEM_END and length == 0:
                return out, value_at, True
            raise _Unhandled
        elif tag in PIXEL_TAGS:
            if nested:
                raise _Unhandled
            return out, pos, True
        elif group < (0x0008 if nested else 0x0004) or (nested and tag == CHARSET):
            raise _Unhandled  # refused or decided by pydicom's path
        if vr == "SQ":
            if depth >= MAX_DEPTH:
                raise _Unhandled  # a hostile nesting: pydicom's path refuses it
            items, stop = _items(buf, value_at, length, end, implicit, depth + 1)
            out[tag] = Elem(tag, vr, b"", items, length == _UNDEFINED, (pos, stop))
            pos = stop
            continue
        if length == _UNDEFINED:
            raise _Unhandled
        stop = value_at + length
        if stop > end:
            raise short
        out[tag] = Elem(tag, vr, buf[value_at:stop], None, False, (pos, stop))
        pos = stop
    if meta or (nested and not delimited):
        return out, pos, False
    raise short  # the top level ran out before the pixel data; an item before its delimiter


def _items(
    buf: bytes, pos: int, length: int, end: int, implicit: bool, depth: int
) -> tuple[list[Item], int]:
    """The items of a sequence whose value starts at ``pos`` (within ``end``),
    and where the sequence ends."""
    undefined = length == _UNDEFINED
    limit = end if undefined else pos + length
    if limit > end:
        raise _More if end == len(buf) else _Unhandled
    short = _More if limit == len(buf) else _Unhandled
    items: list[Item] = []
    while True:
        if not undefined and pos == limit:
            return items, pos
        if pos + 8 > limit:
            raise short
        group, element, item_length = _HEAD_IMPLICIT.unpack_from(buf, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQ_END and undefined and item_length == 0:
            return items, pos
        if tag != _ITEM:
            raise _Unhandled
        if item_length == _UNDEFINED:
            elements, pos, _ = _elements(
                buf, pos, limit, implicit, nested=True, delimited=True, depth=depth
            )
            items.append(Item(elements, True))
            continue
        stop = pos + item_length
        if stop > limit:
            raise short
        elements, at, early = _elements(buf, pos, stop, implicit, nested=True, depth=depth)
        if early or at != stop:
            raise _Unhandled
        items.append(Item(elements, False))
        pos = stop


_VR_CACHE: dict[int, str] = {}


def _implicit_vr(tag: int) -> str:
    """The dictionary's VR of a standard tag in implicit VR (unknown tags and
    tags with a choice of VRs are pydicom's path); see the private ones below."""
    vr = _VR_CACHE.get(tag)
    if vr is None:
        if tag >> 16 & 1:  # private: a creator is LO; "" for a data element, which
            # only pydicom's private dictionary types (the lane removes it, asking pydicom)
            return "LO" if 0x0010 <= tag & 0xFFFF <= 0x00FF else ""
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise _Unhandled from None
        if (vr not in _LONG and vr not in _SHORT) or vr == "UN":
            raise _Unhandled  # "US or SS", "OB or OW", ...
        _VR_CACHE[tag] = vr
    return vr


def _uid_text(value: bytes) -> str:
    """A UI value as stored, less its one legal NUL pad (as deid.pseudo.unpad_uid)."""
    if value.endswith(b"\x00"):
        value = value[:-1]
    return value.decode("latin-1")


# --- writing ---


def frame(elem: Elem, implicit: bool) -> bytes:
    """One element as the pydicom path writes it (a sequence read here is
    encoded again with its items; a sequence given as bytes is framed)."""
    group, element = elem.tag >> 16, elem.tag & 0xFFFF
    if elem.items is not None:
        value = b"".join(_item(item, implicit) for item in elem.items)
        if elem.undefined:
            length = _UNDEFINED
            value += b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        else:
            length = len(value)
    else:
        value, length = elem.value, len(elem.value)
    if implicit:
        return _HEAD_IMPLICIT.pack(group, element, length) + value
    vr = elem.vr
    if vr in _LONG:
        return _HEAD_LONG.pack(group, element, vr.encode(), length) + value
    if length > 0xFFFF:
        raise ValueError("a value too long for its VR's length field")
    return _HEAD.pack(group, element, vr.encode(), length) + value


def _item(item: Item, implicit: bool) -> bytes:
    content = encode(item.elements, implicit)
    if item.undefined:
        return (
            _HEAD_IMPLICIT.pack(0xFFFE, 0xE000, _UNDEFINED)
            + content
            + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        )
    return _HEAD_IMPLICIT.pack(0xFFFE, 0xE000, len(content)) + content


def encode(elements: dict[int, Elem], implicit: bool) -> bytes:
    """Elements in tag order, framed; group lengths are never written."""
    return b"".join(frame(elements[tag], implicit) for tag in sorted(elements) if tag & 0xFFFF)


def write(out: BinaryIO, header: Header, meta: bytes, src: BinaryIO) -> None:
    """The output: ``meta`` (the encoded file meta group), the de-identified
    header, then the pixel data element copied from ``src`` as it is."""
    out.write(file_meta.PREAMBLE + meta + encode(header.elements, header.implicit))
    src.seek(header.pixel_start)
    files.copy_range(out, src, header.pixel_end - header.pixel_start)
