"""JWT bearer tokens (web/auth.py) against every attack, through the real
server: ApiServer (waitress) on 127.0.0.1, the route contract of
web/context.py, a real site (tests/api_site.py).

Every refusal is the same 401 JSON body with ``WWW-Authenticate: Bearer``;
a valid token without the scope is 403.  HS256 (``JWT_SECRET``), RS256 and
ES256 (``JWT_PUBLIC_KEY_FILE``, keys made here with ``cryptography``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import bottle
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import tools
from api_site import probe_app, serving
from helpers import wait_until
from ith_proxy.config import ApiConfig
from ith_proxy.web import auth
from ith_proxy.web.auth import REFUSAL, AuthConfigError, Verifier
from ith_proxy.web.context import ApiError
from tokens import SECRET, mint
from worker_rooms import Rooms

AUD = "ith-proxy"
ISS = "https://auth.example/realm"
REFUSED = {"error": "a valid bearer token is required"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], payload: Any, key: bytes | None, sig: str = "") -> str:
    """A token made by hand: HMAC-SHA256 over it with ``key`` (any bytes, also
    a PEM public key, which PyJWT refuses to sign with), or ``sig`` as given."""
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if key is not None:
        sig = _b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())
    return f"{signing}.{sig}"


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    body = {"sub": "tester", "iat": now, "exp": now + 3600, "aud": AUD, "iss": ISS}
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


def good(scope: str = "", **over: Any) -> str:
    return mint(scope, **{"aud": AUD, "iss": ISS, **over})


def get(url: str, path: str, token: str | None = None, **headers: str) -> tuple[int, Any, dict]:
    """GET with ``Authorization: Bearer token`` (or the raw ``headers``): status,
    JSON body, headers."""
    import urllib.error
    import urllib.request

    hdrs = dict(headers)
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), _lower(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), _lower(exc.headers)


def _lower(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@pytest.fixture(scope="module")
def hs_site(tmp_path_factory):
    """A site with HS256, aud and iss configured."""
    env = {"JWT_SECRET": SECRET, "JWT_AUDIENCE": AUD, "JWT_ISSUER": ISS}
    rooms = Rooms(tmp_path_factory.mktemp("hs"), env=env)
    with serving(rooms.cfg, probe_app(rooms)) as url:
        yield url
    rooms.close()


def _pem(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def _pk_site(tmp: Path, private, secret: bool = False):
    keyfile = tmp / "jwt.pub.pem"
    keyfile.write_bytes(_pem(private.public_key()))
    env = {"JWT_PUBLIC_KEY_FILE": str(keyfile), "JWT_AUDIENCE": AUD, "JWT_ISSUER": ISS}
    if secret:
        env["JWT_SECRET"] = SECRET
    return Rooms(tmp / "site", env=env), keyfile.read_bytes()


# --------------------------------------------------------------------------
# HS256: what passes, what is refused
# --------------------------------------------------------------------------


def test_a_valid_token_passes_and_names_its_caller(hs_site) -> None:
    status, body, _ = get(hs_site, "/api/probe/whoami/", good("phi:read other"))
    assert (status, body) == (200, {"sub": "tester", "scopes": ["other", "phi:read"]})
    # a token a little past exp or before nbf, within the 30 s leeway, passes
    assert 0 < auth.LEEWAY <= 60  # DESIGN.md: at most 60 s
    now = int(time.time())
    assert get(hs_site, "/api/probe/whoami/", good(exp=now - 10))[0] == 200
    assert get(hs_site, "/api/probe/whoami/", good(nbf=now + 10))[0] == 200


def test_a_valid_token_without_the_scope_is_403(hs_site) -> None:
    assert get(hs_site, "/api/probe/phi/", good("phi:read"))[:2] == (200, {"ok": True})
    for scope in ("", "status:read", "phi:read2", "phi:rea", "PHI:READ"):
        status, body, _ = get(hs_site, "/api/probe/phi/", good(scope))
        assert status == 403, scope
        assert body == {"error": "this token lacks the scope 'phi:read'"}


def _attacks() -> dict[str, dict[str, str]]:
    """name -> the request headers of an attack (HS256 site with aud and iss)."""
    now = int(time.time())
    hs = {"alg": "HS256", "typ": "JWT"}
    wrong_key = "another-secret-0123456789abcdef0123456789abcdef"
    tokens = {
        # alg=none in its spellings, with and without a signature
        "alg none": craft({"alg": "none"}, claims(), None),
        "alg None": craft({"alg": "None"}, claims(), None),
        "alg NONE": craft({"alg": "NONE"}, claims(), None),
        "alg none with a signature": craft({"alg": "none"}, claims(), SECRET.encode()),
        "no alg": craft({"typ": "JWT"}, claims(), SECRET.encode()),
        "alg not a string": craft({"alg": ["HS256"]}, claims(), SECRET.encode()),
        "HS384 with the secret": mint(aud=AUD, iss=ISS, algorithm="HS384"),
        "HS256 signature under an RS256 header": craft({"alg": "RS256"}, claims(), SECRET.encode()),
        "wrong HMAC key": mint(key=wrong_key, aud=AUD, iss=ISS),
        "the secret with a byte changed": mint(key=SECRET[:-1] + "X", aud=AUD, iss=ISS),
        "signature cut off": good().rsplit(".", 1)[0] + ".",
        "payload swapped after signing": ".".join(
            [good().split(".")[0], good(sub="admin").split(".")[1], good().split(".")[2]]
        ),
        "expired": good(exp=now - 120),
        "expired long ago": good(exp=1),
        "nbf in the future": good(nbf=now + 300),
        "no exp": good(exp=None),
        "exp not a number": craft(hs, claims(exp="tomorrow"), SECRET.encode()),
        "exp a list": craft(hs, claims(exp=[now + 3600]), SECRET.encode()),
        "wrong aud": good(aud="another-service"),
        "no aud": good(aud=None),
        "aud in a list of others": good(aud=["other", "more"]),
        "wrong iss": good(iss="https://evil.example/realm"),
        "no iss": good(iss=None),
        "iss only a prefix": good(iss=ISS[:-2]),
        "iss extending the configured one": good(iss=ISS + "/evil"),
        "iss with a trailing space": good(iss=ISS + " "),
        "iss a list": craft(hs, claims(iss=[ISS]), SECRET.encode()),
        "sub missing": good(sub=None),
        "sub not a string": craft(hs, claims(sub=12345), SECRET.encode()),
        "sub empty": good(sub=""),
        "sub too long": good(sub="x" * 300),
        "scope not a string": craft(hs, claims(scope=["phi:read"]), SECRET.encode()),
        "payload not an object": craft(hs, ["sub", "tester"], SECRET.encode()),
    }
    headers = {name: {"Authorization": f"Bearer {tok}"} for name, tok in tokens.items()}
    valid = good("phi:read")
    headers.update(
        {
            "no header": {},
            "empty bearer": {"Authorization": "Bearer "},
            "bearer alone": {"Authorization": "Bearer"},
            "bearer of spaces": {"Authorization": "Bearer      "},
            "Token scheme": {"Authorization": f"Token {valid}"},
            "Basic scheme": {"Authorization": "Basic dGVzdGVyOnBhc3N3b3Jk"},
            "no scheme": {"Authorization": valid},
            "two tokens": {"Authorization": f"Bearer {valid} {valid}"},
            "malformed: one part": {"Authorization": "Bearer abc"},
            "malformed: three empty parts": {"Authorization": "Bearer .."},
            "malformed: not base64": {"Authorization": "Bearer @@@.###.$$$"},
            "malformed: header not JSON": {"Authorization": f"Bearer {_b64(b'{x')}.e30.c2ln"},
            "over-long header": {"Authorization": f"Bearer {valid}" + "A" * 9000},
            "over-long token": {"Authorization": "Bearer " + good(pad="x" * 9000)},
            "token in a cookie": {"Cookie": f"token={valid}; access_token={valid}"},
        }
    )
    return headers


ATTACKS = _attacks()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_is_401(hs_site, name: str) -> None:
    status, body, headers = get(hs_site, "/api/probe/phi/", **ATTACKS[name])
    assert (status, body) == (401, REFUSED), name
    assert headers["www-authenticate"] == "Bearer"
    assert headers["content-type"] == "application/json"


# the reason each attack is refused for (kept for api.log, never sent)
REASONS = {
    "Basic scheme": "no bearer token",
    "HS256 signature under an RS256 header": "algorithm RS256 is not accepted",
    "HS384 with the secret": "algorithm HS384 is not accepted",
    "Token scheme": "no bearer token",
    "alg NONE": "algorithm NONE is not accepted",
    "alg None": "algorithm None is not accepted",
    "alg none": "algorithm none is not accepted",
    "alg none with a signature": "algorithm none is not accepted",
    "alg not a string": "algorithm (unknown) is not accepted",
    "aud in a list of others": "InvalidAudienceError",
    "bearer alone": "no bearer token",
    "bearer of spaces": "no bearer token",
    "empty bearer": "no bearer token",
    "exp a list": "DecodeError",
    "exp not a number": "DecodeError",
    "expired": "ExpiredSignatureError",
    "expired long ago": "ExpiredSignatureError",
    "iss a list": "InvalidIssuerError",
    "iss extending the configured one": "InvalidIssuerError",
    "iss only a prefix": "InvalidIssuerError",
    "iss with a trailing space": "InvalidIssuerError",
    "malformed: header not JSON": "malformed token",
    "malformed: not base64": "malformed token",
    "malformed: one part": "malformed token",
    "malformed: three empty parts": "malformed token",
    "nbf in the future": "ImmatureSignatureError",
    "no alg": "algorithm (unknown) is not accepted",
    "no aud": "MissingRequiredClaimError",
    "no exp": "MissingRequiredClaimError",
    "no header": "no bearer token",
    "no iss": "MissingRequiredClaimError",
    "no scheme": "no bearer token",
    "over-long header": "token too long",
    "over-long token": "token too long",
    "payload not an object": "DecodeError",
    "payload swapped after signing": "InvalidSignatureError",
    "scope not a string": "the scope claim is not a string",
    "signature cut off": "InvalidSignatureError",
    "sub empty": "no usable sub claim",
    "sub missing": "no usable sub claim",
    "sub not a string": "InvalidSubjectError",
    "sub too long": "no usable sub claim",
    "the secret with a byte changed": "InvalidSignatureError",
    "token in a cookie": "no bearer token",
    "two tokens": "malformed token",
    "wrong HMAC key": "InvalidSignatureError",
    "wrong aud": "InvalidAudienceError",
    "wrong iss": "InvalidIssuerError",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_is_refused_for_its_own_reason(name: str) -> None:
    """Each attack fails at the check it attacks, not by accident elsewhere."""
    verifier = Verifier(ApiConfig("127.0.0.1", 0, SECRET, "", AUD, ISS))
    headers = ATTACKS[name]
    environ = {"HTTP_AUTHORIZATION": headers["Authorization"]} if "Authorization" in headers else {}
    request = bottle.BaseRequest(environ)
    with pytest.raises(ApiError) as err:
        verifier.authenticate(request)
    assert err.value.status == 401
    assert REASONS[name] in str(err.value.reason), (name, err.value.reason)
    assert request.environ[REFUSAL] == err.value.reason


def test_every_attack_has_its_reason() -> None:
    assert sorted(REASONS) == sorted(ATTACKS)


@pytest.mark.parametrize("param", ["token", "access_token", "jwt", "bearer"])
def test_a_token_in_the_query_string_is_401(hs_site, param: str) -> None:
    valid = good("phi:read")
    status, body, _ = get(hs_site, f"/api/probe/whoami/?{param}={valid}")
    assert (status, body) == (401, REFUSED)
    # and it does not count even beside a bad header
    status, _, _ = get(hs_site, f"/api/probe/whoami/?{param}={valid}", Authorization="Bearer x")
    assert status == 401


def test_a_refusal_is_logged_with_its_reason_never_the_token(tmp_path, caplog) -> None:
    rooms = Rooms(tmp_path / "site", env={"JWT_SECRET": SECRET})
    expired = mint(exp=int(time.time()) - 600)
    try:
        with (
            serving(rooms.cfg, probe_app(rooms)) as url,
            caplog.at_level(logging.INFO, logger="ith_proxy.api"),
        ):
            assert get(url, f"/api/probe/whoami/?access_token={expired}", expired)[0] == 401
            wait_until(
                lambda: any(" 401 " in r.getMessage() for r in caplog.records), 30, "the 401 line"
            )
    finally:
        rooms.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ith_proxy.api"]
    refused = [line for line in lines if " 401 " in line]
    assert len(refused) == 1, lines
    assert "GET /api/probe/whoami/ 401" in refused[0]
    assert refused[0].endswith("refused=ExpiredSignatureError")
    assert "sub=-" in refused[0]
    for line in lines:
        assert expired not in line and expired.split(".")[1] not in line
        assert "access_token" not in line  # no query string at all


# --------------------------------------------------------------------------
# RS256 and ES256 with JWT_PUBLIC_KEY_FILE; key confusion
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
@pytest.mark.parametrize("with_secret", [False, True], ids=["key only", "key and secret"])
def test_public_key_tokens_and_key_confusion(
    tmp_path, rsa_key, ec_key, kind: str, with_secret: bool
) -> None:
    private = rsa_key if kind == "RS256" else ec_key
    other = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    rooms, pem = _pk_site(tmp_path, private, secret=with_secret)
    try:
        with serving(rooms.cfg, probe_app(rooms)) as url:
            ok = mint("phi:read", key=private, algorithm=kind, aud=AUD, iss=ISS)
            assert get(url, "/api/probe/phi/", ok)[:2] == (200, {"ok": True})
            assert (
                get(url, "/api/probe/phi/", mint(key=private, algorithm=kind, aud=AUD, iss=ISS))[0]
                == 403
            )
            if kind == "RS256":  # signed by the right key, under an algorithm not configured
                family = mint("phi:read", key=private, algorithm="RS512", aud=AUD, iss=ISS)
            else:
                family = craft({"alg": "ES384"}, claims(scope="phi:read"), None, sig="AAAA")
            attacks = {
                # the public key (PEM, and DER) used as an HMAC secret
                "key confusion (PEM)": craft({"alg": "HS256"}, claims(scope="phi:read"), pem),
                "key confusion (PEM, stripped)": craft(
                    {"alg": "HS256"}, claims(scope="phi:read"), pem.strip()
                ),
                "key confusion (DER)": craft(
                    {"alg": "HS256"},
                    claims(scope="phi:read"),
                    private.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    ),
                ),
                "another key": mint("phi:read", key=other, algorithm=kind, aud=AUD, iss=ISS),
                "alg none": craft({"alg": "none"}, claims(scope="phi:read"), None),
                "other algorithm of the family": family,
                "expired": mint("phi:read", key=private, algorithm=kind, aud=AUD, iss=ISS, exp=1),
                "wrong iss": mint("phi:read", key=private, algorithm=kind, aud=AUD, iss=ISS + "x"),
            }
            for name, token in attacks.items():
                assert get(url, "/api/probe/phi/", token)[:2] == (401, REFUSED), name
            if with_secret:  # HS256 still works beside the key, with the secret only
                assert get(url, "/api/probe/phi/", good("phi:read"))[0] == 200
            else:
                assert get(url, "/api/probe/phi/", good("phi:read"))[0] == 401
    finally:
        rooms.close()


def test_no_jwt_key_refuses_every_token(tmp_path) -> None:
    rooms = Rooms(tmp_path / "site")
    try:
        assert not Verifier(rooms.cfg.api).configured
        with serving(rooms.cfg, probe_app(rooms)) as url:
            for token in (mint("phi:read"), craft({"alg": "none"}, claims(), None)):
                assert get(url, "/api/probe/whoami/", token)[:2] == (401, REFUSED)
    finally:
        rooms.close()


# --------------------------------------------------------------------------
# bad JWT settings stop the start, in one line
# --------------------------------------------------------------------------


def _bad_keys(tmp: Path) -> dict[str, tuple[str, str]]:
    """name -> (the key file, what the one line says)."""
    tmp.mkdir(parents=True, exist_ok=True)
    files = {}

    def put(name: str, data: bytes) -> str:
        path = tmp / name
        path.write_bytes(data)
        return str(path)

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    private = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files["missing"] = (str(tmp / "nothing.pem"), "cannot read")
    files["a directory"] = (str(tmp), "cannot read")
    files["not a key"] = (put("junk.pem", b"-----BEGIN PUBLIC KEY-----\nxx\n"), "not an RSA")
    files["empty"] = (put("empty.pem", b""), "not an RSA")
    files["a private key"] = (put("private.pem", private), "not an RSA")
    files["RSA 1024"] = (put("small.pem", _pem(small.public_key())), "shorter than 2048")
    files["EC P-384"] = (put("p384.pem", _pem(p384.public_key())), "(P-256)")
    return files


def test_bad_key_files_are_refused(tmp_path) -> None:
    for name, (path, says) in _bad_keys(tmp_path / "keys").items():
        rooms_cfg = Rooms(tmp_path / name.replace(" ", "-"), env={"JWT_PUBLIC_KEY_FILE": path})
        try:
            with pytest.raises(AuthConfigError) as err:
                Verifier(rooms_cfg.cfg.api)
        finally:
            rooms_cfg.close()
        assert says in str(err.value) and "[api] jwt_public_key_file" in str(err.value), name
    short = Rooms(tmp_path / "short", env={"JWT_SECRET": "too-short-secret"})
    try:
        with pytest.raises(AuthConfigError, match="shorter than 32 bytes") as err:
            Verifier(short.cfg.api)
        assert "too-short-secret" not in str(err.value)
    finally:
        short.close()


@pytest.mark.parametrize("name", ["missing", "not a key"])
def test_run_stops_on_a_bad_key_file_in_one_line(tmp_path, name: str) -> None:
    path, says = _bad_keys(tmp_path / "keys")[name]
    err = tools.refused_start(tmp_path / "p", env={"JWT_PUBLIC_KEY_FILE": path})
    assert "jwt_public_key_file" in err and says in err
    assert not (tmp_path / "p" / "spool").exists()  # refused before anything was made
