"""Headless Chromium for tests that look at a rendered page (the run report).

``ensure_chromium()`` returns the browser, installing Debian's ``chromium`` package with apt when
it is missing (the test set-up; about 30 s here). Where that is impossible (not root, no apt, no
network) the calling test is skipped with the reason. ``screenshot`` and ``dump_dom`` run it
headless against a local file with a fresh profile and nothing that reaches the network.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
INSTALL_TIMEOUT_S = 900
RUN_TIMEOUT_S = 180
LOCK = Path(tempfile.gettempdir()) / "evo-chromium-install.lock"


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


def ensure_chromium() -> str:
    """The path of a chromium binary, installing the Debian package if needed (else skip)."""
    found = find_chromium()
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root "
                    "(run: sudo apt-get install -y chromium)")
    with open(LOCK, "w") as lock:   # two test processes must not run apt at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_chromium()
        if found:
            return found
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT_S)
                if out.returncode != 0:
                    tail = (out.stderr or out.stdout).strip().splitlines()
                    pytest.skip(f"{' '.join(cmd)} failed: {tail[-1] if tail else out.returncode}")
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing chromium took more than {INSTALL_TIMEOUT_S} s")
    found = find_chromium()
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary was found")
    return found


def _run(args: list[str], page: Path) -> subprocess.CompletedProcess:
    chromium = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="evo-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, Path(page).resolve().as_uri()]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                             env=dict(os.environ, HOME=profile))
    if out.returncode != 0:
        raise RuntimeError(f"chromium exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return out


def screenshot(page: Path | str, png: Path | str, size: tuple[int, int] = (1400, 4000)) -> Path:
    """Render ``page`` headless into ``png`` (a window of ``size`` pixels)."""
    png = Path(png).resolve()
    _run([f"--window-size={size[0]},{size[1]}", "--hide-scrollbars", f"--screenshot={png}"], Path(page))
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot at {png}")
    return png


def dump_dom(page: Path | str) -> str:
    """The page's DOM as serialised after load (so after its load handlers ran)."""
    return _run(["--virtual-time-budget=5000", "--dump-dom"], Path(page)).stdout
