"""The API's errors, its api.log and its resistance to slow clients, through
the real server (ApiServer: waitress, the access log, the JSON errors) on
127.0.0.1 and, end to end, a real ``run``.

- every error is JSON: 400 (field named), 404, 405, 413 (Content-Length,
  chunked, and under Bottle alone), 431, a malformed request, 500 (no
  traceback, no message);
- one api.log line per request, no query string, no token, a path that
  cannot forge a line; anonymous refusals rate-limited;
- idle and slow clients hold connections, not threads; channel_timeout
  frees the connections they hold.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import tools
from api_site import PHI, as_json, probe_app, raw_request, serving
from helpers import wait_until
from ith_proxy.web.access import BURST, RefusalLimiter, clean
from ith_proxy.web.app import READ_LIMIT, ApiServer
from ith_proxy.web.context import MAX_BODY
from tokens import ENV, mint
from worker_rooms import Rooms

TOO_LARGE = {"error": f"the request body is larger than {MAX_BODY} bytes"}
LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<method>\S+) (?P<path>\S+) "
    r"(?P<status>\d{3}) (?P<ms>\d+\.\d)ms sub=(?P<sub>\S+) rid=(?P<rid>\S+)"
    r"(?: refused=(?P<why>.+))?"
)


@pytest.fixture
def site(tmp_path):
    rooms = Rooms(tmp_path / "site", env=ENV)
    yield rooms
    rooms.close()


@pytest.fixture
def url(site):
    with serving(site.cfg, probe_app(site)) as base:
        yield base


def call(method: str, url: str, body: bytes | None = None, token: str | None = None, **hdrs):
    headers = dict(hdrs)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def api_lines(caplog) -> list[str]:
    """The request lines (and rate-limit summaries) in ``ith_proxy.api``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ith_proxy.api" and "in an API request" not in r.getMessage()
    ]


# --------------------------------------------------------------------------
# JSON errors
# --------------------------------------------------------------------------


def test_404_and_405_are_json(url) -> None:
    token = mint()
    for path in ("/nothing", "/api/", "/api/probe/whoami", "/api/health/x/", "/%00%ff"):
        for tok in (None, token):
            status, headers, body = call("GET", url + path, token=tok)
            assert (status, as_json(body)) == (404, {"error": "not found"}), path
            assert headers["content-type"] == "application/json"
    status, headers, body = call("POST", url + "/api/health/", b"{}")
    assert (status, as_json(body)) == (405, {"error": "method not allowed"})
    assert headers["content-type"] == "application/json" and "GET" in headers["allow"]
    status, _, body = call("DELETE", url + "/api/probe/whoami/", token=token)
    assert (status, as_json(body)) == (405, {"error": "method not allowed"})


def test_400_names_the_field(url) -> None:
    token = mint()
    for body in (b"", b"{", b"\xff\xfe", b"[1, 2", b"nul"):
        status, headers, answer = call("POST", url + "/api/probe/echo/", body, token)
        assert status == 400, body
        assert as_json(answer) == {"error": "the request body is not valid JSON", "field": "body"}
        assert headers["content-type"] == "application/json"
    status, _, answer = call("POST", url + "/api/probe/echo/", b"[1, 2]", token)
    assert (status, as_json(answer)) == (
        400,
        {"error": "the request body must be a JSON object", "field": "body"},
    )


