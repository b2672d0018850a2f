"""GET /api/studies/ (cursor pagination; filters state, modality, since),
GET /api/studies/<uid>/ (detail and timeline), POST /api/studies/<uid>/dispatch/.

The list is newest activity first; ``next_cursor`` is the token of the next
page (pass it back as given) (keyset pagination in ``store/browse.py``: stable while studies
arrive, never a study twice in one walk).  Purged studies stay in the list
and the detail as tombstones with ``"purged": true``: the catalog keeps their
rows, and a caller should see that a study existed and what became of it.

Every query parameter is checked in ``web/query.py`` (400 naming the field).
A dispatch goes through ``Outbox.enqueue``, as
``bin/ith-proxy send`` does, and writes an audit record in every outcome once
the caller is authenticated (success, 400 for an unknown node, 404, 409).
"""

from __future__ import annotations

import re
import time
from typing import Any

import bottle

from ith_proxy.store.browse import MAX_LIMIT, Browse, iso
from ith_proxy.store.catalog import STATES
from ith_proxy.store.nodes import Nodes
from ith_proxy.store.outbox import Outbox, OutboxError
from ith_proxy.web.context import ApiContext, ApiError, audit, json_object, json_response, route
from ith_proxy.web.openapi import error_response
from ith_proxy.web.query import (
    CURSOR_PATTERN,
    DEFAULT_LIMIT,
    MAX_CURSOR,
    MAX_SINCE,
    SINCE_EPOCH,
    check_uid,
    encode_cursor,
    list_params,
)

NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # as config_values.node_name


def install(app: bottle.Bottle, ctx: ApiContext) -> None:
    """Add this group's routes to the app."""

    @route(app, ctx, "GET", "/api/studies/")
    def list_studies() -> bottle.HTTPResponse:
        filters, after, limit = list_params(bottle.request.query)
        catalog = ctx.connect_catalog()
        try:
            page = Browse(catalog).studies(filters, after, limit)
        finally:
            catalog.close()
        cursor = encode_cursor(page.next_key) if page.next_key is not None else None
        return json_response(200, {"studies": page.studies, "next_cursor": cursor, "limit": limit})

    @route(app, ctx, "GET", "/api/studies/<uid>/")
    def get_study(uid: str) -> bottle.HTTPResponse:
        check_uid(uid)
        catalog = ctx.connect_catalog()
        try:
            found = Browse(catalog).study(uid)
        finally:
            catalog.close()
        if found is None:
            raise ApiError(404, "no such study", "study_instance_uid")
        return json_response(200, found)

    @route(app, ctx, "POST", "/api/studies/<uid>/dispatch/")
    def dispatch(uid: str) -> bottle.HTTPResponse:
        check_uid(uid)  # a malformed UID: 400, no audit record (nothing it could name)
        try:
            entry = _dispatch(ctx, uid, json_object(bottle.request))
        except ApiError as exc:
            audit(ctx, "study.dispatch", uid, str(exc.status))
            raise
        audit(ctx, "study.dispatch", uid, "success", node=entry["node"])
        return json_response(202, entry)


def _dispatch(ctx: ApiContext, uid: str, body: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(body) - {"node"})
    if unknown:
        raise ApiError(400, "unknown field", unknown[0][:40])
    name = body.get("node")
    if not isinstance(name, str) or not NODE.fullmatch(name):
        raise ApiError(400, "node must be a node name (1-64 of A-Z a-z 0-9 _ . -)", "node")
    catalog = ctx.connect_catalog()
    try:
        if not Browse(catalog).exists(uid):
            raise ApiError(404, "no such study", "study_instance_uid")
        node = Nodes(catalog).get(name)
        if node is None:
            raise ApiError(400, "no such node (see GET /api/nodes/)", "node")
        try:
            e = Outbox(catalog).enqueue(uid, node.name, time.time())
        except OutboxError as exc:  # purged by retention: nothing left to send
            gone = str(exc) == "unknown study"  # reindexed away since the check above
            raise ApiError(404 if gone else 409, str(exc), "study_instance_uid") from None
    finally:
        catalog.close()
    return {
        "study_instance_uid": e.study_uid,
        "node": e.node,
        "state": e.state,
        "reason": e.reason,
        "attempts": e.attempts,
        "next_at": iso(e.next_at),
        "created_at": iso(e.created_at),
        "updated_at": iso(e.updated_at),
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"enum": [None]}]}


_TIME = {"type": "string", "format": "date-time"}
_COUNT = {"type": "integer", "minimum": 0}


