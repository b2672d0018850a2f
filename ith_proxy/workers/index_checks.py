"""What the indexer refuses, and how: checks, quarantine reasons, quarantine.

Split out of ``workers/indexer.py`` (issue 11): what makes a parsed file
unusable (``check``: the four UIDs as stored, the file meta against the
data set, some pixel data), the exceptions that name a quarantine reason
(``REASONS``), the PHI-free text of an unexpected error
(``internal_error``), and ``quarantine``: always encrypted under the vault
key.  Error texts in quarantine .json files and logs are
fixed phrases naming attributes, never DICOM values.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from ith_proxy.deid import stored_uid, valid_uid
from ith_proxy.dicom import files as dicomfile
from ith_proxy.vault import stream as vault_stream
from ith_proxy.vault.stream import EncryptedFileError

log = logging.getLogger("ith_proxy.indexer")

_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class Inconsistent(ValueError):
    """Parsed, but the dataset contradicts itself or lacks what we need."""


class PhiRisk(ValueError):
    """De-identifying the header would not remove all PHI (e.g. text in the pixels)."""


# Error texts in quarantine .json files and logs are fixed phrases naming
# attributes, never DICOM values.
REASONS = (
    (dicomfile.DicomFileError, "unparseable"),
    (Inconsistent, "inconsistent"),
    (PhiRisk, "phi-risk"),
    (EncryptedFileError, "undecryptable"),
)


def internal_error(exc: Exception) -> str:
    """A PHI-free description of an unexpected error: its type and where it
    happened.  The message is left out (it may quote a value); the frames
    (code only) go to the log."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    log.error(
        "unexpected %s while processing an incoming file; traceback without the message:\n%s",
        type(exc).__name__,
        "".join(traceback.format_list(frames)),
    )
    return f"internal error: {type(exc).__name__}{where}"


def check(split: dicomfile.SplitFile) -> None:
    ds = split.header
    for kw in _REQUIRED:  # as stored: a trailing newline or space is no padding
        if not valid_uid(stored_uid(ds, kw)):
            raise Inconsistent(f"missing or invalid {kw}")
    meta = ds.file_meta
    sop, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)  # each looked up once
    if str(meta.get("MediaStorageSOPInstanceUID", sop)) != sop:
        raise Inconsistent("file meta SOP Instance UID does not match the dataset")
    if str(meta.get("MediaStorageSOPClassUID", sop_class)) != sop_class:
        raise Inconsistent("file meta SOP Class UID does not match the dataset")
    if split.pixel_start >= split.size and "PixelData" not in ds:
        raise Inconsistent("no pixel data")


def quarantine(
    spool: Any, keyring: Any, name: str, reason: str, why: str, attempts: int = 0
) -> int:
    """Quarantine incoming/<name> encrypted (1; 0 if it is gone): plaintext
    input is sealed on the way, encrypted input moves as it is.  The .json
    gets the plaintext's size and sha256."""
    path = spool.incoming_path(name)
    detail = {"error": why, "encrypted": True, "attempts": attempts}
    try:
        if vault_stream.is_encrypted(path):
            try:
                info = vault_stream.digest(path, keyring)
            except EncryptedFileError:
                info = {"size": None, "sha256": None}
            spool.quarantine(name, reason, {**detail, **info})
        else:
            spool.quarantine(
                name, reason, detail, seal=lambda src, out: vault_stream.seal(src, out, keyring)
            )
    except FileNotFoundError:
        spool.set_attempts(name, 0)
        return 0
    spool.set_attempts(name, 0)
    log.warning("quarantined incoming file %s (%s): %s", name, reason, why)
    return 1
