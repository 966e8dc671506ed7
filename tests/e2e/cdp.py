"""Headless Chromium driven over the Chrome DevTools Protocol (a websocket of JSON messages): just
what the dashboard test needs: open a page, evaluate JavaScript in it, take a screenshot.

Chromium is Debian's `chromium` package; CI installs it (scripts/run_tests.sh). Where it is absent
outside CI the browser tests skip; in CI they fail instead, so they never pass unseen."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("no Chromium in CI: scripts/run_tests.sh installs Debian's chromium package")
    pytest.skip("no Chromium here (apt-get install chromium)")


class Page:
    """One tab, spoken to over its own websocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:  # events arrive in between: skip them
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60.0) -> Any:
        """The expression's value once truthy (evaluated every 0.1 s until timeout_s)."""
        deadline, error = time.monotonic() + timeout_s, None
        while True:
            try:  # while the page loads, its elements may not exist yet
                value, error = self.evaluate(expression), None
            except RuntimeError as e:
                value, error = None, e
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout_s} s: {expression} ({error})")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))


@contextlib.contextmanager
def open_page(url: str, profile: Path, width: int = 1280, height: int = 900) -> Iterator[Page]:
    """Chromium (headless, its own profile) showing url; closed after."""
    argv = [find_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
            "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = _endpoint(proc)
        # Keep reading its log so a full pipe never stalls the browser.
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # type: ignore[union-attr]
        http = endpoint.replace("ws://", "http://").split("/devtools/")[0]
        target = httpx.put(f"{http}/json/new?{url}", timeout=30).json()
        with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            yield Page(ws)
    finally:
        proc.kill()
        proc.wait()


def _endpoint(proc: subprocess.Popen[str]) -> str:
    """The browser's DevTools websocket, from the line Chromium prints on start."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        found = LISTENING.search(line)
        if found:
            return found[1]
    raise AssertionError(f"Chromium exited before listening: {''.join(seen)[-2000:]}")
