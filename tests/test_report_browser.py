"""The HTML report opens in headless Chromium without console errors, and a full-page screenshot is taken.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated JSON on
file descriptors 3 and 4), so no websocket client and no network port are needed. Collected as errors:
console.error/assert calls, uncaught exceptions, and browser log entries of level error (failed resource
loads, Content-Security-Policy violations -- the report's CSP forbids any remote asset or script).

Needs Debian's ``chromium`` package (``apt-get install -y chromium``); skipped with that message otherwise.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install -y chromium")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-pipe"]


class DevTools:
    """Minimal DevTools-protocol client over Chromium's debugging pipe; keeps every event it sees."""

    def __init__(self, user_data_dir: Path, timeout: float = 60.0):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds():  # Chromium reads commands on fd 3 and writes replies on fd 4
            r, w = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.timeout, self.events, self._buffer, self._id = timeout, [], b"", 0

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        while True:
            message = self._next(deadline)
            self.events.append(message)
            if message.get("method") == event:
                return message

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def console_errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
    return errors


def open_page(html: Path, tmp_path: Path, width: int = 1280) -> tuple[list[str], bytes, dict]:
    """Load a file in headless Chromium; returns (errors, full-page PNG screenshot, page facts)."""
    browser = DevTools(tmp_path / "chromium-profile")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.call("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        facts = browser.call("Runtime.evaluate", {"returnByValue": True, "expression": """({
            images: document.images.length,
            broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length,
            title: document.title, h2: [...document.querySelectorAll('h2')].map(h => h.textContent.trim()),
            width: document.documentElement.scrollWidth})"""}, session=session)["result"]["value"]
        height = browser.call("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"]
        shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                       "clip": {"x": 0, "y": 0, "width": width,
                                                                "height": min(height, 16000), "scale": 1}},
                            session=session)
        return console_errors(browser.events), base64.b64decode(shot["data"]), facts
    finally:
        browser.close()


def test_devtools_client_sees_console_errors_and_blocked_remote_assets(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
                    "img-src data:; script-src 'unsafe-inline'\"><img src='http://127.0.0.1:9/x.png'>"
                    "<script>console.error('boom')</script>")
    errors, _, _ = open_page(page, tmp_path, width=400)
    assert any("boom" in e for e in errors) and any("Content Security Policy" in e for e in errors), errors


def test_report_opens_without_console_errors_and_screenshots(tmp_path):
    from test_reports import write_store  # the same synthetic grid as tests/test_reports.py

    from reports.frame import load
    from reports.render import write_report

    uri, _ = write_store(tmp_path / "store", template=None)
    out = tmp_path / "report"
    write_report(load(uri), out, pdf=False, n_boot=200)
    errors, png, facts = open_page(out / "index.html", tmp_path)
    assert errors == []
    assert facts["images"] > 10 and facts["broken"] == 0
    assert facts["width"] <= 1280  # no horizontal overflow at a laptop width
    assert facts["h2"][-4:] == ["Claims", "Row vs paper", "Failed cells", "Provenance"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    (out / "screenshot.png").write_bytes(png)  # kept beside the report for a person to look at
