"""The status page at / on the admin listener, in a real headless Chromium driven over DevTools (CDP).

Chromium is a system package that tests/system-deps.sh installs when run as root (25 Debian
packages, a 124 MB download).  Where it is not installed (not root, no network, or a distribution
without it) the browser test is skipped, and pytest's summary (`-ra`) prints why: never a silent pass.
"""

import base64
import contextlib
import importlib.resources
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from fastlb import __version__

HERE = Path(__file__).parent
ARTIFACTS = HERE / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1100,760"]
# Every server row of the page as [data-server, data-state], in page order.
ROWS_JS = "[...document.querySelectorAll('tr[data-server]')].map(r => [r.dataset.server, r.dataset.state])"


def find_chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        pytest.skip("chromium is not installed, so the status page is not tried in a browser: "
                    "tests/system-deps.sh installs it as root (a 124 MB download)")
    return path


class Page:
    """One Chromium tab over the DevTools protocol: a command gets its answer; events are skipped."""

    def __init__(self, ws_url: str):
        self.stack = contextlib.ExitStack()  # `with connect(...)`: the form every websockets version takes
        self.ws = self.stack.enter_context(connect(ws_url, max_size=None, open_timeout=10))
        self.ids = itertools.count(1)

    def send(self, method: str, timeout: float = 10.0, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href === " + json.dumps(url))

    def wait_for(self, expression: str, timeout: float = 5.0):
        """Poll a JS expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.eval(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout}s: {expression}")
            time.sleep(0.05)
        return value

    def screenshot(self, *paths: Path) -> None:
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)

    def close(self) -> None:
        self.stack.close()


@pytest.fixture
def browser(tmp_path):
    """yield open(url) -> Page; headless Chromium starts on the first call and stops after the test."""
    profile = tmp_path / "chromium-profile"
    log_path = tmp_path / "chromium.log"
    procs: list[subprocess.Popen] = []
    pages: list[Page] = []

    def open_page(url: str) -> Page:
        if not procs:
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen(
                    [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                     "--remote-debugging-port=0", "about:blank"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                ))
        # --remote-debugging-port=0: Chromium picks a free port and writes it to DevToolsActivePort.
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            assert procs[0].poll() is None, "chromium exited:\n" + log_path.read_text()
            assert time.monotonic() < deadline, "chromium never opened its DevTools port"
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
            target = next(t for t in json.loads(r.read()) if t["type"] == "page")
        page = Page(target["webSocketDebuggerUrl"])
        pages.append(page)
        page.goto(url)
        return page

    yield open_page
    for page in pages:
        page.close()
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any helper process of this browser left over
        except ProcessLookupError:
            pass


def test_status_page_is_self_contained():
    html = (importlib.resources.files("fastlb.obs") / "status.html").read_text(encoding="utf-8")
    assert html.lstrip().startswith("<!DOCTYPE html>")
    # no external script, style sheet, image or font: the admin listener may be on an offline host
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert "@import" not in html and "url(" not in html
    assert len(html.splitlines()) < 200


def test_status_page_shows_servers_live(backends, fastlb, browser, tmp_path):
    find_chromium()  # skip before starting anything when the browser is missing
    b1, b2 = backends("b1", "b2")
    cfg = tmp_path / "status-page.toml"
    cfg.write_text(f"""
[[routes]]
backend = "b"
[backends.b]
servers = ["{b1.address}", "{b2.address}"]
[backends.b.health]
path = "/health"
interval = "200ms"
fall = 1
rise = 1
""")
    lb = fastlb({"FASTLB_WORKERS": "2"}, args=["--config", str(cfg)])
    admin = f"http://{lb.env['FASTLB_ADMIN_LISTEN']}/"
    try:
        with urllib.request.urlopen(admin, timeout=5) as r:
            ctype = r.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        pytest.fail(f"GET {admin} answered {exc.code}: the control process does not serve "
                    "fastlb/obs/status.html at / (yet)", pytrace=False)
    assert ctype == "text/html"

    page = browser(admin)
    page.eval("window.sameDocument = true")  # gone if the page reloads instead of updating itself
    every = [f"b/{b1.address}", f"b/{b2.address}"]
    rows = page.wait_for(f"{ROWS_JS}.length === 2 && {ROWS_JS}.every(r => r[1] === 'up') && {ROWS_JS}")
    assert rows == [[name, "up"] for name in every]
    assert page.eval("document.getElementById('version').textContent") == __version__
    assert not page.eval("document.getElementById('banner').classList.contains('on')")

    b2.set_health(503)
    changed = time.monotonic()
    page.wait_for(f"{ROWS_JS}.some(r => r[0] === 'b/{b2.address}' && r[1] === 'down')", timeout=3.0)
    took = time.monotonic() - changed
    assert page.eval(ROWS_JS) == [[every[0], "up"], [every[1], "down"]]
    assert page.eval("window.sameDocument") is True, "the page reloaded instead of updating in place"
    row = page.eval(f"document.querySelector('tr[data-server=\"b/{b2.address}\"]').innerText")
    assert "status 503" in row, row
    page.wait_for("document.querySelector('tr[data-state=\"down\"] td:last-child').textContent"
                  ".endsWith('ago')")  # the age of the last check renders once the row is redrawn
    page.screenshot(tmp_path / "status-page.png", ARTIFACTS / "status-page.png")
    print(f"down on the page {took:.2f}s after the backend failed; screenshot {ARTIFACTS / 'status-page.png'}")

    lb.stop()  # the admin listener goes away: the page says so instead of showing stale data as live
    page.wait_for("document.getElementById('banner').classList.contains('on')", timeout=5.0)
    assert "disconnected" in page.eval("document.getElementById('banner').textContent")
