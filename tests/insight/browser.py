"""A real headless Chromium (Debian's `chromium`) driven over the DevTools protocol.

`open_page(path)` starts chromium with its own profile directory and a DevTools port it
picks itself (read back from DevToolsActivePort), loads the file, and collects every console
error, uncaught exception and failed load (Log/Runtime events) until the load event; the
caller evaluates JavaScript in the page and takes a screenshot. The browser is ended by
its PID and its profile removed, however the test ends.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Page:
    def __init__(self, ws: Any, session: str | None) -> None:
        self.ws, self.session, self._id = ws, session, 0
        self.errors: list[str] = []
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        self._id += 1
        mid = self._id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if self.session is not None:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method is None:
            return
        self.events.append(msg)
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(
                "console: "
                + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.errors.append(
                "exception: " + str(d.get("exception", {}).get("description") or d.get("text"))
            )
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append("log: " + params["entry"]["text"])

    def wait_for(self, method: str, timeout: float = 60) -> dict[str, Any]:
        for msg in self.events:
            if msg.get("method") == method:
                return msg
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self._event(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(f"no {method} within {timeout}s")

    def evaluate(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluate: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        metrics = self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": min(size["height"], 6000),
                    "scale": 1,
                },
            },
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextmanager
def open_page(path: Path, settle: float = 0.5) -> Iterator[Page]:
    profile = Path(tempfile.mkdtemp(prefix="ferry-chromium-"))
    proc = subprocess.Popen(
        [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode} before it listened")
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port within 60s")
            time.sleep(0.1)
        port, ws_path = port_file.read_text().split()[:2]
        with connect(f"ws://127.0.0.1:{port}{ws_path}", max_size=64 * 1024 * 1024) as ws:
            root = Page(ws, None)
            target = root.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = root.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            page = Page(ws, session)
            for domain in ("Page", "Runtime", "Log"):
                page.send(f"{domain}.enable")
            page.send("Page.navigate", {"url": path.resolve().as_uri()})
            page.wait_for("Page.loadEventFired")
            end = time.monotonic() + settle  # late errors (timers) still count
            while time.monotonic() < end:
                try:
                    page._event(json.loads(ws.recv(timeout=max(0.05, end - time.monotonic()))))
                except TimeoutError:
                    break
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