def test_413_over_one_megabyte_whatever_the_framing(url) -> None:
    token = mint()
    auth = f"Authorization: Bearer {token}\r\n"
    exact = b'{"a": "' + b"x" * (MAX_BODY - 9) + b'"}'
    assert len(exact) == MAX_BODY
    status, _, body = call("POST", url + "/api/probe/echo/", exact, token)
    assert status == 200 and as_json(body) == json.loads(exact)
    # just over: read whole by waitress, refused by context.json_body
    status, headers, body = call("POST", url + "/api/probe/echo/", exact + b" ", token)
    assert (status, as_json(body)) == (413, TOO_LARGE)
    assert headers["content-type"] == "application/json"
    # far over, announced: refused by waitress before it reads the body (JSON too)
    head = (
        f"POST /api/probe/echo/ HTTP/1.1\r\nHost: x\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {50 * MAX_BODY}\r\n\r\n"
    )
    status, headers, body = raw_request(url, head.encode() + b"{" * 1000)
    assert (status, as_json(body)) == (413, TOO_LARGE)
    assert headers["content-type"] == "application/json"
    # chunked (no Content-Length): over the limit, and far over it
    for size in (MAX_BODY + 10, 8 * MAX_BODY):
        chunk = b"x" * 65536
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(size // 65536 + 1))
        head = (
            f"POST /api/probe/echo/ HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
        )
        status, headers, body = raw_request(url, head.encode() + chunks + b"0\r\n\r\n")
        assert (status, as_json(body)) == (413, TOO_LARGE), size
    # a small chunked body is read as any other
    head = f"POST /api/probe/echo/ HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
    status, _, body = raw_request(url, head.encode() + b'8\r\n{"a": 1}\r\n0\r\n\r\n')
    assert (status, as_json(body)) == (200, {"a": 1})


class _Endless(io.RawIOBase):
    """A chunked request body that never ends; counts what was read of it."""

    def __init__(self) -> None:
        self.read_bytes = 0
        self._frame = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        n = 65536 if n is None or n < 0 else n
        out = bytearray()
        while len(out) < n:
            take = self._frame[self._pos : self._pos + n - len(out)]
            out += take
            self._pos = (self._pos + len(take)) % len(self._frame)
        self.read_bytes += len(out)
        return bytes(out)


def test_413_under_bottle_alone_reads_no_more_than_the_limit(site) -> None:
    """Without waitress in front (which de-chunks and bounds every body),
    Bottle's request.body would read a chunked body whole; json_body stops
    at the limit."""
    app = probe_app(site)
    stream = _Endless()
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/probe/echo/",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": stream,
        "wsgi.errors": io.StringIO(),
        "HTTP_TRANSFER_ENCODING": "chunked",
        "HTTP_AUTHORIZATION": f"Bearer {mint()}",
    }
    answer: list[str] = []
    body = b"".join(app(environ, lambda status, headers, exc=None: answer.append(status)))
    assert answer == ["413 Request Entity Too Large"] and json.loads(body) == TOO_LARGE
    assert MAX_BODY < stream.read_bytes < MAX_BODY + 3 * 65536


def test_500_has_no_traceback_nor_message(url) -> None:
    status, headers, body = call("GET", url + "/api/probe/boom/", token=mint())
    assert (status, as_json(body)) == (500, {"error": "internal error"})
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])  # to quote to an operator
    assert headers["content-type"] == "application/json"
    assert PHI.encode() not in body and b"Traceback" not in body


def test_waitress_own_refusals_are_json(url, caplog) -> None:
    big = "X-Pad: " + "a" * 70000
    with caplog.at_level(logging.INFO, logger="ith_proxy.api"):
        # a request line waitress cannot parse
        status, headers, body = raw_request(url, b"GET /api/health/ HTTP/1.1\r\nHost x\r\n\r\n")
        assert status == 400 and as_json(body) == {"error": "bad request"}
        assert headers["content-type"] == "application/json"
        # headers over the limit
        status, headers, body = raw_request(
            url, f"GET /api/health/ HTTP/1.1\r\nHost: x\r\n{big}\r\n\r\n".encode()
        )
        assert status == 431 and as_json(body) == {"error": "the request headers are too large"}
        # waitress's thread may log a refusal after the answer went out: wait for both lines
        wait_until(lambda: len(api_lines(caplog)) >= 2, 30, "the 400 and 431 lines")
    lines = [LINE.fullmatch(text) for text in api_lines(caplog)]
    assert all(lines), api_lines(caplog)
    assert sorted((m["status"], m["sub"], m["why"]) for m in lines if m) == [
        ("400", "-", "refused by waitress"),
        ("431", "-", "refused by waitress"),
    ]
    # an unknown transfer encoding
    status, _, body = raw_request(
        url, b"POST /api/probe/echo/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
    )
    assert status == 501 and set(as_json(body)) == {"error"}


# --------------------------------------------------------------------------
# api.log
# --------------------------------------------------------------------------


