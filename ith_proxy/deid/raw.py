"""Read and replace text elements without decoding them through pydicom.

Most of what the profile touches is short text (names, IDs, dates, UIDs).
Converting each one to a pydicom DataElement and back costs more than all the
rest of de-identification together, so text elements are read straight from
their raw bytes and replaced by new raw elements, which the writer frames
and copies as they are.  Anything else (sequences, binary and numeric
values, cleaning) takes the general path in the engine.  This module only
reads and writes: what the new value is, on either path, is
``actions.replacement``'s decision.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import cast

from pydicom.charset import decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.tag import BaseTag

from ith_proxy.deid.pseudo import unpad_uid

TEXT_VRS = frozenset(
    {
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    }
)
_CHARSET_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
_DELIMITERS = {0x5C, 0x3D, 0x5E}  # backslash, '=', '^' reset the character set
# VRs with a 4-byte length (and 2 reserved bytes) in explicit VR
_LONG = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})


def vr_of(raw: RawDataElement, tag: int) -> str | None:
    if raw.VR is not None:
        return raw.VR
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def text_of(
    raw: DataElement | RawDataElement | None, tag: int, charset: Callable[[], str | list[str]]
) -> tuple[str, str] | None:
    """(VR, text) for an undecoded text element as its data set's dict holds it,
    else None.  ``charset()`` gives the data set's character sets: asked only
    for text that is not plain ASCII (pydicom recomputes them on each call)."""
    if not isinstance(raw, RawDataElement) or raw.value is None or raw.length == 0xFFFFFFFF:
        return None
    vr = vr_of(raw, tag)
    if vr not in TEXT_VRS:
        return None
    return vr, text_bytes(vr, raw.value, charset)


def text_bytes(vr: str, value: bytes, charset: Callable[[], str | list[str]]) -> str:
    """The text of a text VR's value bytes, less its padding."""
    if vr in _CHARSET_VRS and not (value.isascii() and b"\x1b" not in value):
        # not plain ASCII: the data set's character sets decide.  Plain ASCII
        # without an escape reads the same in every character set DICOM
        # defines (their Python codecs all map 0x00-0x7F to ASCII) and skips
        # that lookup: most text is ASCII.
        text = decode_bytes(value, charset(), _DELIMITERS)
    else:
        text = value.decode("ascii", "replace")
    return text.rstrip(" \x00")


def read_text(ds: Dataset, tag: BaseTag) -> tuple[RawDataElement, str, str] | None:
    """(raw element, VR, text) for an undecoded text element, else None."""
    raw = cast("DataElement | RawDataElement | None", ds.get_item(tag))
    found = text_of(raw, tag, lambda: ds._character_set)
    if found is None:
        return None
    return cast("RawDataElement", raw), found[0], found[1]


def stored_uid(ds: Dataset, keyword: str) -> str:
    """A UI element's value as stored, less its one legal NUL pad ("" if absent).
    Read from the raw bytes: decoding strips any trailing whitespace, so
    ``1.2.3\\n`` would read as ``1.2.3``."""
    tag = tag_for_keyword(keyword)
    raw = cast("DataElement | RawDataElement | None", ds.get_item(tag) if tag is not None else None)
    if raw is None or raw.value is None:
        return ""
    if isinstance(raw, RawDataElement):
        return unpad_uid(bytes(raw.value))
    return str(raw.value)


def plain_in_dict(tag: int) -> bool:
    """Whether setting or deleting ``tag`` in a Dataset is only a change of its
    dict (issue 11: the walk then skips pydicom's checks).  Not for a private
    tag (pydicom decodes it and keeps its private blocks) nor the pixel group
    (pydicom resets its pixel array)."""
    return not (tag >> 16 & 1 or tag >> 16 == 0x7FE0)


def padded(text: str, vr: str) -> bytes:
    """An ASCII value's bytes padded to even length the DICOM way: a NUL for a
    UI, a space for other text."""
    data = text.encode("ascii")
    return data + (b"\x00" if vr == "UI" else b" ") if len(data) % 2 else data


def replace_text(ds: Dataset, raw: RawDataElement, vr: str, text: str) -> None:
    """Put an ASCII value in place of ``raw``, padded the DICOM way."""
    data = padded(text, vr)
    tag = raw.tag
    new = RawDataElement(tag, raw.VR, len(data), data, 0, raw.is_implicit_VR, raw.is_little_endian)
    if plain_in_dict(tag):
        ds._dict[tag] = new  # all __setitem__ does for this one, less its checks
    else:
        ds[tag] = new


def _writer(implicit: bool, little: bool) -> tuple[DicomFileLike, io.BytesIO]:
    buf = io.BytesIO()
    fp = DicomFileLike(buf)
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    return fp, buf


def _value_bytes(elem, implicit: bool, little: bool) -> bytes:
    """The encoded value of one element (its header cut off)."""
    if elem.VR == "SQ":  # items with defined lengths
        order = "<" if little else ">"
        items = []
        for item in elem.value:
            fp, buf = _writer(implicit, little)
            write_dataset(fp, item)
            content = buf.getvalue()
            items.append(struct.pack(order + "HHL", 0xFFFE, 0xE000, len(content)) + content)
        return b"".join(items)
    fp, buf = _writer(implicit, little)
    write_data_element(fp, elem)
    head = 8 if implicit or elem.VR not in _LONG else 12
    return buf.getvalue()[head:]


def encode_raw(elements: list, implicit: bool, little: bool) -> list[RawDataElement]:
    """Encode elements once into raw elements, to be added to many datasets."""
    out = []
    for elem in elements:
        value = _value_bytes(elem, implicit, little)
        out.append(
            RawDataElement(
                elem.tag, None if implicit else elem.VR, len(value), value, 0, implicit, little
            )
        )
    return out
