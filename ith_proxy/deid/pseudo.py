"""Keyed pseudonyms and UID remapping: HMAC-SHA256 under the site secret.

The same input always gives the same output, across instances, studies and
restarts, so every instance of a study (and every study of a patient) stays
consistent without any lookup table.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re

STANDARD_UID_ROOT = "1.2.840.10008."
# PS3.5 9.1: ASCII digits in dot-separated components ([0-9], never \\d, which
# takes any Unicode digit). Leading zeros are tolerated (legacy modalities).
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def valid_uid(uid: str) -> bool:
    """Is ``uid`` (its padding already removed) a UID?  ``fullmatch``, since a
    ``$`` anchor would accept a trailing newline."""
    return len(uid) <= 64 and _UID.fullmatch(uid) is not None


def unpad_uid(value: bytes) -> str:
    """A UI value as stored, less its one legal pad: a single trailing NUL
    (PS3.5 6.2).  Anything else (spaces, newlines, more NULs) stays, so that
    ``valid_uid`` sees it."""
    if value.endswith(b"\x00"):
        value = value[:-1]
    return value.decode("latin-1")


@functools.lru_cache(maxsize=256)
def _digest(secret: bytes, domain: str, value: str) -> bytes:
    """Kept for the last few hundred inputs: every instance of a series asks
    again for its patient's pseudonym and its study's, series' and frame of
    reference's UIDs (issue 11)."""
    return hmac.new(secret, f"{domain}\x00{value}".encode(), hashlib.sha256).digest()


def remap_uid(secret: bytes, uid: str) -> str:
    """A ``2.25.`` UID derived from 128 bits of HMAC; valid standard UIDs are kept.

    Surrounding spaces and NULs are ignored, so a sloppily padded reference
    still maps to the UID of what it references (the instance's own UIDs are
    checked strictly before, see ``valid_uid``); the result is always valid."""
    uid = uid.strip().rstrip("\x00")
    if not uid or (uid.startswith(STANDARD_UID_ROOT) and valid_uid(uid)):
        return uid  # a well-formed standard UID names no one; anything else is hashed
    return "2.25." + str(int.from_bytes(_digest(secret, "uid", uid)[:16], "big"))


def patient_pseudonym(secret: bytes, patient_key: str) -> str:
    """A stable, opaque patient ID such as ``ITH-5MZQ4X7K2B3D``."""
    code = base64.b32encode(_digest(secret, "patient", patient_key)[:10]).decode()
    return "ITH-" + code[:12]


def patient_key(patient_id: str, patient_name: str, birth_date: str) -> str:
    """What identifies a patient for pseudonym purposes.

    PatientID when present; otherwise name plus birth date, so a patient
    without an ID still maps to one pseudonym.
    """
    patient_id = patient_id.strip()
    if patient_id:
        return "id:" + patient_id
    return "name:" + patient_name.strip().upper() + "|" + birth_date.strip()
