"""Headless Chromium driven over the Chrome DevTools Protocol on a pipe (stdlib only).

Chromium started with ``--remote-debugging-pipe`` reads protocol messages (JSON, each ended by
a NUL byte) on file descriptor 3 and writes its answers and events on descriptor 4; a small
Python trampoline puts the two pipe ends there and execs the browser. :func:`render` opens a page at a given
viewport width, waits for its load event and returns what a person would see: the images and
whether they loaded, the page's scroll width, the console errors and a PNG screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of the first Chromium found on PATH (None: none installed)."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()
NO_BROWSER = ("no headless Chromium on PATH (looked for " + ", ".join(BINARIES) + "); "
              "`apt-get install chromium-headless-shell` enables this test")
"""The browser the rendering tests use, and why they are skipped without one."""


class DevTools:
    """One headless Chromium process and a protocol session with one page."""

    def __init__(self, binary: str, timeout: float = 60.0):
        self.timeout, self.events, self._next_id, self._buffer = timeout, [], 0, b""
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # copies above 10, so that moving them to 3 and 4 never overwrites one with the other
        read_end, write_end = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._profile = tempfile.mkdtemp(prefix="mrvi_chromium_")
        arguments = ["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--no-default-browser-check", "--hide-scrollbars", f"--user-data-dir={self._profile}"]
        trampoline = (f"import os, sys; os.dup2({read_end}, 3); os.dup2({write_end}, 4); "
                      f"os.close({read_end}); os.close({write_end}); os.execv(sys.argv[1], sys.argv[1:])")
        self.process = subprocess.Popen([sys.executable, "-c", trampoline, binary, *arguments],
                                        pass_fds=(read_end, write_end), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(read_end)
        os.close(write_end)
        self._send_fd, self._receive_fd = to_browser_w, from_browser_r
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def _message(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._receive_fd], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._receive_fd, 1 << 20)
            if not chunk:
                raise ConnectionError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, *, session: bool = False) -> dict:
        """Send one command and return its result (events seen meanwhile go to :attr:`events`)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._message()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, event: str) -> dict:
        """The first event named ``event`` (already received or next to come)."""
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        while True:
            message = self._message()
            self.events.append(message)
            if message.get("method") == event:
                return message

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (ConnectionError, TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._send_fd, self._receive_fd):
            os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)


PAGE_STATE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
  scrollWidth: document.documentElement.scrollWidth,
  innerWidth: window.innerWidth,
})"""


def render(binary: str, page: Path, screenshot: Path, width: int = 1280, height: int = 900) -> dict:
    """Open ``page`` at a ``width`` x ``height`` viewport; return ``images`` (alt, complete,
    natural width), ``scrollWidth``, ``innerWidth`` and ``console_errors``, and write a
    full-page PNG to ``screenshot``."""
    browser = DevTools(binary)
    try:
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session=True)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)
        browser.call("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=True)
        browser.wait_for("Page.loadEventFired")
        state = json.loads(browser.call("Runtime.evaluate", {"expression": PAGE_STATE, "returnByValue": True},
                                        session=True)["result"]["value"])
        shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                            session=True)
        Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        errors = []
        for event in browser.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif event.get("method") == "Runtime.exceptionThrown":
                errors.append(params.get("exceptionDetails", {}).get("text", "exception"))
            elif event.get("method") == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", ""))
        state["console_errors"] = errors
        return state
    finally:
        browser.close()
