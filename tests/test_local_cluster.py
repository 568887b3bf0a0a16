"""The CLI's local Ray cluster on a machine that has never run Ray: an empty home folder, no token anywhere."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
    finally:
        assert local.stop(state)
    assert not cluster.is_alive() and os.listdir(state) == ["local-cluster.log"]
