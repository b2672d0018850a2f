"""The indexer's fast lane (issue 11): one incoming file without pydicom's Dataset.

``prepare`` reads a file as flat elements (``dicom/flat.py``), makes the
indexer's checks and PHI-risk tests, de-identifies it (``deid/flat.py``)
and returns what the indexer files: the result, the row's values and how
to write the output.  It decides only what is plainly fine: any doubt
(a check that fails, a risk, text that needs its character set, an input
the lane does not take) returns None, and the indexer takes the pydicom
path from the start, which decides, quarantines and words the error as
always.  So the lane never refuses nor accepts anything the pydicom path
would not; ``tests/test_flat_equal.py`` compares both over a corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from ith_proxy.deid import valid_uid
from ith_proxy.deid.engine import DeidResult
from ith_proxy.deid.flat import Fallback, FlatWalk
from ith_proxy.deid.pseudo import unpad_uid
from ith_proxy.deid.risk import SECONDARY_CAPTURE
from ith_proxy.dicom import codestream, flat
from ith_proxy.dicom import files as dicomfile

SOP_CLASS, SOP_INSTANCE, STUDY, SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
MODALITY = 0x00080060
_BURNED_IN = (0x00280301, 0x00280302)  # BurnedInAnnotation, RecognizableVisualFeatures


@dataclass
class Prepared:
    header: flat.Header
    result: DeidResult
    meta: bytes  # the output's file meta group, encoded
    sop_class: str
    modality: str
    main: dict[str, dict[str, str]]  # files.main_attributes of the de-identified header

    def write(self, out: BinaryIO, src: BinaryIO) -> None:
        flat.write(out, self.header, self.meta, src)


def prepare(src: BinaryIO, walk: FlatWalk, burned_in: bool) -> Prepared | None:
    """The fast lane's outcome for the open file ``src``, or None: pydicom's path."""
    header = flat.read(src)
    if header is None or not _checked(header) or _risky(header, src, burned_in):
        return None
    sop_class = unpad_uid(header.elements[SOP_CLASS].value)
    try:
        result, meta = walk.apply(header)
        return Prepared(
            header,
            result,
            meta,
            sop_class,
            _modality(header.elements),
            _main_attributes(header.elements),
        )
    except Fallback:
        return None


def _checked(header: flat.Header) -> bool:
    """``index_checks.check`` passes, as far as the bytes show it plainly."""
    elements, meta = header.elements, header.meta
    for tag in (SOP_CLASS, SOP_INSTANCE, STUDY, SERIES):
        elem = elements.get(tag)
        if elem is None or elem.vr != "UI" or not valid_uid(unpad_uid(elem.value)):
            return False
    for meta_tag, tag in ((0x00020003, SOP_INSTANCE), (0x00020002, SOP_CLASS)):
        stored = meta.get(meta_tag)
        if stored is not None and unpad_uid(stored.value) != unpad_uid(elements[tag].value):
            return False
    return header.pixel_start < header.size


def _risky(header: flat.Header, src: BinaryIO, burned_in: bool) -> bool:
    """Whether ``deid.risk.phi_risk`` might name a risk (then pydicom's path decides)."""
    if burned_in:
        for tag in _BURNED_IN:
            elem = header.elements.get(tag)
            if elem is not None and (not elem.value.isascii() or b"YES" in elem.value.upper()):
                return True
        if unpad_uid(header.elements[SOP_CLASS].value).startswith(SECONDARY_CAPTURE):
            return True
    return bool(codestream.scan(src, header))


def _modality(elements: dict[int, flat.Elem]) -> str:
    """``str(ds.get("Modality", "") or "")`` for a single plain value."""
    elem = elements.get(MODALITY)
    if elem is None:
        return ""
    text = dicomfile.printable(elem.value)
    if elem.vr != "CS" or text is None or "\\" in text:
        raise Fallback
    return elem.value.decode("ascii").rstrip(" \x00")


def _main_attributes(elements: dict[int, flat.Elem]) -> dict[str, dict[str, str]]:
    """``files.main_attributes`` for printable values (others: Fallback)."""
    out: dict[str, dict[str, str]] = {}
    for level, pairs in dicomfile.MAIN_TAGS:
        values = out.setdefault(level, {})
        for column, tag in pairs:
            elem = elements.get(tag)
            if elem is None or elem.vr in dicomfile.NO_MAIN_TEXT:
                values[column] = ""
                continue
            text = dicomfile.printable(elem.value)
            if text is None:
                raise Fallback
            values[column] = text
    return out
