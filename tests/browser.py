"""Headless Chromium for tests: render a page or a URL, dump its DOM, take a screenshot.

Debian's ``chromium`` package (``.ci/run`` installs it when missing). Tests that need it call
``chromium_or_skip()``, which skips with the reason where no Chromium is installed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chromium_or_skip() -> str:
    """The path of a Chromium binary, or skip the test saying why."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium here (apt-get install chromium; .ci/run does that when it can)")


def _run(url: str, *flags: str, budget_ms: int = 5000, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    binary = chromium_or_skip()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        # --virtual-time-budget: let the page (and a JS app) load and settle before the dump / screenshot.
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--virtual-time-budget={budget_ms}", *flags, url]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(url: str, budget_ms: int = 5000) -> str:
    """The DOM after loading ``url`` (file:// or http://), serialized as HTML."""
    run = _run(url, "--dump-dom", budget_ms=budget_ms)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]
    return run.stdout


def screenshot(url: str, png: Path, size: tuple[int, int] = (1280, 2400), budget_ms: int = 5000) -> Path:
    """A PNG of ``url`` rendered in a window of ``size`` (width, height)."""
    run = _run(url, f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", budget_ms=budget_ms)
    assert run.returncode == 0 and png.is_file(), run.stderr[-2000:]
    return png


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of each element that has an id or data-* attribute path."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = Elements()
    p.feed(html)
    return p.tags


class Tables(HTMLParser):
    """Rows of the table with a given id: per row, its attributes and its cells (attributes, text)."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.depth, self.inside = table_id, 0, False
        self.rows: list[tuple[dict[str, str | None], list[tuple[dict[str, str | None], str]]]] = []
        self.cell: tuple[dict[str, str | None], list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            if self.inside:
                self.depth += 1
            elif a.get("id") == self.table_id:
                self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append((a, []))
        elif self.inside and tag in ("td", "th"):
            self.cell = (a, [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self.inside:
            if self.depth:
                self.depth -= 1
            else:
                self.inside = False
        elif tag in ("td", "th") and self.cell is not None and self.rows:
            self.rows[-1][1].append((self.cell[0], " ".join("".join(self.cell[1]).split())))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell[1].append(data)


def table_rows(html: str, table_id: str) -> list[tuple[dict[str, str | None], list[tuple[dict[str, str | None], str]]]]:
    p = Tables(table_id)
    p.feed(html)
    return p.rows
