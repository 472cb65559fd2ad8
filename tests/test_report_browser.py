"""The report in a real headless browser (Debian's chromium), driven over the DevTools protocol: it renders with
no console error, no script runs, nothing is fetched from the network, and every image loads (naturalWidth > 0).
A copy with one broken image shows that the checks see a failure when there is one."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = next((p for p in (os.environ.get("CLIPAUDIT_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser")) if p and os.path.isfile(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium): "
                                                         "the report is not checked in a browser")
websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[test]')")

IMAGES_JS = """JSON.stringify({
  images: Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
  scripts: document.scripts.length,
  text: document.body.innerText,
  title: document.title
})"""


class Chromium:
    """A headless chromium and a DevTools websocket to its one page."""

    def __init__(self, profile: Path) -> None:
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                "--window-size=1280,2000", "about:blank"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        port = self._port(profile / "DevToolsActivePort")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.load(response)
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def _port(self, path: Path) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self.process.returncode}")
            if path.is_file() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port within 30 s")

    def _receive(self) -> dict[str, Any]:
        message = json.loads(self.ws.recv())
        if "method" in message:
            self.events.append(message)
        return message

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a DevTools command and return its result (events that arrive meanwhile are kept)."""
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_for(self, method: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for an event (one already received counts)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events:
                if event["method"] == method:
                    return event
            self._receive()
        raise TimeoutError(f"no {method} within {timeout_s} s")

    def open(self, url: str) -> dict[str, Any]:
        """Load ``url`` and wait for its load event (which waits for every image); returns what the page holds,
        the errors it logged and every URL it requested."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        result = self.call("Runtime.evaluate", expression=IMAGES_JS, returnByValue=True)
        state = json.loads(result["result"]["value"])
        errors = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                errors.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                errors.append(f"exception: {params.get('exceptionDetails')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
                errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Page.javascriptDialogOpening":
                errors.append(f"dialog: {params.get('message')}")
        state["errors"] = errors
        state["requests"] = [e["params"]["request"]["url"] for e in self.events
                             if e["method"] == "Network.requestWillBeSent"]
        return state

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page."""
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield chromium
    finally:
        chromium.close()


def test_report_renders_without_errors_and_every_image_loads(report_run: Path, browser: Chromium,
                                                             tmp_path: Path) -> None:
    index = report_run / "report" / "index.html"
    state = browser.open(index.as_uri())
    assert state["errors"] == []
    assert state["scripts"] == 0
    assert "<script>alert(1)</script>" in state["text"], "the injected caption is shown as text"
    assert state["title"].startswith("clipaudit report")
    images = state["images"]
    assert len(images) > 10
    broken = [src for src, complete, width in images if not complete or width <= 0]
    assert broken == []
    assert state["requests"] and all(url.startswith("file://") for url in state["requests"]), "no network"
    for needle in ("RANDOM MODELS.", "CLIP neighbours", "reference neighbours", "after hflip", "Validation pairs"):
        assert needle in state["text"]
    shot = tmp_path / "report.png"
    browser.screenshot(shot)
    assert shot.stat().st_size > 10_000


def test_the_checks_see_a_broken_image_and_the_page_policy_blocks_scripts(report_run: Path, browser: Chromium,
                                                                         tmp_path: Path) -> None:
    copy = tmp_path / "report"
    shutil.copytree(report_run / "report", copy)
    page = copy / "index.html"
    planted = '<img src="thumbs/not-there.jpg" alt="x"><script>document.title = "script ran"</script>'
    page.write_text(page.read_text().replace("</footer>", planted + "</footer>"))
    state = browser.open(page.as_uri())
    broken = [src for src, complete, width in state["images"] if width <= 0]
    assert broken == ["thumbs/not-there.jpg"]
    assert any("not-there.jpg" in error for error in state["errors"])
    assert state["title"] != "script ran", "the page's Content-Security-Policy allows no script"
    assert any("Content Security Policy" in error for error in state["errors"])
