"""The dashboard (corral.ui) over stores made without sandboxes: pages, escaping, headers, the token,
static files, metrics, the evidence packet, the live stream, and page timings over a big store."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

import corral.ui
from corral.store import Store, chain, verify
from corral.store._store import Chained, Tally, stamp
from corral.ui import ListenError, make_app, measure_pages
from corral.ui._fill import synthetic_store
from corral.ui._guard import check_listen
from corral.ui._live import stream
from corral.ui._measure import get

EVIL_CMD = "<script>alert('cmd')</script>"
EVIL_NAME = "\"'><img src=x onerror=alert(1)>.example"


class Writer:
    """Appends hand-made events to a store through its write path, chained as a host chains them."""

    def __init__(self, path: str) -> None:
        self.store = Store.open(path)
        self.signer = chain.Signer(path + ".key")
        self.heads: dict[str, tuple[int, str]] = {}
        self.tallies: dict[str, Tally] = {}
        self.t = datetime.now(UTC) - timedelta(minutes=5)

    def start(self, sid: str, labels: dict[str, str]) -> None:
        self.tallies[sid] = Tally(sid, self.signer.host, os.getpid(), "test", stamp(self.t), labels)
        self.heads[sid] = (0, chain.genesis(sid))
        self.put(
            sid,
            "sandbox.start",
            policy="p.yaml",
            cgroup_version=2,
            uid=60001,
            limits={},
            degraded=[],
            workspace="/w",
            labels=labels,
        )

    def put(self, sid: str, kind: str, **fields: Any) -> int:
        self.t += timedelta(milliseconds=10)
        body = json.dumps(
            {
                "v": 1,
                "time": self.t.isoformat().replace("+00:00", "Z"),
                "sandbox": sid,
                "type": kind,
                **fields,
            },
            separators=(",", ":"),
        )
        seq, prev = self.heads[sid]
        digest = chain.link(prev, body)
        event = Chained(
            sid,
            seq + 1,
            stamp(self.t),
            kind,
            body,
            prev,
            digest,
            category=fields.get("category") or fields.get("layer"),
            severity=fields.get("severity"),
            stop_reason=fields.get("reason"),
        )
        tally = self.tallies[sid].advanced([event], "p.yaml" if kind == "sandbox.start" else None)
        self.store.append([event], {sid: tally}, self.signer, sign=True)
        self.tallies[sid] = tally
        self.heads[sid] = (seq + 1, digest)
        return seq + 1

    def stop(self, sid: str) -> int:
        return self.put(sid, "sandbox.stop", reason="closed", duration=1.0, leftover=[], error="", chain="")


def proc(pid: int, ppid: int, *argv: str) -> dict[str, Any]:
    return {"pid": pid, "ppid": ppid, "cmdline": list(argv), "exe": "/usr/bin/" + argv[0]}


def attack(w: Writer, sid: str, labels: dict[str, str], *, stop: bool = True) -> None:
    """A sandbox whose agent runs a reverse shell with hostile strings everywhere it can put them."""
    w.start(sid, labels)
    w.put(sid, "exec.start", exec=1, command=["bash", "-c", EVIL_CMD])
    w.put(sid, "proc.exec", process=proc(100, 99, "bash", "-c", EVIL_CMD), exec=1)
    w.put(sid, "proc.exec", process=proc(101, 100, "bash", "-i"), exec=1)
    w.put(sid, "dns.query", name=EVIL_NAME, qtype="A", decision="deny", answer=[])
    w.put(
        sid,
        "net.connect",
        destination="203.0.113.10",
        port=4444,
        name=EVIL_NAME,
        protocol="unknown",
        decision="deny",
        reason="not allowed",
        via="transparent",
        process=proc(101, 100, "bash", "-i"),
    )
    w.put(sid, "deny", layer="egress", what="203.0.113.10 port 4444", detail=EVIL_NAME)
    w.put(sid, "resource.sample", cpu=0.5, memory=10 << 20, processes=2)
    w.put(sid, "resource.sample", cpu=1.5, memory=12 << 20, processes=2)
    w.put(
        sid,
        "alert",
        rule="reverse_shell_stdio_socket",
        category="reverse_shell",
        severity="critical",
        action="kill",
        outcome="killed 1 process",
        message=f"shell with its stdio on a socket: {EVIL_CMD}",
        process=proc(101, 100, "bash", "-i"),
        evidence={
            "processes": [proc(101, 100, "bash", "-i"), proc(100, 99, "bash", "-c", EVIL_CMD)],
            "connections": [
                {"destination": "203.0.113.10", "port": 4444, "name": EVIL_NAME, "decision": "deny"}
            ],
            "trigger": {"stdio": ["socket", "socket", "socket"], "cmdline": EVIL_CMD},
            "related": [],
        },
        tags={"mitre": ["T1059.004"], "owasp": ["ASI05"]},
    )
    w.put(sid, "proc.exit", pid=101, exit_code=137, cmdline=["bash", "-i"])
    w.put(sid, "exec.exit", exec=1, exit_code=137, duration=0.5, cpu_seconds=0.1, peak_memory=1 << 20)
    if stop:
        w.stop(sid)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("ui") / "audit.db")
    synthetic_store(path, 12, 1_200)
    w = Writer(path)
    attack(w, "evil0000000a", {"run": "r1", "episode": "1"})
    attack(w, "live0000000b", {"run": "r1", "episode": "2"}, stop=False)
    w.start("nolabel0000c", {})
    w.stop("nolabel0000c")
    w.store.close()
    yield path


@pytest.fixture(scope="module")
def app(store_path: str) -> Any:
    return make_app(store_path, token=None)


def page(app: Any, path: str, status: int = 200, **headers: str) -> str:
    code, _, body = get(app, path, headers)
    assert code == status, (path, code, body[:500])
    return body.decode()


# --------------------------------------------------------------------------------------------------
# Pages


def test_the_public_surface() -> None:
    assert set(corral.ui.__all__) == {"ListenError", "make_app", "measure_pages", "serve"}
    for name in corral.ui.__all__:
        assert hasattr(corral.ui, name)


def test_runs_page_lists_runs_with_verdicts_and_the_unlabelled(app: Any) -> None:
    html = page(app, "/")
    assert 'href="/runs/r1"' in html
    assert 'href="/runs/synthetic-0"' in html
    assert "(no run label)" in html
    r1 = html[html.index('href="/runs/r1"') :].split("</tr>")[0]
    assert "sev-critical" in r1 and "reverse_shell 2" in r1 and "1 running" in r1


def test_run_page_lists_its_sandboxes(app: Any) -> None:
    html = page(app, "/runs/r1")
    assert "/sandboxes/evil0000000a" in html and "/sandboxes/live0000000b" in html
    assert "syn000000000" not in html
    assert "/sandboxes/nolabel0000c" in page(app, "/runs/")
    page(app, "/runs/nope", 404)


def test_sandbox_page_shows_verdict_alert_evidence_tree_denials(app: Any) -> None:
    html = page(app, "/sandboxes/evil0000000a")
    assert 'id="verdict"' in html and 'data-verdict="critical"' in html
    assert "reverse_shell_stdio_socket" in html and "T1059.004" in html and "ASI05" in html
    assert "killed 1 process" in html
    assert "203.0.113.10 port 4444" in html  # the denial
    tree = html[html.index('class="tree"') : html.index('id="timeline-section"')]
    assert re.search(r"100</span> <span class=\"cmd\">bash -c", tree)
    assert "└─ " in tree and "bash -i" in tree and "deny" in tree  # the child and its connection
    assert 'href="/sandboxes/evil0000000a/packet.zip"' in html
    assert 'id="series-data"' in html
    page(app, "/sandboxes/nope", 404)


def test_timeline_pages_by_seq_and_filters_by_type(app: Any) -> None:
    first = page(app, "/sandboxes/syn000000000?after=0")
    rows = re.findall(r'<td class="num">(\d+)</td><td class="time">', first)
    assert rows[0] == "1" and len(rows) == 500
    assert 'href="/sandboxes/syn000000000?after=500"' in first
    second = page(app, "/sandboxes/syn000000000?after=500")
    assert re.findall(r'<td class="num">(\d+)</td><td class="time">', second)[0] == "501"
    # By default the newest page.
    newest = re.findall(r'<td class="num">(\d+)</td><td class="time">', page(app, "/sandboxes/syn000000000"))
    assert newest[-1] == "1200"
    only = page(app, "/sandboxes/syn000000000?type=exec.start&type=alert")
    types = set(re.findall(r'<td class="type">([^<]+)</td>', only))
    assert types == {"exec.start", "alert"}
    assert 'value="exec.start" checked' in only


def test_agent_strings_are_escaped_everywhere(app: Any, store_path: str) -> None:
    for path in ["/sandboxes/evil0000000a", "/sandboxes/evil0000000a?type=dns.query&type=deny&after=0"]:
        html = page(app, path)
        assert "<script>alert" not in html
        assert "<img src=x" not in html
        assert "&lt;script&gt;alert(&#39;cmd&#39;)&lt;/script&gt;" in html
        assert "&#34;&#39;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    # The evidence packet's report too.
    z = zipfile.ZipFile(io.BytesIO(get(app, "/sandboxes/evil0000000a/packet.zip")[2]))
    report = z.read("report.html").decode()
    assert "<script>" not in report and "<img src=x" not in report and "&lt;script&gt;" in report


def test_pages_load_nothing_from_outside(app: Any) -> None:
    for path in ["/", "/runs/r1", "/runs/", "/sandboxes/evil0000000a", "/verify", "/nope"]:
        html = page(app, path, 404 if path == "/nope" else 200)
        for ref in re.findall(r'(?:src|href|action)="([^"]*)"', html):
            assert ref.startswith(("/", "data:")) and not ref.startswith("//"), (path, ref)
        assert "http://" not in html and "https://" not in html, path
        assert "<script>" not in html  # no inline script: the CSP would refuse it
        assert "style=" not in html  # nor inline styles


def test_security_headers(app: Any) -> None:
    for path in ["/", "/sandboxes/evil0000000a", "/static/corral.css", "/metrics", "/nope"]:
        _, headers, _ = get(app, path)
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../etc/passwd",
        "/static/..%2f..%2fetc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/vendor/../../../../../../etc/passwd",
        "/static//etc/passwd",
        "/../etc/passwd",
    ],
)
def test_static_files_never_leave_the_package(app: Any, path: str) -> None:
    code, _, body = get(app, path)
    assert code == 404, (path, code)
    assert b"root:" not in body


def test_static_files_are_served(app: Any) -> None:
    for path in ["/static/corral.css", "/static/sandbox.js", "/static/vendor/uplot/uPlot.iife.min.js"]:
        assert get(app, path)[0] == 200


def test_the_vendored_chart_library_keeps_its_licence() -> None:
    vendor = Path(corral.ui.__file__).parent / "static" / "vendor" / "uplot"
    assert "MIT License" in (vendor / "LICENSE").read_text()


# --------------------------------------------------------------------------------------------------
# The token and where to listen


def test_listen_refuses_a_non_loopback_address_without_a_token() -> None:
    with pytest.raises(ListenError) as e:
        check_listen("0.0.0.0:8765", None)
    assert "--listen 0.0.0.0:8765" in str(e.value) and "--token" in str(e.value)
    assert "CORRAL_UI_TOKEN" in str(e.value)
    assert check_listen("0.0.0.0:8765", "t") == ("0.0.0.0", 8765)
    assert check_listen("127.0.0.1:8765", None) == ("127.0.0.1", 8765)
    assert check_listen("[::1]:9000", None) == ("::1", 9000)
    assert check_listen("localhost:9000", None) == ("localhost", 9000)
    with pytest.raises(ListenError, match="give HOST:PORT"):
        check_listen("8765", None)
    with pytest.raises(ListenError, match="not between 1 and 65535"):
        check_listen("127.0.0.1:70000", None)


def test_serve_refuses_before_opening_anything(tmp_path: Path) -> None:
    with pytest.raises(ListenError, match="--token"):
        corral.ui.serve("10.1.2.3:8765", str(tmp_path / "none.db"), None)


def test_a_token_is_required_of_every_request(store_path: str) -> None:
    app = make_app(store_path, token="s3cret")
    for path in ["/", "/sandboxes/evil0000000a", "/metrics", "/static/corral.css", "/sandboxes/x/live"]:
        code, headers, body = get(app, path)
        assert code == 401, path
        assert b"s3cret" not in body
        assert headers["x-content-type-options"] == "nosniff"
    assert get(app, "/", {"Authorization": "Bearer wrong"})[0] == 401
    assert get(app, "/?token=wrong")[0] == 401
    assert get(app, "/", {"Authorization": "Bearer s3cret"})[0] == 200
    assert get(app, "/metrics", {"Authorization": "bearer s3cret"})[0] == 200
    # ?token= once: a cookie, and a redirect to the page without the token in its address.
    code, headers, _ = get(app, "/runs/r1?token=s3cret&x=1")
    assert code == 303 and headers["location"] == "/runs/r1?x=1"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret" not in cookie
    value = cookie.split(";")[0]
    assert get(app, "/runs/r1", {"Cookie": value})[0] == 200
    assert get(app, "/runs/r1", {"Cookie": value[:-2] + "00"})[0] == 401


def test_no_store_there_is_a_clear_error(tmp_path: Path) -> None:
    from corral import StoreError

    with pytest.raises(StoreError, match="no such file"):
        make_app(str(tmp_path / "missing.db"), token=None)


# --------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_parse_and_match_the_store(app: Any, store_path: str) -> None:
    code, headers, body = get(app, "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("corral_sandboxes_total", ())] == 15
    assert samples[("corral_sandboxes_running", ())] == 1
    with Store.open(store_path) as store:
        assert samples[("corral_events_total", ())] == store.last_cursor()
        assert samples[("corral_commands_total", ())] == store.type_count("exec.start")
    alerts = {k: v for k, v in samples.items() if k[0] == "corral_alerts_total"}
    assert alerts[("corral_alerts_total", (("category", "reverse_shell"), ("severity", "critical")))] == 2
    assert alerts[("corral_alerts_total", (("category", "probe"), ("severity", "high")))] == 12
    assert samples[("corral_denials_total", (("layer", "egress"),))] > 2
    assert ("corral_events_per_second", ()) in samples
    # A sandbox runs: the lag is the time since the last commit (minutes ago in this store).
    assert samples[("corral_store_lag_seconds", ())] > 0


# --------------------------------------------------------------------------------------------------
# The evidence packet


def test_evidence_packet_holds_events_proof_verification_report(
    app: Any, store_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_AUDIT_KEY", store_path + ".key")  # the key the store was signed with
    code, headers, body = get(app, "/sandboxes/evil0000000a/packet.zip")
    assert code == 200 and headers["content-type"] == "application/zip"
    assert "evil0000000a" in headers["content-disposition"]
    z = zipfile.ZipFile(io.BytesIO(body))
    assert set(z.namelist()) == {"events.jsonl", "proof.json", "verification.json", "report.html"}
    lines = z.read("events.jsonl").decode().splitlines()
    proof = json.loads(z.read("proof.json"))
    assert len(lines) == len(proof["events"]) == 13
    # The lines are the hashed text: the proof's chain checks from them alone.
    prev = proof["genesis"]
    for line, link in zip(lines, proof["events"], strict=True):
        assert link["prev"] == prev and chain.link(prev, line) == link["hash"]
        prev = link["hash"]
    assert proof["host_chain"]
    result = json.loads(z.read("verification.json"))
    assert result["sandbox"] == "evil0000000a" and result["events"] == 13
    assert result["intact"] and not [f for f in result["findings"] if f["tampered"]], result
    assert "reverse_shell_stdio_socket" in z.read("report.html").decode()


def test_verify_page_checks_the_store(app: Any, store_path: str) -> None:
    html = page(app, "/verify")
    assert "events in 15 sandboxes" in html
    assert "chains intact" in page(app, "/") or "TAMPERED" in page(app, "/")  # the header remembers
    with Store.open(store_path) as store:
        assert verify(store, [chain.Signer(store_path + ".key").public], sandbox="evil0000000a").ok


# --------------------------------------------------------------------------------------------------
# Live


def _collect(store: Store, sandbox: str, after: int, gone_after: int = 10_000) -> list[str]:
    calls = 0

    async def disconnected() -> bool:
        nonlocal calls
        calls += 1
        return calls > gone_after

    async def run() -> list[str]:
        return [m async for m in stream(store, sandbox, after, disconnected)]

    return anyio.run(run)


def test_stream_of_a_stopped_sandbox_ends_after_its_stop(store_path: str) -> None:
    with Store.open(store_path) as store:
        messages = _collect(store, "evil0000000a", 10)
    events = [m for m in messages if m.startswith("id:")]
    assert [m.split("\n")[0] for m in events] == ["id: 11", "id: 12", "id: 13"]
    assert events[-1].split("\n")[1] == "event: stop"
    # Asked after the stop: it says stop at once.
    with Store.open(store_path) as store:
        assert _collect(store, "evil0000000a", 13)[-1] == "event: stop\ndata: {}\n\n"


def test_stream_ends_when_the_client_goes_away(store_path: str) -> None:
    with Store.open(store_path) as store:
        started = time.monotonic()
        messages = _collect(store, "live0000000b", 0, gone_after=3)
    assert time.monotonic() - started < 5
    assert any('"alert"' in m for m in messages)  # the running sandbox's events so far
    assert not any("event: stop" in m for m in messages)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Writer, int]]:
    path = str(tmp_path / "live.db")
    w = Writer(path)
    w.start("runs0000000d", {"run": "live"})
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(make_app(path, token=None), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        yield w, port
    finally:
        srv.should_exit = True
        thread.join(10)
        w.store.close()


def test_live_stream_over_http_sends_new_events_within_a_second(server: tuple[Writer, int]) -> None:
    w, port = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/sandboxes/runs0000000d/live?after=1")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert response.getheader("content-security-policy")
    assert response.readline() == b"retry: 1000\n"
    response.readline()
    put = time.monotonic()
    w.put(
        "runs0000000d",
        "alert",
        rule="r",
        category="probe",
        severity="high",
        action="alert",
        outcome="-",
        message=EVIL_CMD,
    )
    lines = [response.readline() for _ in range(3)]
    assert time.monotonic() - put < 1.0
    assert lines[0] == b"id: 2\n" and lines[1] == b"event: event\n"
    data = json.loads(lines[2].removeprefix(b"data: "))
    assert data["alert"]["message"] == EVIL_CMD and data["type"] == "alert"
    response.readline()
    w.stop("runs0000000d")
    rest = response.read()  # the server ends the stream after the stop
    assert b"event: stop" in rest
    conn.close()


# --------------------------------------------------------------------------------------------------
# Pages over a big store


def test_page_timings_over_a_big_store(tmp_path: Path) -> None:
    """Not a timed assertion: the numbers are printed (the benchmark reports them at 1,000,000 events)."""
    events = int(os.environ.get("CORRAL_UI_TEST_EVENTS", "200000"))
    path = str(tmp_path / "big.db")
    started = time.monotonic()
    synthetic_store(path, 20, events // 20)
    filled = time.monotonic() - started
    timings = measure_pages(path)
    print(f"\n{events} events filled in {filled:.1f}s; page medians (ms): " + json.dumps(timings))
    assert set(timings) == {"runs", "run", "sandbox"}
