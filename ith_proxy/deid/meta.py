"""File meta information of an output: rebuilt from an allow-list.

Whatever the input's (0002,xxxx) group held (Source, Sending and Receiving
AE titles, Source Presentation Address, Private Information and its creator,
elements no standard defines) the output's meta has only what PS3.10 7.1
needs: version, SOP class and instance, transfer syntax, and our own
implementation class and version.  Source Application Entity Title
(0002,0016) is not kept: it names the sending modality's AE, which is device
identity (the SCP writes the calling AE there).  dicomfile.write_joined
writes these tags and no others, whatever the dataset's meta holds.
"""

from __future__ import annotations

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.tag import BaseTag

from ith_proxy.config import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from ith_proxy.deid.raw import padded

KEPT = frozenset((0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013))
_OURS = (
    (BaseTag(0x00020001), "OB", b"\x00\x01"),
    (BaseTag(0x00020012), "UI", IMPLEMENTATION_CLASS_UID),
    (BaseTag(0x00020013), "SH", IMPLEMENTATION_VERSION),
)


def _encoded(vr: str, value: str | bytes) -> bytes:
    """``value`` as an Explicit VR LE meta group holds it, padded to even."""
    return value if isinstance(value, bytes) else padded(value, vr)


def _same_raw(old: DataElement | RawDataElement | None, vr: str, value: str | bytes) -> bool:
    """An undecoded element holding exactly ``value`` as we would write it (the
    SCP wrote the version and our implementation class and version so): no
    change, so no need to decode it to compare (issue 11).  Anything else is
    compared decoded, as before."""
    return (
        type(old) is RawDataElement
        and vr == old.VR
        and not old.is_implicit_VR
        and old.is_little_endian
        and old.value == _encoded(vr, value)
    )


def _path(elem: DataElement) -> str:
    tag = elem.tag
    return "FileMeta." + (elem.keyword or f"({tag.group:04X},{tag.element:04X})")


def rebuild(meta: FileMetaDataset, sop_uid: str) -> list[tuple[str, DataElement]]:
    """Reduce ``meta`` in place to the allow-list, with our values and ``sop_uid``;
    return (path, original element) for every value removed or replaced."""
    gone: list[tuple[str, DataElement]] = []
    for tag in [t for t in meta.keys() if int(t) not in KEPT]:  # int: no Python __eq__
        if tag & 0xFFFF:  # the group length is recomputed on writing
            gone.append((_path(meta[tag]), meta[tag]))
        del meta[tag]
    for tag, vr, value in (*_OURS, (BaseTag(0x00020003), "UI", sop_uid)):
        if _same_raw(meta.get_item(tag, keep_deferred=True), vr, value):
            continue  # as the SCP wrote it, byte for byte: nothing to change
        old = meta.get(tag)
        if old is not None and old.value == value:
            continue  # as the SCP wrote it: nothing to change
        if old is not None and old.value not in (None, "", b""):
            gone.append((_path(old), DataElement(tag, old.VR, old.value)))
        meta[tag] = DataElement(tag, vr, value)
    return gone
