"""POST /api/phi-metadata/: the original patient- and study-level values of a
study, from the vault, audited before the answer.

Every request by an authenticated caller leaves exactly one audit record
(action ``phi.read``, the anonymized StudyInstanceUID as target; ``unknown:``
and a digest for a UID that names no study here, which may be an original;
``-`` when the body names none that is well formed), whatever its outcome:
``success``, ``400``, ``403``, ``404``, ``413`` or ``error``.  So the scope is
checked here, after the token (a request without a valid token is answered
401 by ``context.route`` and has no identity to audit): a token without
``phi:read`` is audited, then refused.  The scope is checked before the body
is judged, so a caller without it learns nothing about which UIDs exist.

The values are read from the vault first and sent only after their audit
record is fsynced: if it cannot be written, the answer is 500 and holds no
PHI.  A vault or catalog failure is audited as ``error`` and answered with a
generic 500; its details go to no response and no log (only the exception's
type is logged).  A purged study (files gone, rows kept, see
``store.retention``) is still answered: the vault is never purged.  How the
values are shaped, and what happens when instances disagree, is in
``deid.originals``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import bottle

from ith_proxy.deid.originals import Originals, gather
from ith_proxy.web.context import (
    ApiContext,
    ApiError,
    audit,
    claims,
    json_object,
    json_response,
    route,
)
from ith_proxy.web.openapi import error_response

log = logging.getLogger("ith_proxy.api")

PATH = "/api/phi-metadata/"
SCOPE = "phi:read"
ACTION = "phi.read"
FIELD = "study_instance_uid"
_DIGITS = frozenset("0123456789")


def valid_uid(uid: str) -> bool:
    """A DICOM UID: at most 64 characters, dot-separated ASCII digit components."""
    return 0 < len(uid) <= 64 and all(part and set(part) <= _DIGITS for part in uid.split("."))


def _requested_uid() -> tuple[str | None, ApiError | None]:
    """(the well-formed UID the body names, or None; the error of the body, or None)."""
    try:
        body = json_object(bottle.request)
    except ApiError as exc:
        return None, exc
    unknown = sorted(set(body) - {FIELD})
    uid = body.get(FIELD)
    if not isinstance(uid, str) or not valid_uid(uid):
        what = "is required" if uid is None else "must be a DICOM UID (digits and dots, <= 64)"
        return None, ApiError(400, f"{FIELD} {what}", FIELD)
    if unknown:
        return uid, ApiError(400, "unknown field in the request body", unknown[0][:64])
    return uid, None


def _originals(ctx: ApiContext, uid: str) -> Originals | None:
    """The study's originals, None when the catalog does not know the study."""
    catalog = ctx.connect_catalog()
    try:
        if catalog.study(uid) is None:
            return None
        offsets = catalog.instance_vault_offsets(uid)
    finally:
        catalog.close()
    vault = ctx.open_vault()
    try:  # a record that is not this study's is refused by the vault
        return gather(vault.get(offset, study=uid) for offset in offsets)
    finally:
        vault.close()


def _target(ctx: ApiContext, uid: str | None) -> str:
    """The audit record's target: the UID when it names a study here (an
    anonymized UID), else ``unknown:`` and a digest: a caller may post an
    original UID, and the audit log holds no PHI; the digest still lets a
    reviewer see the same unknown UID asked for again.  ``-`` for none."""
    if uid is None:
        return "-"
    try:
        catalog = ctx.connect_catalog()
        try:
            known = catalog.study(uid) is not None
        finally:
            catalog.close()
    except Exception:  # the lookup's failure is answered below; never name the UID
        known = False
    return uid if known else "unknown:" + hashlib.sha256(uid.encode()).hexdigest()[:16]


def read_phi(ctx: ApiContext) -> bottle.HTTPResponse:
    uid, problem = _requested_uid()
    target = _target(ctx, uid)
    try:
        claims().require(SCOPE)
    except ApiError as exc:
        audit(ctx, ACTION, target, "403")
        raise exc from None
    if problem is not None:
        audit(ctx, ACTION, target, str(problem.status))
        raise problem
    assert uid is not None
    try:
        found = _originals(ctx, uid)
    except Exception as exc:  # any failure: audited, answered generically
        log.error("PHI lookup failed: %s", type(exc).__name__)
        audit(ctx, ACTION, target, "error")
        raise ApiError(500, "the original values could not be read") from None
    if found is None:
        audit(ctx, ACTION, target, "404")
        raise ApiError(404, "no study with this study_instance_uid", FIELD)
    phi = dict(found.values)
    phi.setdefault("StudyInstanceUID", uid)  # not replaced (retain_uids): the same UID
    audit(ctx, ACTION, target, "success", instances=found.instances, values=len(phi))
    return json_response(200, {"study_instance_uid": uid, "phi": phi, "conflicts": found.conflicts})


def install(app: bottle.Bottle, ctx: ApiContext) -> None:
    """Add this group's routes to the app."""

    @route(app, ctx, "POST", PATH)
    def phi_metadata() -> bottle.HTTPResponse:
        return read_phi(ctx)


_VALUE: dict[str, Any] = {
    "description": "a string; a list of strings (multi-valued); "
    '{"InlineBinary": base64} (binary); a list of objects (sequence)'
}
OPENAPI: dict[str, Any] = {
    PATH: {
        "post": {
            "summary": "The original patient- and study-level values of a study (audited)",
            "description": "Needs a token with scope phi:read. Every call by an "
            "authenticated caller writes an audit record before the answer; "
            "responses are sent with Cache-Control: no-store.",
            "operationId": "phiMetadata",
            "security": [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": [FIELD],
                            "additionalProperties": False,
                            "properties": {
                                FIELD: {
                                    "type": "string",
                                    "pattern": r"^[0-9]+(\.[0-9]+)*$",
                                    "maxLength": 64,
                                    "description": "the anonymized StudyInstanceUID",
                                }
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "the original values, keyed by DICOM keyword",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": [FIELD, "phi", "conflicts"],
                                "properties": {
                                    FIELD: {"type": "string"},
                                    "phi": {
                                        "type": "object",
                                        "required": ["StudyInstanceUID"],
                                        "additionalProperties": _VALUE,
                                    },
                                    "conflicts": {
                                        "type": "object",
                                        "description": "attributes whose instances "
                                        "disagree: every distinct value, in order received",
                                        "additionalProperties": {"type": "array", "items": {}},
                                    },
                                },
                            }
                        }
                    },
                },
                "400": error_response(
                    "the body is not JSON, or study_instance_uid is missing or malformed"
                ),
                "401": error_response("no valid bearer token (not audited)"),
                "403": error_response("the token lacks the scope phi:read (audited)"),
                "404": error_response("no study with this UID (audited)"),
                "413": error_response("the body is larger than 1 MB (audited)"),
                "500": error_response(
                    "the audit record could not be written, or the vault could not be read"
                ),
            },
        }
    }
}
