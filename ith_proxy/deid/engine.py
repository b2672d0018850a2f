"""Apply the profile to a pydicom Dataset: pure functions, no I/O.

``Deidentifier.apply(ds)`` changes the dataset in place (header only: the
caller streams pixel data separately) and returns what was replaced or
removed, keyed by an attribute path such as ``PatientName`` or
``ReferencedSeriesSequence[0].SeriesInstanceUID``, so the vault can give
every original value back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.tag import BaseTag, Tag
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from ..config import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from .profile import BASIC_PROFILE, PATIENT_LEVEL, SERIES_LEVEL, STUDY_LEVEL
from .pseudo import patient_key, patient_pseudonym, remap_uid

METHOD = "ith-proxy PS3.15 E basic (ingest core)"

_DUMMY_BY_VR = {
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "PN": "ANONYMOUS",
    "AS": "000Y", "IS": "0", "DS": "0", "US": 0, "SS": 0, "UL": 0, "SL": 0,
    "FL": 0.0, "FD": 0.0,
}


@dataclass
class DeidResult:
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    phi: dict[str, dict[str, object]] = field(default_factory=dict)  # level -> path -> value


def _plain(value: object) -> object:
    """A JSON-safe copy of an element value (multi-values joined the DICOM way)."""
    if isinstance(value, (bytes, bytearray)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, MultiValue) or isinstance(value, list):
        return "\\".join(str(v) for v in value)
    if isinstance(value, (int, float)) or value is None:
        return value
    return str(value)


def _sequence_plain(seq: Sequence) -> list:
    out = []
    for item in seq:
        out.append({(keyword_for_tag(e.tag) or f"{e.tag:08X}"):
                    (_sequence_plain(e.value) if e.VR == "SQ" else _plain(e.value))
                    for e in item})
    return out


def _is_sequence(ds: Dataset, tag: BaseTag) -> bool:
    """Without decoding the element."""
    raw = ds.get_item(tag)
    if raw is None:
        return False
    if raw.VR is not None:
        return raw.VR == "SQ"
    try:  # implicit VR: ask the dictionary
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _level(keyword: str) -> str:
    if keyword in PATIENT_LEVEL:
        return "patient"
    if keyword in STUDY_LEVEL:
        return "study"
    if keyword in SERIES_LEVEL:
        return "series"
    return "instance"


class Deidentifier:
    def __init__(self, secret: bytes, profile: dict[str, str] | None = None) -> None:
        self.secret = secret
        self.profile = profile or BASIC_PROFILE
        self._actions = {Tag(tag_for_keyword(kw)): action for kw, action in self.profile.items()
                         if tag_for_keyword(kw) is not None}

    def apply(self, ds: Dataset) -> DeidResult:
        name = str(ds.get("PatientName", "") or "")
        pid = str(ds.get("PatientID", "") or "")
        birth = str(ds.get("PatientBirthDate", "") or "")
        pseudo_id = patient_pseudonym(self.secret, patient_key(pid, name, birth))
        result = DeidResult(
            patient_id=pseudo_id, patient_name=f"ANON^{pseudo_id}",
            study_uid=remap_uid(self.secret, str(ds.get("StudyInstanceUID", ""))),
            series_uid=remap_uid(self.secret, str(ds.get("SeriesInstanceUID", ""))),
            sop_uid=remap_uid(self.secret, str(ds.get("SOPInstanceUID", ""))),
        )
        self._walk(ds, "", result, top=True)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        if hasattr(ds, "file_meta"):
            self.rewrite_meta(ds.file_meta, result.sop_uid, result)
        return result

    def apply_fragment(self, ds: Dataset, result: DeidResult) -> None:
        """De-identify elements that follow the pixel data, into the same result."""
        self._walk(ds, "", result, top=True)

    def _record(self, result: DeidResult, level: str, path: str, value: object) -> None:
        result.phi.setdefault(level, {})[path] = value

    def _walk(self, ds: Dataset, prefix: str, result: DeidResult, top: bool) -> None:
        # Look at raw elements by tag; only elements that need an action (or are
        # sequences to descend into) are decoded, the rest are written back raw.
        for tag in list(ds.keys()):
            if tag.element == 0 and tag.group != 0x0002:
                del ds[tag]  # group lengths would be stale after any change
                continue
            action = "X" if tag.is_private else self._actions.get(tag, "K")
            if action == "K":
                if _is_sequence(ds, tag):
                    elem = ds[tag]
                    path = prefix + elem.keyword
                    for i, item in enumerate(elem.value):
                        self._walk(item, f"{path}[{i}].", result, top=False)
                continue
            elem = ds[tag]
            keyword = elem.keyword
            path = prefix + (keyword or f"({tag.group:04X},{tag.element:04X})")
            level = _level(keyword) if top else "instance"
            original = _sequence_plain(elem.value) if elem.VR == "SQ" else _plain(elem.value)
            if action == "X":
                self._record(result, level, path, original)
                del ds[tag]
            elif action == "Z":
                if original not in ("", None):
                    self._record(result, level, path, original)
                elem.value = [] if elem.VR == "SQ" else None
            elif action == "U":
                self._remap(elem, path, level, result)
            elif action == "D":
                self._record(result, level, path, original)
                self._dummy(ds, elem, keyword, result)
            else:
                raise ValueError(f"unknown profile action {action!r} for {keyword}")

    def _remap(self, elem: DataElement, path: str, level: str, result: DeidResult) -> None:
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        new = [remap_uid(self.secret, str(v)) for v in values if v is not None]
        if [str(v) for v in values] != new:
            self._record(result, level, path, _plain(elem.value))
        elem.value = new if isinstance(elem.value, MultiValue) else (new[0] if new else "")

    def _dummy(self, ds: Dataset, elem: DataElement, keyword: str, result: DeidResult) -> None:
        if keyword == "PatientID":
            elem.value = result.patient_id
        elif keyword == "PatientName":
            elem.value = result.patient_name
        elif elem.VR == "SQ":
            elem.value = []
        elif elem.VR == "UI":
            elem.value = remap_uid(self.secret, str(elem.value))
        else:
            elem.value = _DUMMY_BY_VR.get(elem.VR, "ANONYMIZED")

    def rewrite_meta(self, meta: FileMetaDataset, sop_uid: str,
                     result: DeidResult | None = None) -> None:
        """File meta that matches the de-identified dataset and names us."""
        old = str(meta.get("MediaStorageSOPInstanceUID", ""))
        if result is not None and old and old != sop_uid:
            self._record(result, "instance", "MediaStorageSOPInstanceUID", old)
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        for kw in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                   "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID",
                   "PrivateInformation"):
            if kw in meta:
                if result is not None:
                    self._record(result, "instance", f"FileMeta.{kw}", _plain(meta[kw].value))
                del meta[kw]
