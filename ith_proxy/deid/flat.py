"""The de-identification walk over flat elements (``dicom/flat.py``): issue 11's fast lane.

``FlatWalk(deid).apply(header)`` does to a ``flat.Header`` what
``Deidentifier.apply`` does to a pydicom header, and returns the same
``DeidResult`` (every recorded original, its type and the order of the
records) and the file meta group encoded as ``file_meta.encode`` would
write it.  Text is read and replaced as bytes (``raw.text_bytes``, the same
reading as the engine's raw path); what a value becomes is
``actions.replacement``'s, as on both of the engine's paths.  An original
that is not plain text (a sequence, a binary or numeric value, a private
element) is decoded by pydicom from its own bytes, exactly as the engine
decodes it, and only then.

It takes the default profile's work: no safe private elements kept, no
cleaning (C), ASCII text wherever text must be read.  Anything else raises
``Fallback`` before the header is changed in a way the caller keeps: the
indexer then reads the file again and takes the pydicom path.
``tests/test_flat_equal.py`` runs both over a corpus and compares all
they produce.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache

from pydicom.datadict import dictionary_has_tag, dictionary_keyword
from pydicom.dataelem import DataElement
from pydicom.filereader import read_dataset

from ith_proxy.deid.actions import KEEP, REMOVE, replacement
from ith_proxy.deid.engine import Deidentifier, DeidResult, _original, _Pass
from ith_proxy.deid.meta import _OURS, KEPT, _encoded
from ith_proxy.deid.profile import level_of
from ith_proxy.deid.pseudo import unpad_uid, valid_uid
from ith_proxy.deid.raw import TEXT_VRS, padded, text_bytes
from ith_proxy.deid.un import ITEM_LE
from ith_proxy.dicom import file_meta
from ith_proxy.dicom.flat import CHARSET, Elem, Header

# one AE value of printable ASCII: pydicom reads it as its text, stripped
_PLAIN_AE = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")


class Fallback(Exception):
    """Not the fast lane's case: de-identify the pydicom way."""


@lru_cache(maxsize=4096)
def _keyword(tag: int) -> str:
    """``DataElement.keyword`` of a tag (registered tags only)."""
    return dictionary_keyword(tag) if dictionary_has_tag(tag) else ""


def _name(tag: int, keyword: str) -> str:
    return keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _no_charset() -> str:
    """Text that needs its character set is the pydicom path's."""
    raise Fallback


_NO_HEADER = Header(b"", {}, {}, False, "", 0, 0, 0, b"")


