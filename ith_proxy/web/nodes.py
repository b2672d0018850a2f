"""GET|POST|PUT|DELETE /api/nodes/..., POST /api/nodes/<name>/echo/: the node
registry through the API (DESIGN.md §5 "Rules for nodes").

Every route needs a valid token.  The API creates, replaces and deletes only
``api`` nodes: an ``ini``, ``derived`` or ``backend`` node is answered 409
(it exists, and the request conflicts with where it comes from), and so is a
name or an AE title that another node has.  Bodies are validated by the
registry with the configuration's own rules (``store/nodes.py``,
``config_values``); a refusal is a 400 naming the field.  ``auth_header`` is a
secret: it is never returned, only ``auth_header_set``.

Every change, made or refused, is audited (``node.put`` / ``node.delete``,
the node name as target, the outcome) before it is answered.  An echo is
not a change and is not audited; it goes through the service's ``Control``
(``[scu]`` timeouts): 200 ``{"ok": true, "node", "detail"}``, or 502 with
``{"ok": false, "error"}`` and the one-line reason when the peer cannot be
reached or refuses; 429 when two echoes are already running (each may hold
one of the API's threads for the ``[scu]`` timeouts).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import bottle

from ith_proxy import config_values as v
from ith_proxy.store.nodes import Node, NodeConflict, NodeError, NodeNotFound, Nodes
from ith_proxy.web.context import ApiContext, ApiError, audit, json_object, json_response, route
from ith_proxy.web.openapi import error_response

# the field a registry refusal is about: "invalid node: port: ..." -> port
_FIELD = re.compile(r"\b(name|kind|ae_title|host|port|url|auth_header)\b")


def _name(raw: str) -> str:
    """A node name from the path; 404 for anything that cannot be one (no
    path characters, no control characters reach the registry or the log)."""
    try:
        return v.node_name(raw)
    except ValueError:
        raise ApiError(404, "no such node", "name") from None


def _field(message: str) -> str:
    if "unknown key" in message:
        return "body"
    if "AE title" in message:
        return "ae_title"
    found = _FIELD.search(message)
    return found.group(1) if found else "name"


def _refused(ctx: ApiContext, action: str, name: str, exc: NodeError) -> ApiError:
    """Audit a refused change and make its answer."""
    if isinstance(exc, NodeNotFound):
        status, outcome = 404, "404"
    elif isinstance(exc, NodeConflict):
        status, outcome = 409, "409"
    else:
        status, outcome = 400, "400"
    audit(ctx, action, name, outcome, reason=str(exc)[:200])
    return ApiError(status, str(exc), _field(str(exc)))


@contextmanager
def _audited(ctx: ApiContext, action: str, target: str) -> Iterator[None]:
    """A change refused before it reaches the registry (a body that is not
    JSON, a name that cannot be one) is audited too, with its status; the
    target is ``-`` when the name itself was refused (it is never logged)."""
    try:
        yield
    except ApiError as exc:
        audit(ctx, action, target, str(exc.status), reason=exc.message[:200])
        raise


def _get(ctx: ApiContext, name: str) -> Node | None:
    catalog = ctx.connect_catalog()
    try:
        return Nodes(catalog).get(name)
    finally:
        catalog.close()


def _put(ctx: ApiContext, body: dict[str, Any], name: str, created: bool) -> bottle.HTTPResponse:
    """Create (``created``: 409 if the name exists) or replace an api node."""
    catalog = ctx.connect_catalog()
    try:
        nodes = Nodes(catalog)
        with nodes.transaction():  # the change commits only once its record is written
            try:
                existed = nodes.get(name) is not None
                node = nodes.put(body, create_only=created)
            except NodeError as exc:
                raise _refused(ctx, "node.put", name, exc) from None
            audit(ctx, "node.put", node.name, "success", kind=node.kind, replaced=existed)
    finally:
        catalog.close()
    status = 200 if existed else 201
    return json_response(status, node.public(), {"Location": f"/api/nodes/{node.name}/"})


def _body_name(body: dict[str, Any]) -> str:
    raw = body.get("name")
    if not isinstance(raw, str):
        raise ApiError(400, "name: a node needs a name (a string)", "name")
    try:
        return v.node_name(raw)
    except ValueError as exc:
        raise ApiError(400, f"name: {exc}", "name") from None


def install(app: bottle.Bottle, ctx: ApiContext) -> None:
    """Add this group's routes to the app."""

    @route(app, ctx, "GET", "/api/nodes/")
    def list_nodes() -> bottle.HTTPResponse:
        catalog = ctx.connect_catalog()
        try:
            nodes = Nodes(catalog).list()
        finally:
            catalog.close()
        return json_response(200, {"nodes": [n.public() for n in nodes]})

    @route(app, ctx, "GET", "/api/nodes/<name>/")
    def get_node(name: str) -> bottle.HTTPResponse:
        node = _get(ctx, _name(name))
        if node is None:
            raise ApiError(404, "no such node", "name")
        return json_response(200, node.public())

    @route(app, ctx, "POST", "/api/nodes/")
    def create_node() -> bottle.HTTPResponse:
        with _audited(ctx, "node.put", "-"):
            body = json_object(bottle.request)
            name = _body_name(body)
        return _put(ctx, body, name, created=True)

    @route(app, ctx, "PUT", "/api/nodes/<name>/")
    def put_node(name: str) -> bottle.HTTPResponse:
        with _audited(ctx, "node.put", "-"):
            name = _name(name)
        with _audited(ctx, "node.put", name):
            body = json_object(bottle.request)
            if "name" in body and body["name"] != name:
                raise ApiError(400, "name: the body names another node than the path", "name")
        return _put(ctx, {**body, "name": name}, name, created=False)

    @route(app, ctx, "DELETE", "/api/nodes/<name>/")
    def delete_node(name: str) -> bottle.HTTPResponse:
        with _audited(ctx, "node.delete", "-"):
            name = _name(name)
        catalog = ctx.connect_catalog()
        try:
            nodes = Nodes(catalog)
            with nodes.transaction():  # committed only once its record is written
                try:
                    nodes.delete(name)
                except NodeError as exc:
                    raise _refused(ctx, "node.delete", name, exc) from None
                audit(ctx, "node.delete", name, "success")
        finally:
            catalog.close()
        return json_response(200, {"deleted": name})

    @route(app, ctx, "POST", "/api/nodes/<name>/echo/")
    def echo_node(name: str) -> bottle.HTTPResponse:
        node = _get(ctx, _name(name))
        if node is None:
            raise ApiError(404, "no such node", "name")
        if node.kind != "dicom":
            raise ApiError(409, f"node {node.name} is a DICOMweb node: C-ECHO speaks DICOM", "name")
        if ctx.control is None:
            raise ApiError(503, "no service runs here to echo from")
        try:
            detail = ctx.control.echo(node.name)
        except BlockingIOError as exc:  # too many echoes at once (each holds a thread)
            raise ApiError(429, str(exc)) from None
        except (ValueError, LookupError) as exc:
            return json_response(502, {"ok": False, "node": node.name, "error": str(exc)})
        return json_response(200, {"ok": True, "node": node.name, "detail": detail})


