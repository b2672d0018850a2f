"""The de-identification profile, held as data.

Each entry maps a DICOM keyword to its PS3.15 Annex E Basic Profile action:

- ``D`` replace with a non-empty dummy (pseudonym for patient identity)
- ``Z`` replace with a zero-length value
- ``X`` remove
- ``K`` keep
- ``U`` replace the UID with a keyed, consistent ``2.25.`` UID

Private attributes are removed (``X``) by the engine unless a profile says
otherwise.  This is the ingest core's minimum set; the full Table E.1-1 with every
option column replaces it (issue 3).
"""

from __future__ import annotations

BASIC_PROFILE: dict[str, str] = {
    # patient identity
    "PatientName": "D",
    "PatientID": "D",
    "PatientBirthDate": "Z",
    "PatientBirthTime": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "PatientBirthName": "X",
    "PatientMotherBirthName": "X",
    "PatientAddress": "X",
    "PatientTelephoneNumbers": "X",
    "IssuerOfPatientID": "X",
    "MedicalRecordLocator": "X",
    # study / visit
    "AccessionNumber": "Z",
    "StudyID": "Z",
    "StudyDescription": "X",
    "SeriesDescription": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "PerformingPhysicianName": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "OperatorsName": "X",
    "RequestingPhysician": "X",
    # institution
    "InstitutionName": "X",
    "InstitutionAddress": "X",
    "InstitutionalDepartmentName": "X",
    "StationName": "X",
    "DeviceSerialNumber": "X",
    # requests and procedures
    "RequestAttributesSequence": "X",
    "RequestedProcedureID": "X",
    "ScheduledProcedureStepID": "X",
    "PerformedProcedureStepID": "X",
    "RequestedProcedureDescription": "X",
    "PerformedProcedureStepDescription": "X",
    # UIDs
    "StudyInstanceUID": "U",
    "SeriesInstanceUID": "U",
    "SOPInstanceUID": "U",
    "FrameOfReferenceUID": "U",
    "ReferencedSOPInstanceUID": "U",
    "ReferencedFrameOfReferenceUID": "U",
    "RelatedFrameOfReferenceUID": "U",
    "SynchronizationFrameOfReferenceUID": "U",
    "MediaStorageSOPInstanceUID": "U",
}

# Which vault level each original value belongs to (default: instance).
PATIENT_LEVEL = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs",
    "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "IssuerOfPatientID", "MedicalRecordLocator",
})
STUDY_LEVEL = frozenset({
    "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "StudyInstanceUID",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
})
SERIES_LEVEL = frozenset({
    "SeriesInstanceUID", "SeriesDescription", "FrameOfReferenceUID", "PerformingPhysicianName",
    "OperatorsName", "StationName", "DeviceSerialNumber",
})