def test_one_line_per_request_without_query_token_or_forged_lines(url, caplog) -> None:
    token = mint("phi:read", sub="backend")
    with caplog.at_level(logging.INFO, logger="ith_proxy.api"):
        call("GET", url + f"/api/probe/whoami/?patient={PHI}&token={token}", token=token)
        call("GET", url + "/api/health/?x=1")
        call("GET", url + "/api/probe/phi/", token=mint())  # 403
        call("GET", url + "/api/probe/x%0A2026-01-01T00:00:00.000Z%20GET%20/forged%20200/")
        call("GET", url + "/api/probe/boom/", token=token)
        wait_until(lambda: len(api_lines(caplog)) >= 5, 30, "five api.log lines")
    lines = api_lines(caplog)
    assert len(lines) == 5, lines
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    got = {(m["method"], m["path"], m["status"], m["sub"]) for m in parsed}
    assert got == {
        ("GET", "/api/probe/whoami/", "200", "backend"),
        ("GET", "/api/health/", "200", "-"),
        ("GET", "/api/probe/phi/", "403", "tester"),
        ("GET", "/api/probe/x\\n2026-01-01T00:00:00.000Z%20GET%20/forged%20200/", "404", "-"),
        ("GET", "/api/probe/boom/", "500", "backend"),
    }
    for m in parsed:
        assert re.fullmatch(r"[0-9a-f]{32}", m["rid"]), m["rid"]
    assert len({m["rid"] for m in parsed}) == 5
    text = "\n".join(lines)
    assert PHI not in text and "patient" not in text and token.split(".")[1] not in text
    assert "\n" not in "".join(lines)


def test_clean_escapes_and_cuts() -> None:
    assert clean("/a b\tc\x00\u00e9\u2028") == "/a%20b\\tc\\x00\\xe9\\u2028"
    assert clean("x" * 250) == "x" * 200 + "...(+50)"


def test_the_refusal_limiter_counts_what_it_leaves_out() -> None:
    now = [1000.0]
    limiter = RefusalLimiter(burst=3, window=60, clock=lambda: now[0])
    assert [limiter.admit(401) for _ in range(3)] == [(True, None)] * 3
    assert [limiter.admit(code) for code in (401, 401, 404)] == [(False, None)] * 3
    now[0] += 61
    admitted, summary = limiter.admit(401)
    assert admitted and summary is not None
    assert summary.startswith("3 more refused requests without a valid token suppressed")
    assert "(401: 2, 404: 1)" in summary
    now[0] += 61  # a quiet window: nothing to say
    assert limiter.admit(401) == (True, None)