_UID_PARAM = {
    "name": "uid",
    "in": "path",
    "required": True,
    "description": "the anonymized StudyInstanceUID",
    "schema": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)*$", "maxLength": 64},
}
_SUMMARY_PROPERTIES: dict[str, Any] = {
    "study_instance_uid": {"type": "string"},
    "state": {"type": "string", "enum": list(STATES)},
    "purged": {"type": "boolean"},
    "purged_at": _nullable(_TIME),
    "first_received": _TIME,
    "last_received": _TIME,
    "completed_at": _nullable(_TIME),
    "reopened": _COUNT,
    "series_count": _COUNT,
    "instance_count": _COUNT,
    "modalities": {"type": "array", "items": {"type": "string"}},
}
SUMMARY = {
    "type": "object",
    "required": list(_SUMMARY_PROPERTIES),
    "properties": _SUMMARY_PROPERTIES,
    "additionalProperties": False,
}
DESTINATION = {
    "type": "object",
    "properties": {
        "node": {"type": "string"},
        "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
        "reason": {"type": "string"},
        "attempts": _COUNT,
        "next_at": _nullable(_TIME),
        "last_error": _nullable({"type": "string"}),
        "created_at": _TIME,
        "updated_at": _TIME,
        "delivered_at": _nullable(_TIME),
        "delivered": _COUNT,
        "failed": _COUNT,
        "failures": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}
DETAIL = {
    "type": "object",
    "required": [*_SUMMARY_PROPERTIES, "timeline", "destinations"],
    "properties": {
        **_SUMMARY_PROPERTIES,
        "patient_id": {"type": "string", "description": "the pseudonym"},
        "bytes": _COUNT,
        "timeline": {
            "type": "array",
            "items": {"type": "object", "properties": {"at": _TIME, "event": {"type": "string"}}},
        },
        "destinations": {"type": "array", "items": DESTINATION},
    },
    "additionalProperties": False,
}
ENTRY = {
    "type": "object",
    "required": ["study_instance_uid", "node", "state"],
    "properties": {
        "study_instance_uid": {"type": "string"},
        "node": {"type": "string"},
        "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
        "reason": {"type": "string"},
        "attempts": _COUNT,
        "next_at": _TIME,
        "created_at": _TIME,
        "updated_at": _TIME,
    },
    "additionalProperties": False,
}

# 401, 403 and 413 (and 500) are added by web/openapi.py where an operation
# does not give them; the errors particular to each route are given here
OPENAPI: dict[str, Any] = {
    "/api/studies/": {
        "get": {
            "summary": "Anonymized study summaries, newest activity first, a page at a time",
            "operationId": "listStudies",
            "tags": ["studies"],
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "cursor",
                    "in": "query",
                    "description": "next_cursor of the previous page (pass it back as given)",
                    "schema": {
                        "type": "string",
                        "maxLength": MAX_CURSOR,
                        "pattern": CURSOR_PATTERN,
                    },
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_LIMIT,
                        "default": DEFAULT_LIMIT,
                    },
                },
                {
                    "name": "state",
                    "in": "query",
                    "schema": {"type": "string", "enum": list(STATES)},
                },
                {
                    "name": "modality",
                    "in": "query",
                    "description": "studies with a series of this modality (CT, MR ...)",
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_ ]{1,16}$"},
                },
                {
                    "name": "since",
                    "in": "query",
                    "description": "studies that received an instance at or after this time: "
                    "ISO 8601 (no zone: UTC) or epoch seconds",
                    "schema": {
                        "anyOf": [
                            {"type": "string", "format": "date-time", "maxLength": MAX_SINCE},
                            {"type": "string", "pattern": SINCE_EPOCH},
                        ]
                    },
                },
            ],
            "responses": {
                "200": {
                    "description": "one page",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["studies", "next_cursor", "limit"],
                                "properties": {
                                    "studies": {"type": "array", "items": SUMMARY},
                                    "next_cursor": _nullable({"type": "string"}),
                                    "limit": {"type": "integer"},
                                },
                                "additionalProperties": False,
                            }
                        }
                    },
                },
                "400": error_response("a bad query parameter (field names it)"),
            },
        }
    },
    "/api/studies/{uid}/": {
        "get": {
            "summary": "One study: counts, modalities, timeline, forwarding destinations",
            "operationId": "getStudy",
            "tags": ["studies"],
            "security": [{"bearer": []}],
            "parameters": [_UID_PARAM],
            "responses": {
                "200": {
                    "description": "the study",
                    "content": {"application/json": {"schema": DETAIL}},
                },
                "400": error_response("not a DICOM UID"),
                "404": error_response("no such study"),
            },
        }
    },
    "/api/studies/{uid}/dispatch/": {
        "post": {
            "summary": "Queue the study to be sent to a node (through the forwarding outbox)",
            "operationId": "dispatchStudy",
            "tags": ["studies"],
            "security": [{"bearer": []}],
            "parameters": [_UID_PARAM],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["node"],
                            "additionalProperties": False,
                            "properties": {
                                "node": {
                                    "type": "string",
                                    "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                                }
                            },
                        }
                    }
                },
            },
            "responses": {
                "202": {
                    "description": "queued; the forwarder sends it",
                    "content": {"application/json": {"schema": ENTRY}},
                },
                "400": error_response("bad body, bad UID or unknown node (field names it)"),
                "404": error_response("no such study"),
                "409": error_response("the study was purged by retention: nothing left to send"),
            },
        }
    },
}