# --- OpenAPI ---


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "invalid input; `field` names it",
        401: "missing or invalid token",
        403: "the token lacks a required scope",
        404: "no such node",
        409: "the node is not an api node, or its name or AE title is taken",
        413: "body over 1 MB",
        502: "the C-ECHO failed; `error` says why in one line",
        503: "no service runs here to echo from",
        429: "two echoes are already running; try again later",
    }
    return {str(c): error_response(text[c]) for c in codes}


_NODE_IN: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "kind"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
        "kind": {"type": "string", "enum": ["dicom", "dicomweb"]},
        "ae_title": {"type": "string", "maxLength": 16},
        "host": {"type": "string", "maxLength": 253},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "url": {"type": "string", "maxLength": 2048, "description": "http(s), no credentials"},
        "auth_header": {"type": "string", "maxLength": 8192, "writeOnly": True},
    },
}
_NODE_OUT: dict[str, Any] = {
    "type": "object",
    "required": ["name", "kind", "source"],
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["dicom", "dicomweb"]},
        "source": {"type": "string", "enum": ["ini", "api", "backend", "derived"]},
        "ae_title": {"type": "string"},
        "host": {"type": "string"},
        "port": {"type": "integer"},
        "url": {"type": "string"},
        "auth_header_set": {"type": "boolean"},
        "updated_at": {"type": "number"},
    },
}
_BODY = {"required": True, "content": {"application/json": {"schema": _NODE_IN}}}
_DELETED = {"type": "object", "properties": {"deleted": {"type": "string"}}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


OPENAPI: dict[str, Any] = {
    "/api/nodes/": {
        "get": {
            "summary": "List every node (any source); secrets are never shown",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"nodes": {"type": "array", "items": _NODE_OUT}},
                    },
                    "the nodes",
                ),
                **_errors(401, 403),
            },
        },
        "post": {
            "summary": "Create an api node",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _NODE_IN}},
            },
            "responses": {"201": _json(_NODE_OUT, "created"), **_errors(400, 401, 403, 409, 413)},
        },
    },
    "/api/nodes/{name}/": {
        "parameters": [_NAME],
        "get": {
            "summary": "One node",
            "responses": {"200": _json(_NODE_OUT, "the node"), **_errors(401, 403, 404)},
        },
        "put": {
            "summary": "Create or replace an api node (ini, derived and backend nodes: 409)",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _NODE_IN}},
            },
            "responses": {
                "200": _json(_NODE_OUT, "replaced"),
                "201": _json(_NODE_OUT, "created"),
                **_errors(400, 401, 403, 404, 409, 413),
            },
        },
        "delete": {
            "summary": "Delete an api node (ini, derived and backend nodes: 409)",
            "responses": {
                "200": _json(
                    {"type": "object", "properties": {"deleted": {"type": "string"}}}, "deleted"
                ),
                **_errors(401, 403, 404, 409),
            },
        },
    },
    "/api/nodes/{name}/echo/": {
        "parameters": [_NAME],
        "post": {
            "summary": "C-ECHO a dicom node, bounded by the [scu] timeouts",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "ok": {"type": "boolean"},
                            "node": {"type": "string"},
                            "detail": {"type": "string"},
                        },
                    },
                    "the peer answered the C-ECHO with success",
                ),
                "502": _json(
                    {
                        "type": "object",
                        "properties": {
                            "ok": {"type": "boolean"},
                            "node": {"type": "string"},
                            "error": {"type": "string"},
                        },
                    },
                    "the C-ECHO failed; `error` says why in one line",
                ),
                **_errors(401, 403, 404, 409, 429, 503),
            },
        },
    },
}
