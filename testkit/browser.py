"""A real headless Chromium for the dashboard's tests and measurements, and a
``fedge dashboard`` process.

The browser is Debian's ``chromium`` driven by its ``chromium-driver`` through
selenium (no browser download: ``.ci/run`` installs both with apt). ``page_value``
reads what the page's script exposes as ``window.fedge``.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from testkit import ROOT
from testkit.field import _env
from testkit.timing import scaled

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver", "chromium-driver")


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) if both are installed."""
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER) if p), None)
    return (browser, driver) if browser and driver else None


def headless_chromium(width: int = 1400, height: int = 1000):
    """A selenium WebDriver on a headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium and chromium-driver are not installed (.ci/run "
                           "installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(paths[1]), options=opts)


def start_dashboard(url: str, job: str, work: Path, port: int,
                    extra: list[str] = ()) -> subprocess.Popen:
    """``fedge dashboard`` with the keys of ``testkit.field.fleet_keys`` (work/keys)."""
    log = open(work / "dashboard.log", "ab")
    keys = [] if "--credentials" in extra else [
        "--trust", str(work / "keys" / "server.pub"),
        "--registry", str(work / "keys" / "registry.json")]
    return subprocess.Popen(
        [sys.executable, "-m", "toolkit", "dashboard", "--broker", url, "--job", job,
         "--port", str(port), *keys, *extra],
        stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.time() + scaled(timeout)
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing answered on {url}")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def page_value(driver, expr: str):
    """``expr`` evaluated in the page (e.g. ``fedge.rounds``)."""
    return driver.execute_script(f"return {expr};")


def row_cells(driver, device: str) -> list[str] | None:
    """The fleet table's cells for ``device`` (None: no row)."""
    return driver.execute_script(
        "const tr = document.querySelector(`#fleet tr[data-device='${arguments[0]}']`);"
        "return tr ? [...tr.cells].map(c => c.textContent) : null;", device)
