"""PS3.15 Annex E de-identification: profile as data, keyed pseudonyms, UID remap."""

from ith_proxy.deid.engine import Deidentifier, DeidResult
from ith_proxy.deid.profile import Profile
from ith_proxy.deid.pseudo import patient_key, patient_pseudonym, remap_uid, valid_uid
from ith_proxy.deid.raw import stored_uid

__all__ = [
    "DeidResult",
    "Deidentifier",
    "Profile",
    "patient_key",
    "patient_pseudonym",
    "remap_uid",
    "stored_uid",
    "valid_uid",
]
