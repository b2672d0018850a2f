"""Test tokens: JWTs minted with PyJWT for the API's tests.

``SECRET`` is the HS256 secret the tests configure (``JWT_SECRET``); ``mint``
makes a token with a ``sub``, the given scopes and an ``exp`` an hour away,
unless the caller overrides or removes (``None``) a claim.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

SECRET = "test-jwt-secret-0123456789abcdef0123456789abcdef"
ENV = {"JWT_SECRET": SECRET}


def mint(
    scope: str = "",
    *,
    key: Any = SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed token; a claim given as None is left out (``exp=None``: no exp)."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": "tester", "iat": now, "exp": now + 3600}
    if scope:
        body["scope"] = scope
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)
