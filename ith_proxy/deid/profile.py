"""The de-identification profile: PS3.15 Annex E Table E.1-1 held as data.

``table_e1_1.json`` (built by ``tools/build_table.py``, see docs/deid-table.md)
lists every attribute row with its Basic Profile action and its option
columns.  ``Profile`` resolves, once, the action for each tag under the
options a site has switched on:

- an active option column that says ``K`` keeps the attribute;
- otherwise one that says ``C`` cleans it (for dates: the keyed shift);
- otherwise the Basic Profile action applies.

Compound actions are resolved without full per-IOD type tables, with the
few attributes that are Type 1 in an IOD we accept (``TYPE1``) getting a
dummy (``D``) so outputs stay valid; the rest take the least revealing
choice the standard allows: ``X/Z`` -> ``Z`` (empty is valid for Type 2 and
3), ``Z/D`` and ``X/Z/D`` -> ``Z``, ``X/D`` -> ``X``, ``X/Z/U*`` -> ``U``.

Beyond the table: private attributes are removed unless Retain Safe Private
allows them, curve (50xx) and overlay (60xx) groups are removed, and group
lengths are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import keyword_for_tag
from pydicom.tag import BaseTag

from ith_proxy.config import DEID_OPTIONS

TABLE_FILE = Path(__file__).with_name("table_e1_1.json")

# option name (config) -> option column key in the table file (the same names)
OPTION_COLUMNS = {name: name for name in DEID_OPTIONS}

# DICOM CID 7050 codes for DeidentificationMethodCodeSequence
METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_long_full_dates": (
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain_long_modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

# Which vault level an original value belongs to (default: instance).
PATIENT_LEVEL = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "IssuerOfPatientID",
        "MedicalRecordLocator",
        "EthnicGroup",
        "PatientComments",
        "MilitaryRank",
        "BranchOfService",
        "CountryOfResidence",
        "RegionOfResidence",
        "PatientReligiousPreference",
        "Occupation",
        "AdditionalPatientHistory",
        "PatientInsurancePlanCodeSequence",
        "PatientPrimaryLanguageCodeSequence",
        "SmokingStatus",
        "PregnancyStatus",
        "LastMenstrualDate",
        "MedicalAlerts",
        "Allergies",
        "PatientSexNeutered",
        "ResponsiblePerson",
        "ResponsibleOrganization",
    }
)
STUDY_LEVEL = frozenset(
    {
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "NameOfPhysiciansReadingStudy",
        "PhysiciansOfRecord",
        "RequestingPhysician",
        "StudyInstanceUID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "AdmittingDiagnosesDescription",
        "RequestAttributesSequence",
        "StudyComments",
        "IssuerOfAccessionNumberSequence",
        "ReasonForStudy",
        "RequestedProcedureDescription",
        "AdmissionID",
        "CurrentPatientLocation",
    }
)
SERIES_LEVEL = frozenset(
    {
        "SeriesInstanceUID",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "FrameOfReferenceUID",
        "PerformingPhysicianName",
        "OperatorsName",
        "StationName",
        "DeviceSerialNumber",
        "ProtocolName",
        "PerformedProcedureStepDescription",
        "PerformedProcedureStepID",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
    }
)


def level_of(keyword: str) -> str:
    if keyword in PATIENT_LEVEL:
        return "patient"
    if keyword in STUDY_LEVEL:
        return "study"
    if keyword in SERIES_LEVEL:
        return "series"
    return "instance"


@dataclass(frozen=True)
class Rule:
    action: str  # resolved: D Z X K C U, or "D?" (D when valued, else Z)
    keyword: str
    basic: str  # as the standard says, for the record


# Type 1 somewhere in the IODs the SCP accepts (PET Series: Series Date and
# Time; Enhanced CT/MR/PET: Content Date/Time, Acquisition DateTime, and
# Device Serial Number in Enhanced General Equipment).
TYPE1 = frozenset(
    {
        "SeriesDate",
        "SeriesTime",
        "ContentDate",
        "ContentTime",
        "AcquisitionDateTime",
        "DeviceSerialNumber",
    }
)


def _resolve(basic: str, options: dict[str, str], active: frozenset[str], keyword: str) -> str:
    columns = {(options.get(OPTION_COLUMNS[o]) or "").strip() for o in active}
    if "K" in columns:
        return "K"
    if "C" in columns:
        return "C"
    basic = basic.strip()
    if basic in ("X/D", "Z/D", "X/Z/D") and keyword in TYPE1:
        return "D?"
    if basic in ("X/Z", "Z/D", "X/Z/D"):
        return "Z"
    if basic == "X/D":
        return "X"
    if basic.startswith("X/Z/U"):
        return "U"
    if basic in ("D", "Z", "X", "K", "C", "U"):
        return basic
    raise ValueError(f"unknown Annex E action {basic!r}")


def _parse_tag(text: str) -> tuple[int, int] | None:
    """'(gggg,eeee)' -> (group, element); None for a pattern with wildcards."""
    inner = text.strip().strip("()").replace(" ", "")
    group, _, elem = inner.partition(",")
    try:
        return int(group, 16), int(elem, 16)
    except ValueError:
        return None


_OTHERS_MAX = 4096  # tags outside the table's rows whose pattern lookup is kept


class Profile:
    """Per-tag actions for one set of active options, resolved once."""

    def __init__(self, options: frozenset[str] = frozenset(), table: Path = TABLE_FILE) -> None:
        unknown = set(options) - set(OPTION_COLUMNS)
        if unknown:
            raise ValueError(f"unknown de-identification options: {sorted(unknown)}")
        self.options = options
        data = json.loads(Path(table).read_text(encoding="utf-8"))
        self.edition = data.get("edition", "")
        self.rules: dict[int, Rule] = {}
        self.patterns: list[tuple[int, int, Rule]] = []  # (mask, value, rule)
        for row in data["rows"]:
            keyword = row.get("keyword", "")
            rule = Rule(
                _resolve(row["basic"], row.get("options", {}), options, keyword),
                keyword,
                row["basic"],
            )
            parsed = _parse_tag(row["tag"])
            if parsed is not None:
                self.rules[(parsed[0] << 16) | parsed[1]] = rule
            else:
                mask, value = _pattern(row["tag"])
                if mask:
                    self.patterns.append((mask, value, rule))
        self.retain_private = "retain_safe_private" in options
        # pydicom's keyword of each row's tag, looked up once (it may differ
        # from the table's: the engine names paths and levels by pydicom's)
        self._keywords = {tag: keyword_for_tag(tag) for tag in self.rules}
        self._others: dict[int, Rule | None] = {}  # rule() of tags outside self.rules

    def rule(self, tag: BaseTag | int) -> Rule | None:
        tag = int(tag)
        rule = self.rules.get(tag)
        if rule is not None:
            return rule
        if tag in self._others:  # a tag no row names, seen before (issue 11)
            return self._others[tag]
        found = next((r for mask, value, r in self.patterns if tag & mask == value), None)
        if len(self._others) < _OTHERS_MAX:  # bounded: a hostile peer may send any tags
            self._others[tag] = found
        return found

    def keyword(self, tag: BaseTag | int) -> str:
        """``pydicom.datadict.keyword_for_tag(tag)``, from a table built once for
        the tags the table lists."""
        keyword = self._keywords.get(int(tag))
        return keyword if keyword is not None else keyword_for_tag(tag)


def _pattern(text: str) -> tuple[int, int]:
    """'(50xx,xxxx)' -> (mask, value) over the 32-bit tag; (0, 0) if not a hex pattern."""
    inner = text.strip().strip("()").replace(",", "").replace(" ", "").lower()
    if len(inner) != 8 or any(c not in "0123456789abcdefx" for c in inner):
        return 0, 0
    mask = int("".join("0" if c == "x" else "f" for c in inner), 16)
    value = int(inner.replace("x", "0"), 16)
    return mask, value
