"""PS3.15 Annex E de-identification: profile as data, keyed pseudonyms, UID remap."""

from .engine import DeidResult, Deidentifier
from .pseudo import patient_key, patient_pseudonym, remap_uid

__all__ = ["DeidResult", "Deidentifier", "patient_key", "patient_pseudonym", "remap_uid"]
