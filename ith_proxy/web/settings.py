"""GET|PUT /api/config/: the runtime settings, persisted, with where each value came from.

The runtime settings (DESIGN.md §5) are ``ae_title``, ``dicom_port``,
``study_timeout`` and ``forward_to``; the node list, the fifth, is at
``/api/nodes/``.  ``GET`` shows each one's value and source (``default``,
the INI path, ``environment VAR``, ``.env VAR``, ``api`` or ``backend``),
plus ``anonymize`` read-only with its local source, and the SCP's state.

``PUT`` takes a partial object of those four keys.  Refused with 400 naming
the field: ``anonymize`` (local only: remote control never switches
de-identification off), an unknown key, a bad value, an empty object, the
API's own port as ``dicom_port``, a ``forward_to`` name that is not a node.
An accepted change is persisted (source ``api``; it survives restarts and
sits above INI and environment) and applied at once through the service's
``Control``: a new AE title or port restarts the SCP in the process; a
held SCP (``DICOM_AUTO_START=false``) starts.  If the SCP cannot listen on
the new port, the old one keeps serving, the persisted values are put back
and the answer is 409 naming the field.  Every PUT by an authenticated
caller is audited (``config.put``, the keys, the outcome) before it is
answered.
"""

from __future__ import annotations

from typing import Any

import bottle

from ith_proxy.store.nodes import Nodes
from ith_proxy.store.settings import KEYS, RuntimeSettings, SettingsError, describe, validate
from ith_proxy.web.context import ApiContext, ApiError, audit, json_object, json_response, route
from ith_proxy.web.openapi import error_response

TARGET = "config"  # the audit record's target


def _view(ctx: ApiContext, settings: RuntimeSettings) -> dict[str, Any]:
    cfg = ctx.cfg
    view: dict[str, Any] = dict(describe(cfg, settings.persisted()))
    view["anonymize"] = {
        "value": cfg.deid.anonymize,
        "source": cfg.origins.get("deid.anonymize", "default"),
        "read_only": True,
    }
    out: dict[str, Any] = {"settings": view, "nodes": "/api/nodes/"}
    if ctx.control is not None:
        out["scp"] = ctx.control.scp_status()
    return out


def _check(ctx: ApiContext, body: dict[str, Any], nodes: Nodes) -> dict[str, object]:
    """The validated values; SettingsError names the field refused."""
    if not body:
        raise SettingsError("body", f"give at least one of {', '.join(KEYS)}")
    values = validate(body)
    if values.get("dicom_port") == ctx.cfg.api.port:
        raise SettingsError("dicom_port", "is the API's port")
    names = values.get("forward_to", [])
    for name in names if isinstance(names, list) else []:
        if nodes.get(name) is None:
            raise SettingsError("forward_to", f"{name!r} is not a node (see /api/nodes/)")
    return values


def _put(ctx: ApiContext) -> bottle.HTTPResponse:
    try:
        body = json_object(bottle.request)
    except ApiError as exc:
        audit(ctx, "config.put", TARGET, str(exc.status), reason=exc.message)
        raise
    catalog = ctx.connect_catalog()
    try:
        settings = RuntimeSettings(catalog)
        try:
            values = _check(ctx, body, Nodes(catalog))
        except SettingsError as exc:
            audit(ctx, "config.put", TARGET, "400", field=exc.field)
            raise ApiError(400, str(exc), exc.field) from None
        previous = {k: settings.persisted().get(k) for k in values}

        def undo() -> None:
            settings.restore(previous, values)
            if ctx.control is not None:
                ctx.control.settings_changed()

        changed = settings.update(values, "api")
        problems = ctx.control.settings_changed() if ctx.control is not None else []
        if problems:  # the SCP could not move: keep it where it is
            undo()
            field = "dicom_port" if "dicom_port" in values else "ae_title"
            audit(ctx, "config.put", TARGET, "409", keys=sorted(values), field=field)
            raise ApiError(409, f"{field}: {problems[0]}", field)
        try:
            audit(ctx, "config.put", TARGET, "success", keys=sorted(values), changed=changed)
        except ApiError:  # no record, no change
            undo()
            raise
        return json_response(200, {**_view(ctx, settings), "changed": changed})
    finally:
        catalog.close()


def install(app: bottle.Bottle, ctx: ApiContext) -> None:
    """Add this group's routes to the app."""

    @route(app, ctx, "GET", "/api/config/")
    def get_config() -> bottle.HTTPResponse:
        catalog = ctx.connect_catalog()
        try:
            return json_response(200, _view(ctx, RuntimeSettings(catalog)))
        finally:
            catalog.close()

    @route(app, ctx, "PUT", "/api/config/")
    def put_config() -> bottle.HTTPResponse:
        return _put(ctx)


# --- OpenAPI ---

_SOURCE = {
    "type": "string",
    "description": "default, the INI path, environment VAR, .env VAR, api or backend",
}


def _setting(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["value", "source"],
        "properties": {"value": schema, "source": _SOURCE},
    }


_AE = {"type": "string", "minLength": 1, "maxLength": 16, "pattern": "^[ -\\[\\]-~]+$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_TIMEOUT = {"type": "number", "exclusiveMinimum": 0, "maximum": 604800}
_FORWARD = {
    "type": "array",
    "maxItems": 64,
    "items": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
}
_CONFIG: dict[str, Any] = {
    "type": "object",
    "properties": {
        "settings": {
            "type": "object",
            "properties": {
                "ae_title": _setting(_AE),
                "dicom_port": _setting(_PORT),
                "study_timeout": _setting(_TIMEOUT),
                "forward_to": _setting(_FORWARD),
                "anonymize": {
                    **_setting({"type": "boolean"}),
                    "description": "local only: shown, never set through the API",
                },
            },
        },
        "nodes": {"type": "string", "description": "where the node list is"},
        "scp": {
            "type": "object",
            "properties": {
                "state": {"type": "string", "enum": ["running", "stopped"]},
                "held": {"type": "boolean"},
                "ae_title": {"type": "string"},
                "port": {"type": "integer"},
                "associations": {"type": "integer"},
                "instances_received": {"type": "integer"},
                "bytes_received": {"type": "integer"},
            },
        },
        "changed": {"type": "array", "items": {"type": "string"}},
    },
}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "invalid input (anonymize, an unknown key, a bad value); `field` names it",
        401: "missing or invalid token",
        403: "the token lacks a required scope",
        409: "the SCP cannot listen there; it keeps its old AE title and port",
        413: "body over 1 MB",
    }
    return {str(c): error_response(text[c]) for c in codes}


OPENAPI: dict[str, Any] = {
    "/api/config/": {
        "get": {
            "summary": "The runtime settings with where each value came from; the SCP's state",
            "responses": {
                "200": {
                    "description": "the settings",
                    "content": {"application/json": {"schema": _CONFIG}},
                },
                **_errors(401, 403),
            },
        },
        "put": {
            "summary": "Set runtime settings (persisted, applied live)",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "minProperties": 1,
                            "properties": {
                                "ae_title": _AE,
                                "dicom_port": _PORT,
                                "study_timeout": _TIMEOUT,
                                "forward_to": _FORWARD,
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "persisted and applied",
                    "content": {"application/json": {"schema": _CONFIG}},
                },
                **_errors(400, 401, 403, 409, 413),
            },
        },
    }
}
