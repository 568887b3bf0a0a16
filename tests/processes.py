"""Stopping the long-running processes tests start in sessions of their own."""

from __future__ import annotations

import os
import signal
import subprocess

from cluster.local import kill_session_leftovers


def stop_session(process: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM the process's session (`ray start --block` takes its Ray processes down with it),
    SIGKILL it if it is still there after `grace_s`."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    kill_session_leftovers(process.pid)
