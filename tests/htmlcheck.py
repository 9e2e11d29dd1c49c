"""Checks shared by the report and comparison tests: numbers against JSON, headless Chromium rendering."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from medclf.reporting.html import fmt

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
# CI (.ci/run) installs Chromium and sets MEDCLF_REQUIRE_CHROMIUM=1: there a missing browser fails the page tests
REQUIRED = bool(os.environ.get("MEDCLF_REQUIRE_CHROMIUM"))
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not REQUIRED,
                                    reason="headless Chromium not installed (Debian: apt-get install chromium)")

# writes, once every image has loaded, each <img>'s decoded size into the DOM that --dump-dom prints
PROBE = """<script>window.addEventListener('load', function () {
  var out = Array.prototype.map.call(document.images, function (i) { return [i.complete, i.naturalWidth, i.naturalHeight]; });
  document.body.setAttribute('data-probe', JSON.stringify(out));
});</script>"""


class _Numbers(HTMLParser):
    """Collects (data-key, data-value, shown text) of every <span class="num" data-key=...>."""

    def __init__(self):
        super().__init__()
        self.found, self._open, self.images, self.attrs = [], None, [], {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "data-key" in attrs:
            self._open = [json.loads(attrs["data-key"]), json.loads(attrs["data-value"]), ""]
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "body":
            self.attrs = attrs

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.found.append(tuple(self._open))
            self._open = None


def parse(text: str) -> _Numbers:
    parser = _Numbers()
    parser.feed(text)
    return parser


def lookup(document, path):
    for part in path:
        document = document[part]
    return document


def check_numbers(text: str, document: dict) -> int:
    """Every keyed number equals the JSON value at its path and is shown as that value. Returns the count."""
    numbers = parse(text).found
    for key, value, shown in numbers:
        expected = lookup(document, key)
        assert value == expected, (key, value, expected)
        digits = 0 if isinstance(expected, int) and not isinstance(expected, bool) else 3
        assert shown == fmt(expected, digits), (key, shown, expected)
    return len(numbers)


def assert_self_contained(text: str) -> None:
    images = parse(text).images
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "page refers to the network"


def render(page: Path, tmp: Path) -> tuple[str, list]:
    """Open a copy of the page (with the probe script) in headless Chromium; (dumped DOM, image sizes)."""
    assert CHROMIUM is not None, "headless Chromium is required here (MEDCLF_REQUIRE_CHROMIUM is set) but not installed"
    copy = tmp / f"probe-{page.name}"
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'chromium'}",
           "--window-size=1280,2000", "--virtual-time-budget=10000", "--dump-dom", copy.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    probe = parse(dom).attrs.get("data-probe")
    assert probe, "the page's load event never fired"
    return dom, json.loads(probe)


class _Elements(HTMLParser):
    """Every element's tag and attributes."""

    def __init__(self):
        super().__init__()
        self.elements = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def injected(text: str) -> list:
    """Elements a page should never contain: scripts, event-handler attributes, images not inlined."""
    parser = _Elements()
    parser.feed(text)
    return [(tag, attrs) for tag, attrs in parser.elements
            if tag == "script" or any(name.startswith("on") for name in attrs)
            or (tag == "img" and not attrs.get("src", "").startswith("data:image/png;base64,"))]
