"""``GET {ITH_URL}/api/proxy/config/``: the backend's configuration, fetched
at start-up and applied to the persisted layer (DESIGN.md §5, "Startup").

The body is untrusted: at most ``max_message_kb``, a JSON object, each
field checked on its own (a refused one is logged and reported, the others
still apply).  The runtime settings go to ``store.settings`` (source
``backend``), ``nodes`` to ``Nodes.sync``; ``anonymize`` is never applied
(a differing value is logged and reported).  When the backend cannot be
reached the proxy runs on what was persisted before, and the link retries.

TLS: certificates are verified (the system trust store, or ``[link]
ca_file``).  The token goes in the ``Authorization`` header only and is
never logged.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.error
import urllib.request
from typing import Any

from ith_proxy.config import Config
from ith_proxy.link.commands import apply_settings
from ith_proxy.link.protocol import safe
from ith_proxy.store.catalog import Catalog
from ith_proxy.store.nodes import NodeError, Nodes

log = logging.getLogger("ith_proxy.link")

PATH = "/api/proxy/config/"


class FetchError(Exception):
    """The config could not be fetched or read; the text is safe to log."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect could carry the token elsewhere: refused


def tls_context(cfg: Config) -> ssl.SSLContext:
    """Verifying context: the system's CAs, or only ``[link] ca_file``."""
    cafile = cfg.link.ca_file or None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"[link] ca_file cannot be read: {type(exc).__name__}") from None


def fetch(cfg: Config) -> dict[str, Any]:
    """The backend's config object; FetchError when down or unreadable."""
    url = cfg.link.ith_url + PATH
    request = urllib.request.Request(
        url, headers={"Authorization": f"Token {cfg.link.ith_token}", "Accept": "application/json"}
    )
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if url.startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(context=tls_context(cfg)))
    opener = urllib.request.build_opener(*handlers)
    limit = cfg.link.max_message_kb * 1024
    try:
        with opener.open(request, timeout=cfg.link.connect_timeout) as response:
            raw = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            why = safe(str(reason.verify_message), 120)
            raise FetchError(f"TLS certificate not accepted ({why})") from None
        raise FetchError(f"unreachable ({type(reason).__name__})") from None
    if len(raw) > limit:
        raise FetchError(f"the config is larger than {cfg.link.max_message_kb} KiB")
    try:
        body = json.loads(raw, parse_constant=_bad)
    except (ValueError, RecursionError):
        raise FetchError("the config is not JSON") from None
    if not isinstance(body, dict):
        raise FetchError("the config is not a JSON object")
    return body


def _bad(name: str) -> object:
    raise ValueError(name)


def apply(cfg: Config, catalog: Catalog, body: dict[str, Any]) -> dict[str, Any]:
    """Persist the settings and nodes of a config object, each on its own;
    return the report (applied, changed, refused) without PHI."""
    report: dict[str, Any] = {}
    if "nodes" in body:  # first: forward_to may name the nodes it brings
        try:
            refusals = Nodes(catalog).sync(body["nodes"])
            report["nodes"] = {
                "refused": [{"node": safe(r.name), "reason": r.reason} for r in refusals[:100]]
            }
        except NodeError as exc:
            log.warning("link: backend config nodes refused: %s", exc)
            report["nodes"] = {"error": str(exc)}
    _, detail = apply_settings(cfg, catalog, body)
    report.update(detail)
    log.info(
        "link: backend config applied (%s)%s",
        ", ".join(detail["applied"]) or "no settings",
        f"; refused: {', '.join(sorted(detail['refused']))}" if detail.get("refused") else "",
    )
    return report


def fetch_and_apply(cfg: Config, catalog: Catalog) -> dict[str, Any]:
    """Fetch then apply; FetchError when the backend cannot be read."""
    return apply(cfg, catalog, fetch(cfg))