class _Counting(RefusalLimiter):
    """A limiter that counts the refusals it was asked about."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.asked = 0
        self._count_lock = threading.Lock()

    def admit(self, status: int) -> tuple[bool, str | None]:
        answer = super().admit(status)
        with self._count_lock:
            self.asked += 1
        return answer


def test_an_unauthenticated_flood_writes_a_bounded_number_of_lines(site, caplog) -> None:
    now = [0.0]
    limiter = _Counting(clock=lambda: now[0])
    bad = mint(key="wrong-secret-0123456789abcdef0123456789abcdef")
    with (
        serving(site.cfg, probe_app(site), limiter) as base,
        caplog.at_level(logging.INFO, logger="ith_proxy.api"),
    ):
        for i in range(BURST * 3):
            assert call("GET", base + "/api/probe/whoami/", token=bad)[0] == 401
            assert call("GET", base + f"/scan/{i}")[0] == 404
        # an authenticated request is always written
        assert call("GET", base + "/api/probe/whoami/", token=mint())[0] == 200
        wait_until(lambda: any(" 200 " in line for line in api_lines(caplog)), 30, "the 200 line")
        # every refusal has been through the limiter (its line is written after the answer)
        wait_until(lambda: limiter.asked == BURST * 6, 30, "all refusals counted")
        lines = api_lines(caplog)
        assert len(lines) == BURST + 1, lines
        # which 20 are written depends on the order the threads finish them
        written_401 = sum("refused=InvalidSignatureError" in line for line in lines)
        written_404 = sum(" /scan/" in line and " 404 " in line for line in lines)
        assert written_401 + written_404 == BURST
        now[0] += 61  # the window ends: the next refusal brings the count
        assert call("GET", base + "/api/probe/whoami/")[0] == 401
        wait_until(lambda: len(api_lines(caplog)) == BURST + 3, 30, "the summary")
    summary = api_lines(caplog)[BURST + 1]
    assert summary.startswith(f"{BURST * 5} more refused requests without a valid token")
    left_401, left_404 = BURST * 3 - written_401, BURST * 3 - written_404
    assert f"(401: {left_401}, 404: {left_404})" in summary
    assert api_lines(caplog)[-1].endswith("refused=no bearer token")


# --------------------------------------------------------------------------
# slow clients
# --------------------------------------------------------------------------


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_idle_and_slow_clients_do_not_starve_the_api(site) -> None:
    held: list[socket.socket] = []
    token = mint()
    with serving(site.cfg, probe_app(site), threads=2, connection_limit=100) as base:
        try:
            for _ in range(15):  # connected, silent
                held.append(_connect(base))
            for _ in range(15):  # half a request line and header block
                s = _connect(base)
                s.sendall(b"GET /api/health/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                held.append(s)
            for _ in range(15):  # a body announced, a few bytes sent
                s = _connect(base)
                s.sendall(
                    b"POST /api/probe/echo/ HTTP/1.1\r\nHost: x\r\n"
                    + f"Authorization: Bearer {token}\r\n".encode()
                    + b"Content-Length: 100000\r\n\r\n{"
                )
                held.append(s)
            for _ in range(10):  # many requests, never reading the answers
                s = _connect(base)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET /api/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
                held.append(s)
            for _ in range(5):  # 45 slow clients against 2 threads; requests still answered
                status, _, body = call("GET", base + "/api/health/")
                assert (status, as_json(body)) == (200, {"status": "ok"})
                status, _, body = call("POST", base + "/api/probe/echo/", b'{"b": 2}', token)
                assert (status, as_json(body)) == (200, {"b": 2})
        finally:
            for s in held:
                s.close()


def test_channel_timeout_frees_the_connections_idle_clients_hold(site) -> None:
    """With every connection taken by idle clients, a request waits in the
    listen backlog until channel_timeout closes them, then is answered."""
    held: list[socket.socket] = []
    with serving(site.cfg, probe_app(site), connection_limit=4, channel_timeout=2) as base:
        try:
            for _ in range(4):
                held.append(_connect(base))
            status, _, body = call("GET", base + "/api/health/")
            assert (status, as_json(body)) == (200, {"status": "ok"})
            for s in held:  # each idle connection was closed by the server
                s.settimeout(30)
                assert s.recv(1) == b""
        finally:
            for s in held:
                s.close()


# --------------------------------------------------------------------------
# end to end: a real `run`
# --------------------------------------------------------------------------


def test_a_real_proxy_logs_each_request_and_warns_without_a_jwt_key(tmp_path: Path) -> None:
    ini = "[api]\nthreads = 2\nchannel_timeout = 10\nconnection_limit = 20\n"
    with tools.ProxyProcess(tmp_path / "p", config_text=ini) as proxy:
        assert tools.http_json("GET", proxy.api_url + "/api/health/?q=" + PHI)[0] in (200, 503)
        status, body = tools.http_json("GET", proxy.api_url + "/api/nothing/", token=mint())
        assert (status, body) == (404, {"error": "not found"})
        api_log = proxy.spool / "logs" / "api.log"
        wait_until(lambda: "/api/nothing/ 404" in api_log.read_text(), 30, "api.log lines")
        main_log = (proxy.spool / "logs" / "main.log").read_text()
    assert "no JWT key is configured" in main_log
    text = api_log.read_text()
    assert PHI not in text and "?q=" not in text
    assert re.search(r" GET /api/health/ (200|503) \d+\.\dms sub=- rid=[0-9a-f]{32}\n", text)


def test_api_settings_are_checked(tmp_path: Path) -> None:
    from ith_proxy import config

    ini = tmp_path / "proxy.ini"
    for key, bad in (("threads", "0"), ("channel_timeout", "0"), ("connection_limit", "x")):
        ini.write_text(f"[api]\n{key} = {bad}\n")
        with pytest.raises(config.ConfigError, match=key):
            config.load(str(ini), env={}, cwd=tmp_path)


def test_api_server_applies_the_settings(site) -> None:
    import dataclasses

    cfg = dataclasses.replace(
        site.cfg.api, bind_address="127.0.0.1", port=0, threads=3, connection_limit=7
    )
    server = ApiServer(cfg, probe_app(site))
    try:
        adj = server.server.adj
        assert (adj.threads, adj.connection_limit, adj.channel_timeout) == (3, 7, 30)
        assert adj.max_request_body_size == READ_LIMIT and not adj.expose_tracebacks
    finally:
        server.stop()
