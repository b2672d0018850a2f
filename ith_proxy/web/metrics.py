"""GET /metrics: the Prometheus text format.

(Being built for issue 10: no routes yet.)
"""

from __future__ import annotations

from typing import Any

import bottle

from ith_proxy.web.context import ApiContext

OPENAPI: dict[str, Any] = {}


def install(app: bottle.Bottle, ctx: ApiContext) -> None:
    """Add this group's routes to the app."""