class FlatWalk:
    def __init__(self, deid: Deidentifier) -> None:
        self.deid = deid
        self.header = _NO_HEADER
        self.ok = deid.private is None and not deid._cleans_text

    def apply(self, header: Header) -> tuple[DeidResult, bytes]:
        """De-identify ``header`` in place; (the result, the new meta group)."""
        if not self.ok:
            raise Fallback
        deid, elements = self.deid, header.elements
        result = deid.start(lambda tag: self._text(elements, tag))
        state = deid._pass(result)
        self.header = header  # where the elements' bytes are, for _decoded
        try:
            self._walk(elements, "", state, top=True)
            for raw in deid.marks_for(header.implicit, True):
                elements[raw.tag] = Elem(int(raw.tag), raw.VR or "", raw.value or b"")
            return result, self._meta(header, result)
        finally:
            self.header = _NO_HEADER  # not kept until the next file

    # --- reading ---

    def _text(self, elements: dict[int, Elem], tag: int) -> str:
        elem = elements.get(tag)
        if elem is None:
            return ""
        if elem.vr not in TEXT_VRS:
            raise Fallback
        return text_bytes(elem.vr, elem.value, _no_charset)

    def _decoded(
        self, elem: Elem, meta: bool = False, siblings: dict[int, Elem] | None = None
    ) -> DataElement:
        """The element as pydicom decodes it in place: with the data set's
        character set (the file meta has none) and, for an untyped private
        element, its creator among ``siblings`` (pydicom types it by both)."""
        header = self.header
        start, end = elem.span
        data = header.meta_buf[start:end] if meta else header.buf[start:end]
        if not elem.vr and siblings is not None:
            creator = siblings.get((elem.tag >> 16) << 16 | (elem.tag & 0xFFFF) >> 8)
            if creator is not None and creator.span != (0, 0):
                data = header.buf[creator.span[0] : creator.span[1]] + data
        charset = None if meta else header.elements.get(CHARSET)
        if charset is not None and charset.span != (0, 0) and elem.tag != CHARSET:
            data = header.buf[charset.span[0] : charset.span[1]] + data
        implicit = header.implicit and not meta
        try:
            mini = read_dataset(io.BytesIO(data), implicit, True)
            return mini[elem.tag]
        except Exception:
            raise Fallback from None

    # --- the walk (engine._walk's, for what this lane takes) ---

    def _walk(self, elements: dict[int, Elem], prefix: str, state: _Pass, top: bool) -> None:
        creators: list[int] = []
        rule_of = self.deid.profile.rule
        for tag in list(elements):
            group = tag >> 16
            element = tag & 0xFFFF
            if not element:
                del elements[tag]  # group lengths would be stale after any change
                continue
            if group & 1:  # private: none is kept by this lane
                if 0x0010 <= element <= 0x00FF:
                    creators.append(tag)
                    continue
                self._remove(elements, tag, prefix, state, top)
                continue
            if group & 0xFF00 in (0x5000, 0x6000):  # curves and overlays
                self._remove(elements, tag, prefix, state, top)
                continue
            rule = rule_of(tag)
            action = rule.action if rule is not None else "K"
            elem = elements[tag]
            sequence = elem.vr == "SQ"
            if action == "K" or (action in ("C", "U") and sequence):
                if sequence and elem.items is not None:
                    name = _name(tag, _keyword(tag))
                    for i, item in enumerate(elem.items):
                        self._walk(item.elements, f"{prefix}{name}[{i}].", state, top=False)
                continue
            if action == "C":
                raise Fallback
            self._act(elements, elem, action, prefix, state, top)
        for tag in creators:
            self._remove(elements, tag, prefix, state, top)

    def _remove(
        self,
        elements: dict[int, Elem],
        tag: int,
        prefix: str,
        state: _Pass,
        top: bool,
        decoded: DataElement | None = None,
    ) -> None:
        if decoded is None:
            found = elements[tag]
            if not found.vr and found.value[:4] == ITEM_LE:
                raise Fallback  # items in an untyped element: un.settle makes it a sequence
            decoded = self._decoded(found, siblings=elements)
        elem = decoded
        keyword = elem.keyword
        path = prefix + _name(tag, keyword)
        level = level_of(keyword) if top else "instance"
        self.deid._record(state.result, level, path, _original(elem))
        del elements[tag]

    def _act(
        self,
        elements: dict[int, Elem],
        elem: Elem,
        action: str,
        prefix: str,
        state: _Pass,
        top: bool,
    ) -> None:
        tag = elem.tag
        if elem.vr in TEXT_VRS:  # engine._act_raw
            text = text_bytes(elem.vr, elem.value, _no_charset)
            keyword = self.deid.profile.keyword(tag)
            new = replacement(action, elem.vr, keyword, text, state.ctx)
            if new is KEEP:
                return
            path = prefix + _name(tag, keyword)
            level = level_of(keyword) if top else "instance"
            if new is REMOVE:
                self.deid._record(state.result, level, path, text)
                del elements[tag]
                return
            value = "" if new is None else new
            if not isinstance(value, str) or not value.isascii():
                raise Fallback
            if value != text:
                self.deid._record(state.result, level, path, text)
                elements[tag] = Elem(tag, elem.vr, padded(value, elem.vr))
            return
        decoded = self._decoded(elem)  # engine._act's general path
        original = _original(decoded)
        new = replacement(action, decoded.VR, decoded.keyword, original, state.ctx)
        if new is REMOVE:
            self._remove(elements, tag, prefix, state, top, decoded)
        elif new is KEEP:
            return
        elif elem.vr == "SQ" and new == [] and elem.items is not None:
            path = prefix + _name(tag, decoded.keyword)
            level = level_of(decoded.keyword) if top else "instance"
            self.deid._record(state.result, level, path, original)
            elem.items = []
        else:
            raise Fallback  # a new binary or numeric value: pydicom encodes it

    # --- the file meta (deid.meta.rebuild, then file_meta.encode) ---

    def _meta(self, header: Header, result: DeidResult) -> bytes:
        meta = header.meta
        for tag in list(meta):
            if tag in KEPT:
                continue
            elem = meta[tag]
            if elem.vr == "AE" and _PLAIN_AE.fullmatch(elem.value):  # the SCP's Source AE
                path = "FileMeta." + _name(tag, _keyword(tag))
                self.deid._record(result, "instance", path, elem.value.decode("ascii").strip())
            elif tag & 0xFFFF:
                gone = self._decoded(elem, meta=True)
                path = "FileMeta." + _name(tag, gone.keyword)
                self.deid._record(result, "instance", path, _original(gone))
            del meta[tag]
        ours: dict[int, str | bytes] = {}
        for tag, vr, value in (*_OURS, (0x00020003, "UI", result.sop_uid)):
            old = meta.get(int(tag))
            ours[int(tag)] = value
            if old is None:
                raise Fallback  # pydicom's meta writer adds what is missing
            if old.vr == vr and old.value == _encoded(vr, value):
                continue  # as the SCP wrote it, byte for byte (meta._same_raw)
            if old.vr == "UI" and valid_uid(unpad_uid(old.value)):  # reads as it is stored
                if unpad_uid(old.value) != value:
                    path = "FileMeta." + _name(int(tag), _keyword(int(tag)))
                    self.deid._record(result, "instance", path, unpad_uid(old.value))
                continue
            before = self._decoded(old, meta=True)
            if before.value == value:
                continue
            if before.value not in (None, "", b""):
                path = "FileMeta." + _name(int(tag), before.keyword)
                self.deid._record(result, "instance", path, _original(before))
        texts: dict[int, str] = {}
        for element, vr in file_meta.TEXT:
            tag = 0x00020000 | element
            if tag in ours:
                texts[element] = str(ours[tag])
            else:  # the SOP class and the transfer syntax: kept as they are
                kept = meta.get(tag)
                if kept is None or kept.vr != vr:
                    raise Fallback
                texts[element] = _meta_text(kept)
        group = file_meta.pack(texts)
        if group is None:
            raise Fallback
        return group


def _meta_text(elem: Elem) -> str:
    """A single ASCII UI or SH value as pydicom reads it back (else Fallback)."""
    value = elem.value
    text = unpad_uid(value) if elem.vr == "UI" else value.decode("latin-1").rstrip(" ")
    if not text or not text.isascii() or "\\" in text or text != text.strip():
        raise Fallback
    return text
