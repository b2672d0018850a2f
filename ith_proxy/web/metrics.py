"""GET /metrics: the Prometheus text format (version 0.0.4), for any valid token.

Every name starts with ``ith_proxy_``; each family has its HELP and TYPE
lines, and label values are escaped (backslash, double quote, newline).
The SCP's counters (instances and bytes received, associations) come from
the running service (``ctx.control``); without one those families are left
out rather than reported as zero, and ``ith_proxy_scp_up`` and
``ith_proxy_link_state`` carry the state ``unknown``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import bottle

from ith_proxy import __version__
from ith_proxy.store.browse import disk_use, incoming_backlog, site_counts
from ith_proxy.store.spool import Spool
from ith_proxy.web.context import ApiContext, route
from ith_proxy.web.status import UNKNOWN, link_state, scp_state

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LINK_STATES = ("offline", "connected", "disconnected", UNKNOWN)
SCP_STATES = ("running", "stopped", UNKNOWN)

Sample = tuple[dict[str, str], float]


def escape(value: str) -> str:
    """A label value as the text format wants it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """One metric family: HELP, TYPE and its samples."""
    full = f"ith_proxy_{name}"
    lines = [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
        name = f"{full}{{{label_text}}}" if labels else full
        lines.append(f"{name} {_number(value)}")
    return lines


def render(ctx: ApiContext) -> str:
    spool = Spool(ctx.cfg.spool.dir)
    catalog = ctx.connect_catalog()
    try:
        counts = site_counts(catalog, dead_letters=0)
    finally:
        catalog.close()
    waiting, lag = incoming_backlog(spool)
    free, total = disk_use(spool)
    scp = scp_state(ctx)
    link = link_state(ctx)
    out: list[str] = []
    out += family("info", "gauge", "The proxy's version", [({"version": __version__}, 1)])
    out += family(
        "scp_up",
        "gauge",
        "DICOM listener state (1 for the current state)",
        [({"state": s}, int(scp["state"] == s)) for s in SCP_STATES],
    )
    if "instances_received" in scp:
        out += family(
            "instances_received_total",
            "counter",
            "Instances stored by the DICOM listener since the service started",
            [({}, _int(scp["instances_received"]))],
        )
    if "bytes_received" in scp:
        out += family(
            "bytes_received_total",
            "counter",
            "Bytes of instances stored by the DICOM listener since the service started",
            [({}, _int(scp["bytes_received"]))],
        )
    if "associations" in scp:
        out += family(
            "associations",
            "gauge",
            "DICOM associations open now",
            [({}, _int(scp["associations"]))],
        )
    out += family(
        "studies",
        "gauge",
        "Studies in the catalog by state",
        [({"state": s}, n) for s, n in counts["studies_by_state"].items()],
    )
    out += family(
        "catalog_instances", "gauge", "Instances in the catalog", [({}, counts["instances"])]
    )
    out += family(
        "catalog_bytes", "gauge", "Bytes of the instances in the catalog", [({}, counts["bytes"])]
    )
    out += family("incoming_files", "gauge", "Files waiting in incoming/", [({}, waiting)])
    out += family(
        "indexer_lag_seconds",
        "gauge",
        "Age of the oldest file waiting in incoming/ (0 when none)",
        [({}, round(lag, 3))],
    )
    out += family(
        "outbox_entries",
        "gauge",
        "Forwarding destinations by state (pending: the outbox depth)",
        [({"state": s}, n) for s, n in counts["outbox"].items()],
    )
    out += family(
        "forward_failures",
        "gauge",
        "Forwarding destinations that failed for good (the dead letter)",
        [({}, counts["outbox"]["failed"])],
    )
    out += family("disk_free_bytes", "gauge", "Free bytes on the spool's filesystem", [({}, free)])
    out += family("disk_total_bytes", "gauge", "Size of the spool's filesystem", [({}, total)])
    out += family(
        "disk_min_free_bytes",
        "gauge",
        "Below this much free disk C-STORE is refused ([spool] min_free_mb)",
        [({}, ctx.cfg.spool.min_free_mb * 1024 * 1024)],
    )
    out += family(
        "link_state",
        "gauge",
        "Backend WebSocket link state (1 for the current state)",
        [({"state": s}, int(link == s)) for s in LINK_STATES],
    )
    return "\n".join(out) + "\n"


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def install(app: bottle.Bottle, ctx: ApiContext) -> None:
    """Add this group's routes to the app."""

    @route(app, ctx, "GET", "/metrics")
    def get_metrics() -> bottle.HTTPResponse:
        return bottle.HTTPResponse(
            status=200,
            body=render(ctx),
            headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"},
        )


OPENAPI: dict[str, Any] = {
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (text format 0.0.4), names prefixed ith_proxy_",
            "operationId": "getMetrics",
            "tags": ["metrics"],
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "the metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
}
