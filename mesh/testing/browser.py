"""Debian's headless Chromium driven by selenium through Debian's chromedriver, for the dashboard's browser tests
(with and without the lab). Both come from `scripts/setup --test`; a missing one fails the test, never skips it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# No background networking, updates or sync: this machine's closed network refuses Chromium's own connections.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1366,768")


class BrowserMissing(AssertionError):
    """Chromium or chromedriver is not installed."""


@contextlib.contextmanager
def headless_chromium(page_load_timeout: float = 30.0) -> Iterator[Any]:
    """A selenium Chrome driver at 1366x768 with a new empty profile (removed afterwards)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            raise BrowserMissing(f"{path} is missing: scripts/setup --test installs Debian's chromium and "
                                 "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mesh-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(page_load_timeout)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
