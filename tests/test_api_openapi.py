"""The OpenAPI document (GET /api/openapi.json, web/openapi.py) and a
schemathesis run against a real running proxy.

The run covers every operation the document holds (health and the document
itself today; each route module's operations as they are added), with a
bounded number of examples each, a token that has every scope the document
names (``x-scopes``, plus ``phi:read``), and checks: no 5xx, status codes,
content types and bodies as documented.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import tools
from ith_proxy.web import openapi
from ith_proxy.web.app import ROUTES, api_document
from tokens import ENV, mint
from worker_rooms import Rooms

EXAMPLES = 25  # per operation: bounded, and quick


def _scopes(doc: dict[str, Any]) -> set[str]:
    found = {"phi:read"}
    for item in doc["paths"].values():
        for op in item.values():
            if isinstance(op, dict):
                found.update(op.get("x-scopes", []))
    return found


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    with tools.ProxyProcess(tmp_path_factory.mktemp("openapi") / "p", env=ENV) as running:
        yield running


@pytest.fixture(scope="module")
def document(proxy) -> dict[str, Any]:
    status, doc = tools.http_json("GET", proxy.api_url + "/api/openapi.json")  # public
    assert status == 200
    return doc


@pytest.fixture(scope="module")
def token(document) -> str:
    return mint(" ".join(sorted(_scopes(document))), sub="schemathesis")


@pytest.fixture(scope="module")
def api_schema(document):
    return schemathesis.openapi.from_dict(document)


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """Every operation of the document (built here as the proxy builds it;
    test_the_document_is_served_and_public checks they are the same), with
    valid inputs, and with invalid ones where it takes any (parameters, body)."""
    cases = []
    for path, item in api_document()["paths"].items():
        for method, op in item.items():
            if method not in openapi.METHODS:
                continue
            cases.append((method.upper(), path, GenerationMode.POSITIVE))
            if op.get("parameters") or item.get("parameters") or op.get("requestBody"):
                cases.append((method.upper(), path, GenerationMode.NEGATIVE))
    return cases


# (schemathesis.pytest.from_fixture is not used: under pytest 9 its lazy
# parametrization fails on Function._nodeid; the strategies are driven here)
@pytest.mark.parametrize(("method", "path", "mode"), _operations())
def test_every_operation_conforms(api_schema, proxy, token, method, path, mode) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        case.call_and_validate(
            base_url=proxy.api_url,
            headers={"Authorization": f"Bearer {token}"},
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
            timeout=30,
        )

    run()


def test_the_document_is_served_and_public(document) -> None:
    assert document == api_document()  # what the running proxy serves is what is built
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert document["security"] == [{"bearer": []}]
    for path in ("/api/health/", "/api/openapi.json"):
        assert document["paths"][path]["get"]["security"] == []


def test_every_operation_documents_its_errors() -> None:
    doc = api_document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in openapi.METHODS:
                continue
            codes = set(op["responses"])
            assert "500" in codes, (method, path)
            assert any(c.startswith("2") for c in codes), (method, path)
            if op.get("security") != []:
                assert {"401", "403"} <= codes, (method, path)
            if "{" in path:
                assert {"400", "404"} <= codes, (method, path)
            if "requestBody" in op:
                assert {"400", "413"} <= codes, (method, path)


def _served(tmp_path: Path) -> set[tuple[str, str]]:
    rooms = Rooms(tmp_path / "site", env=ENV)
    try:
        app = rooms.api()
        return {(r.method.lower(), openapi.openapi_path(r.rule)) for r in app.routes}
    finally:
        rooms.close()


def test_every_route_is_documented_and_back(tmp_path) -> None:
    doc = api_document()
    documented = {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in openapi.METHODS
    }
    served = _served(tmp_path)
    assert served - documented == set(), "routes missing from the OpenAPI document"
    assert documented - served == set(), "documented operations no route serves"
    assert {("get", "/api/health/"), ("get", "/api/openapi.json")} <= served


def test_every_module_declares_its_fragment() -> None:
    for module in ROUTES:
        assert isinstance(module.OPENAPI, dict), module.__name__
        for path in module.OPENAPI:
            assert re.fullmatch(r"/[A-Za-z0-9_./{}-]*", path), (module.__name__, path)


def test_document_refuses_what_is_declared_twice() -> None:
    op = {"responses": {"200": {"description": "ok"}}}
    with pytest.raises(ValueError, match="GET /a/ is declared twice"):
        openapi.document([{"/a/": {"get": op}}, {"/a/": {"get": op}}], [])
    with pytest.raises(ValueError, match="operationId 'x' is used twice"):
        openapi.document(
            [
                {
                    "/a/": {"get": {**op, "operationId": "x"}},
                    "/b/": {"get": {**op, "operationId": "x"}},
                }
            ],
            [],
        )
    with pytest.raises(ValueError, match="schema 'Error' is declared twice"):
        openapi.document([], [{"Error": {}}])
    with pytest.raises(ValueError, match="does not start with /"):
        openapi.document([{"a/": {"get": op}}], [])
    # the standard errors are added, and what a fragment says is kept
    doc = openapi.document(
        [
            {
                "/a/{n}/": {
                    "post": {**op, "requestBody": {"content": {}}, "responses": {"404": {"x": 1}}}
                }
            }
        ],
        [],
    )
    responses = doc["paths"]["/a/{n}/"]["post"]["responses"]
    assert responses["404"] == {"x": 1}
    assert set(responses) == {"400", "401", "403", "404", "413", "500"}


def test_openapi_path_of_bottle_rules() -> None:
    assert openapi.openapi_path("/api/studies/<uid>/") == "/api/studies/{uid}/"
    assert openapi.openapi_path("/api/nodes/<name:re:[a-z]+>/echo/") == "/api/nodes/{name}/echo/"
    assert openapi.openapi_path("/metrics") == "/metrics"
