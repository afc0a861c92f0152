"""Headless Chromium for scripts/ui_check.py: a page's DOM as visible text, screenshots, and
a page driven over the DevTools protocol (tabs clicked, the DOM read once it settles)."""

from __future__ import annotations

import base64
import contextlib
import html.parser
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from ui_servers import free_port

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--run-all-compositor-stages-before-draw",  # else the DOM is dumped before charts draw
]


class PageText(html.parser.HTMLParser):
    """The visible text of a DOM, one string per text node, the sources of its images and the
    targets of its links."""

    def __init__(self):
        super().__init__()
        self.text, self.images, self.links, self._skip = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")
        if tag == "a":
            self.links.append(dict(attrs).get("href") or "")
        if tag == "img":
            attrs = dict(attrs)
            self.images.append((attrs.get("alt") or "", attrs.get("src") or ""))

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.text.append(data.strip())


def chromium(url: str, *args: str, size: str = "1400,900") -> str:
    """Run headless Chromium on `url` with a fresh profile; returns its stdout."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS]
        cmd += [f"--user-data-dir={profile}", f"--window-size={size}"]
        cmd += ["--virtual-time-budget=20000", *args, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed on {url}: {proc.stderr[-2000:]}")
    return proc.stdout


def render(url: str, size: str = "1400,900") -> PageText:
    """The page at `url` as Chromium renders it (its DOM after 20 s of virtual time) in a
    window of `size` (charts below the window are not drawn)."""
    page = PageText()
    page.feed(chromium(url, "--dump-dom", size=size))
    return page


def screenshot(url: str, path: Path, size: str = "1400,900") -> None:
    chromium(url, f"--screenshot={path}", size=size)


@contextlib.contextmanager
def devtools(size: str):
    """Headless Chromium with a fresh profile, driven over the DevTools protocol; yields
    `send(method, **params)`, which returns the command's result."""
    from websockets.sync.client import connect  # a dependency of Prefect's

    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS]
        cmd += [f"--user-data-dir={profile}", f"--window-size={size}"]
        cmd += [f"--remote-debugging-port={port}", "about:blank"]
        browser = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            targets = json.loads(_get(f"http://127.0.0.1:{port}/json/list", 120))
            (page,) = [t for t in targets if t["type"] == "page"]
            with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                ids = itertools.count()

                def send(method: str, **params):
                    i = next(ids)
                    ws.send(json.dumps({"id": i, "method": method, "params": params}))
                    while (answer := json.loads(ws.recv(timeout=180))).get("id") != i:
                        pass  # an event
                    if "error" in answer:
                        raise RuntimeError(f"chromium: {method}: {answer['error']}")
                    return answer["result"]

                yield send
        finally:
            browser.kill()
            browser.wait()


def _get(url: str, timeout: float) -> bytes:
    """GET `url`, retried until it answers or `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def settled_dom(send, timeout: float = 120) -> str:
    """The page's DOM once its text has not changed for 5 s (the app fetched and drew)."""
    text, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline and time.monotonic() - since < 5:
        time.sleep(0.5)
        now = evaluate(send, "document.body?.innerText")
        if now != text:
            text, since = now, time.monotonic()
    return evaluate(send, "document.documentElement.outerHTML")


def evaluate(send, expression: str):
    """The value of a JavaScript expression in the page."""
    return send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get(
        "value"
    )


def render_tabs(url: str, tabs: list[str], shot: Path | None, size: str) -> dict[str, PageText]:
    """The Prefect UI page at `url` with each of `tabs` (element ids) clicked in turn (a
    `?tab=` in the URL is dropped while the run loads): tab -> the page it shows. `shot`: a
    screenshot of the page as it opens, before any click."""
    pages = {}
    with devtools(size) as send:
        send("Page.navigate", url=url)
        deadline = time.monotonic() + 120  # the tabs are drawn once the run has loaded
        while not evaluate(send, f"!!document.getElementById({json.dumps(tabs[0])})"):
            if time.monotonic() > deadline:
                break  # the checks say what is missing
            time.sleep(0.5)
        settled_dom(send)
        if shot:
            png = send("Page.captureScreenshot", format="png")["data"]
            shot.write_bytes(base64.b64decode(png))
        for tab in tabs:
            evaluate(send, f"document.getElementById({json.dumps(tab)})?.click()")
            pages[tab] = PageText()
            pages[tab].feed(settled_dom(send))
    return pages
