"""GET /api/status/: the SCP state, study counts by state, queue depths (incoming/,
quarantine, the forwarding outbox and its dead letter), disk use, the backend
link state and the version, for any valid token.

The counts are ``store.browse.site_counts``, the same that ``bin/ith-proxy
status`` prints, and the health lines are the service's own (``health.py``).
Only anonymized UIDs and node names appear; no PHI, no paths, no backend URL.
Without a running service (``ctx.control`` is None) the SCP and the link
read ``unknown``.
"""

from __future__ import annotations

import time
from typing import Any

import bottle

from ith_proxy import __version__
from ith_proxy.store.browse import disk_use, incoming_backlog, iso, site_counts
from ith_proxy.store.catalog import STATES
from ith_proxy.store.spool import Spool
from ith_proxy.web.context import ApiContext, json_response, route

SCP_KEYS = (
    "state",
    "held",
    "ae_title",
    "port",
    "associations",
    "instances_received",
    "bytes_received",
)
UNKNOWN = "unknown"
CATALOG_COUNTS = ("patients", "studies", "series", "instances", "bytes")


def scp_state(ctx: ApiContext) -> dict[str, object]:
    """What the service says of its SCP (known keys only), or ``unknown``."""
    if ctx.control is None:
        return {"state": UNKNOWN}
    reported = ctx.control.scp_status()
    return {k: reported[k] for k in SCP_KEYS if k in reported}


def link_state(ctx: ApiContext) -> str:
    return UNKNOWN if ctx.control is None else ctx.control.link_state()


def status(ctx: ApiContext) -> dict[str, Any]:
    spool = Spool(ctx.cfg.spool.dir)
    catalog = ctx.connect_catalog()
    try:
        counts = site_counts(catalog)
    finally:
        catalog.close()
    waiting, lag = incoming_backlog(spool)
    free, total = disk_use(spool)
    problems = ctx.health()
    return {
        "version": __version__,
        "time": iso(time.time()),
        "health": {"status": "degraded" if problems else "ok", "problems": problems},
        "scp": scp_state(ctx),
        "link": {
            "state": link_state(ctx),
            "mode": "offline" if ctx.cfg.link.offline else "backend",
        },
        "catalog": {k: counts[k] for k in CATALOG_COUNTS},
        "studies_by_state": counts["studies_by_state"],
        "queues": {
            "incoming": waiting,
            "incoming_oldest_seconds": round(lag, 3),
            "quarantined": len(spool.quarantined()),
            "outbox": counts["outbox"],
        },
        "dead_letter": counts["failed_forwards"],
        "disk": {
            "free_bytes": free,
            "total_bytes": total,
            "min_free_bytes": ctx.cfg.spool.min_free_mb * 1024 * 1024,
            "below_minimum": free < ctx.cfg.spool.min_free_mb * 1024 * 1024,
        },
    }


def install(app: bottle.Bottle, ctx: ApiContext) -> None:
    """Add this group's routes to the app."""

    @route(app, ctx, "GET", "/api/status/")
    def get_status() -> bottle.HTTPResponse:
        return json_response(200, status(ctx))


_COUNT = {"type": "integer", "minimum": 0}
_TIME = {"type": "string", "format": "date-time"}
_BY_STATE = {"type": "object", "properties": dict.fromkeys(STATES, _COUNT)}
_OUTBOX = {
    "type": "object",
    "properties": dict.fromkeys(("pending", "delivered", "failed"), _COUNT),
}

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "version",
        "time",
        "health",
        "scp",
        "link",
        "catalog",
        "studies_by_state",
        "queues",
        "dead_letter",
        "disk",
    ],
    "additionalProperties": False,
    "properties": {
        "version": {"type": "string"},
        "time": _TIME,
        "health": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["ok", "degraded"]},
                "problems": {"type": "array", "items": {"type": "string"}},
            },
        },
        "scp": {
            "type": "object",
            "required": ["state"],
            "description": "state is running, stopped or unknown (no service to ask)",
            "properties": {
                "state": {"type": "string"},
                "held": {
                    "type": "boolean",
                    "description": "stopped on purpose (DICOM_AUTO_START=false)",
                },
                "ae_title": {"type": "string"},
                "port": {"type": "integer"},
                "associations": _COUNT,
                "instances_received": _COUNT,
                "bytes_received": _COUNT,
            },
        },
        "link": {
            "type": "object",
            "properties": {
                "state": {
                    "type": "string",
                    "enum": ["offline", "connected", "disconnected", "unknown"],
                },
                "mode": {"type": "string", "enum": ["offline", "backend"]},
            },
        },
        "catalog": {"type": "object", "properties": dict.fromkeys(CATALOG_COUNTS, _COUNT)},
        "studies_by_state": _BY_STATE,
        "queues": {
            "type": "object",
            "properties": {
                "incoming": _COUNT,
                "incoming_oldest_seconds": {"type": "number", "minimum": 0},
                "quarantined": _COUNT,
                "outbox": _OUTBOX,
            },
        },
        "dead_letter": {
            "type": "array",
            "description": "failed forwarding destinations, most recent first (at most 20); "
            "`bin/ith-proxy requeue STUDY` or POST /api/studies/<uid>/dispatch/ sends again",
            "items": {
                "type": "object",
                "properties": {
                    "study_instance_uid": {"type": "string"},
                    "node": {"type": "string"},
                    "attempts": _COUNT,
                    "last_error": {"anyOf": [{"type": "string"}, {"enum": [None]}]},
                    "failed_at": _TIME,
                },
            },
        },
        "disk": {
            "type": "object",
            "properties": {
                "free_bytes": _COUNT,
                "total_bytes": _COUNT,
                "min_free_bytes": _COUNT,
                "below_minimum": {"type": "boolean"},
            },
        },
    },
}

OPENAPI: dict[str, Any] = {
    "/api/status/": {
        "get": {
            "summary": "The proxy's state: SCP, studies, queues, dead letter, disk, link",
            "operationId": "getStatus",
            "tags": ["status"],
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "the status",
                    "content": {"application/json": {"schema": STATUS_SCHEMA}},
                }
            },
        }
    }
}
