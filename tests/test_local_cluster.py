"""The CLI's local Ray cluster on a machine that has never run Ray: an empty home folder, no token anywhere."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster import local


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_a_missing_token_is_created_for_the_user_alone(empty_home):
    path, created = local.ensure_auth_token()
    assert created and path == empty_home / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text()
    assert len(token) >= 32 and token.isalnum()
    assert local.ensure_auth_token() == (path, False) and path.read_text() == token  # an existing token is kept


def test_the_token_goes_where_ray_reads_it(empty_home, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tokens" / "cluster"))
    path, created = local.ensure_auth_token()
    assert created and path == tmp_path / "tokens" / "cluster" and path.is_file()
    assert not (empty_home / ".ray").exists()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 32)  # the token itself: no file to make
    assert local.ensure_auth_token() == (None, False)


@pytest.mark.slow
def test_the_local_cluster_starts_with_an_empty_home(empty_home, tmp_path):
    """`ray start --head` with token authentication does not create a token; the cluster's start must."""
    from ports import free_port

    state = tmp_path / "state"
    cluster = local.start(state, port=free_port(), dashboard_port=free_port())
    try:
        assert cluster.is_alive() and (empty_home / ".ray" / "auth_token").is_file()
        assert local.find(state) == cluster
        # a driver's first connection is what makes Ray start its idle workers: connect one, in a process of its own
        driver = f"from cluster import local; local.connect({cluster.address!r}, True); import time; time.sleep(3)"
        subprocess.run([sys.executable, "-c", driver], check=True, timeout=120)
        assert _settles_quiet(cluster.pid, 40.0), "idle Ray workers or a log monitor are still running"
    finally:
        assert local.stop(state)
    assert not cluster.is_alive() and os.listdir(state) == ["local-cluster.log"]


def _settles_quiet(pid: int, timeout_s: float, quiet_s: float = 5.0) -> bool:
    """Whether the cluster started by `pid` is, for `quiet_s` in a row within `timeout_s`, free of the processes that
    only take CPU from the engine: idle task workers (`ray::IDLE`, started when a driver connects) and the log
    monitor (its copies of the logs go to drivers, which ours do not take)."""
    deadline, quiet_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        names = []
        for process in psutil.Process(pid).children(recursive=True):
            try:
                names.append(" ".join(process.cmdline()))
            except psutil.NoSuchProcess:
                continue
        if any(name.startswith("ray::IDLE") or "log_monitor" in name for name in names):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return True
        time.sleep(0.5)
    return False
