"""JWT bearer tokens, verified with PyJWT (DESIGN.md §5, JWT rules).

- The algorithms come from the configuration only: HS256 with ``JWT_SECRET``,
  RS256 and ES256 with ``JWT_PUBLIC_KEY_FILE``.  ``none`` is never accepted,
  and a token's own ``alg`` header never chooses the key type: an RS public
  key cannot be used as an HMAC secret.
- ``exp`` is required; ``aud`` and ``iss`` are checked when configured (the
  issuer compared whole, never as a prefix); the leeway is 30 s (at most 60).
- Scopes are the space-separated claim ``scope``.
- The token comes from the ``Authorization: Bearer`` header only, never from
  the query string.

With neither a secret nor a public key configured, every token is refused
(the API is then health and the OpenAPI document only; ``make_app`` warns at
start-up).  Every refusal is one generic 401; the reason is kept for
``api.log`` only (``ith.auth_refusal`` in the WSGI environ): it never holds
the token or a claim's value.
"""

from __future__ import annotations

from pathlib import Path

import bottle
import jwt

from ith_proxy.config import ApiConfig
from ith_proxy.web.context import ApiError, Claims

LEEWAY = 30  # seconds; DESIGN.md allows at most 60
MIN_SECRET = 32  # bytes: HS256 with a shorter secret can be brute-forced (RFC 7518 3.2)
MAX_TOKEN = 8192  # a longer Authorization header is refused unread
# JWA names a refusal reason may repeat (any other alg header is attacker text)
_KNOWN_ALGS = frozenset({a.lower() for a in jwt.algorithms.get_default_algorithms()} | {"none"})
REFUSAL = "ith.auth_refusal"  # environ key: why a token was refused (for api.log)


class AuthConfigError(ValueError):
    """The JWT settings cannot be used (an unreadable or invalid public key)."""


def _public_key(path: str) -> tuple[object, list[str]]:
    """The verifying key in ``path`` and its one algorithm: an RSA public key
    of at least 2048 bits (RS256) or an EC P-256 public key (ES256).  A private
    key, a certificate, another curve or anything else stops the start."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(
            f"[api] jwt_public_key_file: cannot read {path}: {exc.strerror}"
        ) from None
    for alg in ("RS256", "ES256"):
        try:
            key = jwt.get_algorithm_by_name(alg).prepare_key(pem)
        except (jwt.InvalidKeyError, ValueError, TypeError):
            continue
        if not hasattr(key, "verify") or hasattr(key, "sign"):  # a private key
            break
        if alg == "RS256" and getattr(key, "key_size", 0) < 2048:
            raise AuthConfigError(
                f"[api] jwt_public_key_file: {path} is an RSA key shorter than 2048 bits"
            )
        if alg == "ES256" and getattr(getattr(key, "curve", None), "name", "") != "secp256r1":
            raise AuthConfigError(
                f"[api] jwt_public_key_file: {path} is an EC key not on P-256 (ES256 only)"
            )
        return key, [alg]
    raise AuthConfigError(
        f"[api] jwt_public_key_file: {path} is not an RSA or EC (P-256) public key in PEM"
    )


class Verifier:
    """Checks bearer tokens against the configured keys."""

    def __init__(self, cfg: ApiConfig) -> None:
        self._keys: list[tuple[object, list[str]]] = []
        if cfg.jwt_public_key_file:
            self._keys.append(_public_key(cfg.jwt_public_key_file))
        if cfg.jwt_secret:
            if len(cfg.jwt_secret.encode()) < MIN_SECRET:
                raise AuthConfigError(
                    f"[api] jwt_secret is shorter than {MIN_SECRET} bytes (HS256 needs 256 bits)"
                )
            self._keys.append((cfg.jwt_secret.encode(), ["HS256"]))
        self._audience = cfg.jwt_audience or None
        self._issuer = cfg.jwt_issuer or None

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    def verify(self, token: str) -> Claims:
        """The token's claims; raise ApiError(401) with the reason kept aside."""
        if not self._keys:
            raise _refused("no JWT key is configured")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused("malformed token") from None
        alg = header.get("alg")
        for key, algorithms in self._keys:
            if alg not in algorithms:
                continue
            try:
                payload = jwt.decode(
                    token,
                    key,  # type: ignore[arg-type]  # a prepared key object or HMAC bytes
                    algorithms=algorithms,
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=LEEWAY,
                    options={
                        "require": ["exp"],
                        "verify_aud": self._audience is not None,
                        "verify_iss": self._issuer is not None,
                    },
                )
            except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as exc:
                raise _refused(type(exc).__name__) from None
            return _claims(payload)
        named = alg if isinstance(alg, str) and alg.lower() in _KNOWN_ALGS else "(unknown)"
        raise _refused(f"algorithm {named} is not accepted")

    def authenticate(self, request: bottle.BaseRequest) -> Claims:
        header = request.get_header("Authorization", "") or ""
        if len(header) > MAX_TOKEN:
            raise _refused("token too long", request)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _refused("no bearer token", request)
        try:
            return self.verify(token.strip())
        except ApiError as exc:
            request.environ[REFUSAL] = exc.reason
            raise


def _refused(reason: str, request: bottle.BaseRequest | None = None) -> ApiError:
    err = ApiError(401, "a valid bearer token is required", reason=reason)
    if request is not None:
        request.environ[REFUSAL] = reason
    return err


def _claims(payload: dict) -> Claims:
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 256:
        raise _refused("the token has no usable sub claim")
    scope = payload.get("scope", "")
    if not isinstance(scope, str):
        raise _refused("the scope claim is not a string")
    return Claims(sub=sub, scopes=frozenset(scope.split()), raw=payload)
