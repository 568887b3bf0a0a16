"""A Ray cluster on this machine whose autoscaler adds and removes nodes: Ray's fake multi-node provider.

Ray's `ray.cluster_utils.AutoscalingCluster` is not usable here: its `start` and `shutdown` run
`ray stop --force`, which stops every Ray cluster on the machine (other people's too), and it, like
the provider type `fake_multinode`, reads `fake_multi_node/example.yaml`, which the Ray 2.60 wheel
does not ship. So this starts the same provider (`FakeMultiNodeProvider`, loaded as an "external"
provider with a complete config) behind a head of its own: `ray start --head --block` on a free
port with its own temp dir. The autoscaler (the head's monitor process) starts each worker node as
a raylet of its own on this machine; stopping the cluster signals the head process and then ends
whatever is left of the processes it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
from ports import free_port, listening
from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
from ray.experimental.internal_kv import _internal_kv_get

_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
_HEAD_TYPE = "ray.head.default"  # the provider's name for the head's node type
_EMPTY_LISTS = (
    "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
    "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
)  # fmt: skip


@dataclass
class AutoscalingCluster:
    address: str  # GCS host:port
    process: subprocess.Popen
    temp_dir: Path

    def worker_nodes(self) -> list[str]:
        """Ids of the alive nodes other than the head."""
        return [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]]

    def autoscaler_report(self) -> dict[str, Any]:
        """The autoscaler's last report (what `ray status` shows): nodes by type, pending launches, and
        `node_activities`, why each busy node is not idle."""
        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        return json.loads(status).get("autoscaler_report", {}) if status else {}

    def stop(self) -> None:
        """Stop the head (which takes its processes down) and then any process of the cluster still running."""
        started = psutil.Process(self.process.pid).children(recursive=True)
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for process in started:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def autoscaler_config(gcs_address: str, head_cpus: int, worker_types: dict[str, Any], idle_timeout_minutes: float) -> dict[str, Any]:
    """A cluster config for Ray's autoscaler with the fake multi-node provider: `worker_types` are
    `available_node_types` entries (resources, min_workers, max_workers)."""
    head = {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "llmcluster-test",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "external",
            "module": _PROVIDER,
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,  # every fake node has this machine's IP; the autoscaler tells them apart by id
            "disable_node_updaters": True,  # nothing to install on a node
            "disable_launch_config_check": True,
        },
        "auth": {},
        "available_node_types": {_HEAD_TYPE: head, **{name: {"node_config": {}, **t} for name, t in worker_types.items()}},
        "head_node_type": _HEAD_TYPE,
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in _EMPTY_LISTS},
    }


def start(head_cpus: int, worker_types: dict[str, Any], idle_timeout_minutes: float, timeout_s: float = 60.0) -> AutoscalingCluster:
    """Start the head with the autoscaler and wait until its GCS accepts connections."""
    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="llmc-as-"))  # short: Ray's socket paths live under it
    config_path = temp_dir / "autoscaler.json"
    config_path.write_text(json.dumps(autoscaler_config(f"127.0.0.1:{port}", head_cpus, worker_types, idle_timeout_minutes)))
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={head_cpus}", f"--autoscaling-config={config_path}",
        f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
    ]  # fmt: skip
    # RAY_FAKE_CLUSTER lets the provider start; the autoscaler looks at the cluster every second instead of every 5 s
    env = os.environ | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token"}
    with open(temp_dir / "head.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    cluster = AutoscalingCluster(f"127.0.0.1:{port}", process, temp_dir)
    deadline = time.monotonic() + timeout_s
    while not listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            log_text = (temp_dir / "head.log").read_text(errors="replace")
            cluster.stop()
            raise RuntimeError(f"the autoscaling Ray head did not start:\n{log_text[-3000:]}")
        time.sleep(0.2)
    return cluster
