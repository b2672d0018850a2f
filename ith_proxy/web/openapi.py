"""The OpenAPI 3.1 document served at ``GET /api/openapi.json``.

:func:`document` joins the ``OPENAPI`` fragment of every route module (and
the two routes ``web.app`` declares itself, :data:`OPENAPI` here) into one
document, adds the bearer security scheme and the standard error answers,
and refuses a path and method declared twice.

How a route module writes its fragment
--------------------------------------

``OPENAPI`` is a dict of paths, each written as the route serves it, in
OpenAPI form (``/api/studies/{uid}/`` for the Bottle rule
``/api/studies/<uid>/``), with one operation per method::

    OPENAPI = {
        "/api/nodes/{name}/": {
            "get": {
                "summary": "One node",
                "operationId": "getNode",           # unique in the document
                "x-scopes": ["nodes:read"],          # what route(scope=...) requires
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "maxLength": 64}}],
                "responses": {"200": json_content("a node", {"$ref": "#/components/schemas/Node"})},
            },
        },
    }
    SCHEMAS = {"Node": {"type": "object", ...}}       # optional, shared by name

- Every operation needs a bearer token unless it says ``"security": []``
  (a public route).  ``x-scopes`` lists the scopes ``route(..., scope=)``
  requires (OpenAPI has no place for them with an ``http`` scheme; the
  schemathesis test mints its token with every scope found there).
- Write the success answers and the errors that are particular to the
  route (a 404 for an unknown name, a 409 ...).  These are added where the
  operation does not give them, as ``{"$ref": "#/components/responses/..."}``
  with the ``Error`` body (``{"error": str, "field": str}``): 400 when it has
  parameters or a body, 401 and 403 when it is not public, 404 when its path
  has a parameter, 413 when it has a body, and 500 always.
- Schemas used by more than one operation go in the module's ``SCHEMAS``
  (names unique across modules; ``Error`` is defined here); refer to them as
  ``#/components/schemas/<Name>``.  Say ``additionalProperties`` and
  ``required`` so that the schemathesis run checks the answers for real.
- A route not in the document, or a documented one no route serves, fails
  ``tests/test_api_openapi.py``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ith_proxy import __version__

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def json_content(description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    """A response with a JSON body of ``schema``."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what went wrong, in one line"},
        "field": {"type": "string", "description": "the input at fault (400)"},
    },
    "additionalProperties": False,
}


def error_response(description: str) -> dict[str, Any]:
    """A response with the JSON error body (``{"error": ..., "field": ...}``)."""
    return json_content(description, ERROR_SCHEMA)


_ERRORS = {
    "BadRequest": ("400", "bad input: `field` names it"),
    "Unauthorized": ("401", "no valid bearer token (any reason: one generic answer)"),
    "Forbidden": ("403", "the token lacks the scope this route requires"),
    "NotFound": ("404", "no such thing"),
    "TooLarge": ("413", "the request body is larger than 1 MB"),
    "InternalError": ("500", "an internal error (no details are given)"),
}

_HEALTH = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["ok", "degraded"]},
        "problems": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}

# the routes web.app declares itself
OPENAPI: dict[str, Any] = {
    "/api/health/": {
        "get": {
            "summary": "Whether the proxy works (public; no versions, paths or PHI)",
            "operationId": "getHealth",
            "security": [],
            "responses": {
                "200": json_content("all is well", _HEALTH),
                "503": json_content("degraded: one line per problem", _HEALTH),
            },
        }
    },
    "/api/openapi.json": {
        "get": {
            "summary": "This document (public)",
            "operationId": "getOpenapi",
            "security": [],
            "responses": {
                "200": json_content(
                    "the OpenAPI 3.1 document", {"type": "object", "required": ["openapi", "paths"]}
                )
            },
        }
    },
}


def document(fragments: Iterable[Mapping[str, Any]], schemas: Iterable[Mapping[str, Any]]) -> dict:
    """The whole document from the route modules' ``OPENAPI`` and ``SCHEMAS``;
    ValueError on a path and method (or an operationId, or a schema name)
    declared twice."""
    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    for fragment in fragments:
        for path, item in fragment.items():
            if not path.startswith("/"):
                raise ValueError(f"OpenAPI path {path!r} does not start with /")
            target = paths.setdefault(path, {})
            for method, operation in item.items():
                if method not in METHODS:
                    target.setdefault(method, copy.deepcopy(operation))  # parameters, summary
                    continue
                if method in target:
                    raise ValueError(f"OpenAPI: {method.upper()} {path} is declared twice")
                op = copy.deepcopy(dict(operation))
                op_id = op.get("operationId")
                if op_id is not None:
                    if op_id in operation_ids:
                        raise ValueError(f"OpenAPI: operationId {op_id!r} is used twice")
                    operation_ids.add(op_id)
                target[method] = _with_errors(path, op)
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for more in schemas:
        for name, schema in more.items():
            if name in components:
                raise ValueError(f"OpenAPI: schema {name!r} is declared twice")
            components[name] = copy.deepcopy(schema)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ith-proxy API",
            "version": __version__,
            "description": "The edge DICOM proxy's HTTP API (docs/api.md).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "responses": {
                name: json_content(text, {"$ref": "#/components/schemas/Error"})
                for name, (_, text) in _ERRORS.items()
            },
            "schemas": components,
        },
    }


def _with_errors(path: str, op: dict[str, Any]) -> dict[str, Any]:
    responses = op.setdefault("responses", {})
    public = op.get("security") == []
    wanted = ["InternalError"]
    if op.get("parameters") or op.get("requestBody") or "{" in path:
        wanted.append("BadRequest")
    if not public:
        wanted += ["Unauthorized", "Forbidden"]
    if "{" in path:
        wanted.append("NotFound")
    if op.get("requestBody"):
        wanted.append("TooLarge")
    for name in wanted:
        code = _ERRORS[name][0]
        responses.setdefault(code, {"$ref": f"#/components/responses/{name}"})
    op["responses"] = dict(sorted(responses.items()))
    return op


_RULE_PARAM = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)(?::[^>]*)?>")


def openapi_path(rule: str) -> str:
    """A Bottle rule in OpenAPI form: ``/api/studies/<uid>/`` -> ``/api/studies/{uid}/``."""
    return _RULE_PARAM.sub(r"{\1}", rule)
