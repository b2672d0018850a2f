"""GET /metrics: the Prometheus text format (0.0.4), read back by a small
strict parser: every family has one HELP and one TYPE line before its
samples, every name starts with ith_proxy_, label values are escaped, no
series twice.  In-process on a real site, and end to end on a real proxy
that receives instances from DCMTK storescu."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

import dicomgen
import tokens
import tools
from api_read_site import ApiSite
from helpers import wait_until
from ith_proxy import __version__
from ith_proxy.web.metrics import family

NAME = re.compile(r"ith_proxy_[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    out, pos = [], 0
    while pos < len(text):
        m = LABEL.match(text, pos)
        assert m, f"bad labels at {text[pos:]!r}"
        out.append((m.group(1), _unescape(m.group(2))))
        pos = m.end()
        if pos < len(text):
            assert text[pos] == ",", f"bad labels {text!r}"
            pos += 1
    names = [k for k, _ in out]
    assert len(names) == len(set(names)), f"a label twice in {text!r}"
    return tuple(out)


def parse(text: str) -> tuple[Series, dict[str, str]]:
    """Strictly: (every series -> value, every family -> its type)."""
    assert text.endswith("\n") and "\r" not in text
    helps: set[str] = set()
    types: dict[str, str] = {}
    series: Series = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert NAME.fullmatch(name) and help_text and name not in helps, line
            helps.add(name)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert NAME.fullmatch(name) and kind in TYPES and name not in types, line
            assert name in helps, f"TYPE before HELP: {line}"
            types[name] = kind
        else:
            m = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)", line)
            assert m, f"not a sample: {line!r}"
            name, labels, value = m.group(1), _labels(m.group(2) or ""), float(m.group(3))
            assert name in types, f"sample before its TYPE: {line}"
            assert (name, labels) not in series, f"a series twice: {line}"
            series[(name, labels)] = value
    assert set(types) == helps
    return series, types


@pytest.fixture
def site(tmp_path):
    s = ApiSite(tmp_path / "site")
    yield s
    s.close()


def _get(url: str, token: str | None) -> tuple[int, str, str]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_metrics_of_a_site(site: ApiSite) -> None:
    site.studies(2, time.time(), modality="MR")
    old = site.rooms.drop("waiting", b"not yet indexed")
    os.utime(old, (time.time() - 300, time.time() - 300))
    status, ctype, text = _get(site.url + "/metrics", site.token)
    assert status == 200
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    series, types = parse(text)
    assert series[("ith_proxy_info", (("version", __version__),))] == 1
    assert series[("ith_proxy_studies", (("state", "receiving"),))] == 2
    assert series[("ith_proxy_studies", (("state", "failed"),))] == 0
    assert series[("ith_proxy_catalog_instances", ())] == 2
    assert series[("ith_proxy_incoming_files", ())] == 1
    assert 299 <= series[("ith_proxy_indexer_lag_seconds", ())] < 3600
    assert series[("ith_proxy_outbox_entries", (("state", "pending"),))] == 0
    assert series[("ith_proxy_forward_failures", ())] == 0
    assert series[("ith_proxy_disk_free_bytes", ())] > 0
    assert series[("ith_proxy_disk_total_bytes", ())] >= series[("ith_proxy_disk_free_bytes", ())]
    # no service here: the SCP and the link are "unknown", the counters absent
    assert series[("ith_proxy_scp_up", (("state", "unknown"),))] == 1
    assert series[("ith_proxy_link_state", (("state", "unknown"),))] == 1
    assert series[("ith_proxy_link_state", (("state", "connected"),))] == 0
    assert "ith_proxy_instances_received_total" not in types
    assert set(types.values()) == {"gauge"}
    # the indexer takes the file: no lag
    site.rooms.indexer.run_once()
    series, _ = parse(_get(site.url + "/metrics", site.token)[2])
    assert series[("ith_proxy_indexer_lag_seconds", ())] == 0


def test_metrics_need_a_token(site: ApiSite) -> None:
    status, ctype, body = _get(site.url + "/metrics", None)
    assert (status, ctype) == (401, "application/json")
    assert "ith_proxy" not in body
    assert _get(site.url + "/metrics?access_token=" + site.token, None)[0] == 401


def test_label_values_are_escaped() -> None:
    nasty = 'a"b\\c\nd} 1\n# TYPE x counter'
    text = "\n".join(family("x", "gauge", "a help", [({"v": nasty}, 2.5), ({}, 3)])) + "\n"
    series, types = parse(text)
    assert series == {("ith_proxy_x", (("v", nasty),)): 2.5, ("ith_proxy_x", ()): 3}
    assert types == {"ith_proxy_x": "gauge"}


def _proxy_metrics(proxy: tools.ProxyProcess, token: str) -> tuple[Series, dict[str, str]]:
    status, _, text = _get(proxy.api_url + "/metrics", token)
    assert status == 200, text
    return parse(text)


def test_metrics_move_when_instances_arrive_end_to_end(tmp_path: Path) -> None:
    src = dicomgen.make_small_series(tmp_path / "src", 3)
    token = tokens.mint()
    with tools.ProxyProcess(tmp_path / "proxy", env=tokens.ENV) as proxy:
        before, _ = _proxy_metrics(proxy, token)
        assert before[("ith_proxy_catalog_instances", ())] == 0
        sent = tools.storescu(proxy.dicom_port, src.files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(
            lambda: _proxy_metrics(proxy, token)[0][("ith_proxy_catalog_instances", ())] == 3,
            120,
            "3 instances in the metrics",
        )
        after, _ = _proxy_metrics(proxy, token)
    assert (
        after[("ith_proxy_studies", (("state", "receiving"),))]
        + after[("ith_proxy_studies", (("state", "complete"),))]
        == 1
    )
    assert after[("ith_proxy_catalog_bytes", ())] > 0
    assert after[("ith_proxy_incoming_files", ())] == 0


def test_scp_counters_move_when_instances_arrive_end_to_end(tmp_path: Path) -> None:
    """instances and bytes received, associations, the SCP up and the link
    offline: these come from the service's Control."""
    src = dicomgen.make_small_series(tmp_path / "src", 3)
    token = tokens.mint()
    with tools.ProxyProcess(tmp_path / "proxy", env=tokens.ENV) as proxy:
        before, types = _proxy_metrics(proxy, token)
        assert types["ith_proxy_instances_received_total"] == "counter"
        assert types["ith_proxy_bytes_received_total"] == "counter"
        assert before[("ith_proxy_instances_received_total", ())] == 0
        assert before[("ith_proxy_associations", ())] == 0
        assert before[("ith_proxy_scp_up", (("state", "running"),))] == 1
        assert before[("ith_proxy_link_state", (("state", "offline"),))] == 1
        sent = tools.storescu(proxy.dicom_port, src.files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        after = wait_until(
            lambda: (
                (m := _proxy_metrics(proxy, token)[0])[("ith_proxy_instances_received_total", ())]
                == 3
                and m
            ),
            60,
            "3 instances received in the metrics",
        )
    assert isinstance(after, dict)
    assert (
        after[("ith_proxy_bytes_received_total", ())]
        >= sum(f.stat().st_size for f in src.files) * 0.5
    )
