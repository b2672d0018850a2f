"""PS3.15 Annex E de-identification: profile as data, keyed pseudonyms, UID remap."""

from .engine import DeidResult, Deidentifier
from .profile import Profile
from .pseudo import patient_key, patient_pseudonym, remap_uid, valid_uid
from .raw import stored_uid

__all__ = ["DeidResult", "Deidentifier", "Profile", "patient_key", "patient_pseudonym", "remap_uid",
           "stored_uid", "valid_uid"]
