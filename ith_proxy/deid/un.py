"""Elements of unknown type (VR UN): find the sequences among them.

A router that does not know a sequence re-encodes it as UN in explicit VR,
and in implicit VR a tag the dictionary does not know (a private one, or one
newer than pydicom's dictionary) has no type at all.  Kept as they are, such
values would carry whatever they nest (names, original UIDs, dates) to the
output byte for byte.  PS3.5 6.2.2: the value of a UN-encoded sequence is
its items in implicit VR little endian, so it can always be read back as one.

``settle`` looks at one such element and, when its tag is a sequence in the
dictionary or its bytes parse as sequence items, replaces it in place by a
real SQ element (items decoded as implicit VR little endian, their elements
left raw), which the engine then walks like any sequence and the writer
encodes as SQ in the output transfer syntax.  Only UN and untyped elements
come here: every typed element keeps the fast raw path.
"""

from __future__ import annotations

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

ITEM_LE = b"\xfe\xff\x00\xe0"  # (FFFE,E000) in little endian: an item starts

SEQUENCE = "SQ"  # it was a sequence: now it is an SQ element
TYPED = "typed"  # the dictionary gives it a VR: the profile treats it as such
UNTYPED = "untyped"  # nothing says what it holds
BROKEN = "broken"  # it claims to be a sequence (by its tag or its first bytes) but is none


def dictionary_vr(tag: BaseTag) -> str | None:
    """The dictionary's VR for a standard tag, None when unknown (or private)."""
    if tag.is_private:
        return None
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _as_sequence(tag: BaseTag, value: bytes) -> DataElement | None:
    if not value:
        return DataElement(tag, "SQ", Sequence())
    if value[:4] != ITEM_LE:
        return None
    try:
        elem = convert_raw_data_element(RawDataElement(tag, "SQ", len(value), value, 0, True, True))
    except Exception:
        return None
    return elem if elem.VR == "SQ" and isinstance(elem.value, Sequence) else None


def holds_items(value: object) -> bool:
    """Do these bytes start like sequence items?"""
    return isinstance(value, (bytes, bytearray)) and bytes(value[:4]) == ITEM_LE


def settle(ds: Dataset, tag: BaseTag) -> str:
    """Classify the UN or untyped element at ``tag`` (see the module docstring);
    a sequence is converted in place."""
    elem = ds.get_item(tag)
    known = dictionary_vr(tag)
    if known == "UN":
        known = None
    value = elem.value
    if not isinstance(value, (bytes, bytearray)):
        return TYPED if known else UNTYPED  # already decoded (or empty)
    value = bytes(value)
    if known in (None, "SQ"):
        seq = _as_sequence(tag, value) if (value or known == "SQ") else None
        if seq is not None:
            ds[tag] = seq
            return SEQUENCE
        return BROKEN if known == "SQ" or value[:4] == ITEM_LE else UNTYPED
    if value[:4] == ITEM_LE and _as_sequence(tag, value) is not None:
        return BROKEN  # items are no value of the VR the dictionary gives
    return TYPED


def needs_settling(elem, tag: BaseTag) -> bool:
    """UN in explicit VR, or no VR (implicit) and none in the dictionary."""
    return elem.VR == "UN" or (elem.VR is None and dictionary_vr(tag) in (None, "UN"))


def settle_items(seq: Sequence) -> None:
    """``settle`` every UN or untyped element inside ``seq``, at every depth, so
    that a removed sequence is recorded value by value."""
    for item in seq:
        for tag in list(item.keys()):
            if needs_settling(item.get_item(tag), tag):
                settle(item, tag)
            elem = item.get_item(tag)
            if elem.VR == "SQ" or (elem.VR is None and dictionary_vr(tag) == "SQ"):
                value = item[tag].value
                if value:
                    settle_items(value)
