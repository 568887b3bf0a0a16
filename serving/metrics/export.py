"""Per-node metrics endpoints, the way Prometheus scrapes a Ray cluster: one target per node.

Every replica process (LLM and API) keeps its metrics in its own prometheus_client registry and a
`MetricsPusher` thread sends a snapshot every PUSH_INTERVAL_S to the `NodeMetricsExporter` actor of
its node. The exporter serves the union of its node's snapshots at http://NODE_IP:PORT/metrics;
the API's GET /metrics answers the union over all nodes (`cluster_families`, gathered at most once
per CLUSTER_CACHE_S). A snapshot that is not refreshed within SNAPSHOT_TTL_S (its process died) is
dropped, so a removed replica's series vanish.

Exporters are detached actors named `exporter-<node id>` in the Ray namespace `llmcluster`; they
outlive applications and go with their node (or the cluster), or when the last source on their node
is forgotten, so that the node can go idle (the next source there starts a new one).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable

import ray
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serving.config import ServerConfig

logger = logging.getLogger(__name__)

NAMESPACE = "llmcluster"
PUSH_INTERVAL_S = 1.0
SNAPSHOT_TTL_S = 5.0
REPORT_TIMEOUT_S = 10.0
CLUSTER_CACHE_S = 1.0  # snapshots change once per PUSH_INTERVAL_S: scrapes within this share one gathering
_NAME_PREFIX = "exporter-"


def merge(families: Iterable[Metric]) -> list[Metric]:
    """Families of the same name (from several processes) as one family each, samples concatenated."""
    merged: dict[str, Metric] = {}
    for family in families:
        if family.name not in merged:
            merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
        merged[family.name].samples.extend(family.samples)
    return list(merged.values())


class _Families:
    """A prometheus_client collector that yields whatever `source` returns at scrape time."""

    def __init__(self, source: Callable[[], list[Metric]]) -> None:
        self.collect = source


def render(families: list[Metric]) -> bytes:
    """The text exposition format of `families`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(lambda: families))
    return generate_latest(registry)


@ray.remote(num_cpus=0)
class NodeMetricsExporter:
    """Holds the latest snapshot of every metrics source on its node and serves them over HTTP."""

    def __init__(self, port: int, local_only: bool) -> None:
        self._snapshots: dict[str, tuple[float, list[Metric]]] = {}
        self._lock = threading.Lock()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(lambda: self.collect()))
        node_id = ray.get_runtime_context().get_node_id()
        node_ip = next(node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id)  # the IP Ray uses
        host = "127.0.0.1" if local_only else node_ip
        server, _ = start_http_server(port, addr=host, registry=registry)
        self._url = f"http://{host}:{server.server_port}/metrics"

    def url(self) -> str:
        return self._url

    def report(self, source: str, families: list[Metric]) -> None:
        with self._lock:
            self._snapshots[source] = (time.monotonic(), families)

    def forget(self, source: str) -> None:
        """Drop `source`'s series. With that the last live source of the node gone, the exporter leaves too:
        a live actor keeps its node from ever counting as idle, and Ray's autoscaler removes only idle nodes."""
        oldest = time.monotonic() - SNAPSHOT_TTL_S
        with self._lock:
            self._snapshots.pop(source, None)
            last = all(at < oldest for at, _ in self._snapshots.values())
        if last:
            ray.actor.exit_actor()

    def collect(self, exclude: str | None = None) -> list[Metric]:
        """The merged snapshots of the sources alive, except `exclude`."""
        oldest = time.monotonic() - SNAPSHOT_TTL_S
        with self._lock:
            for source in [s for s, (at, _) in self._snapshots.items() if at < oldest]:
                del self._snapshots[source]
            snapshots = [families for source, (_, families) in self._snapshots.items() if source != exclude]
        return merge(family for families in snapshots for family in families)


def node_exporter(port: int, local_only: bool) -> ray.actor.ActorHandle:
    """The exporter of this process's node, started on `port` (0: any free port) if there is none yet;
    `local_only` binds it to 127.0.0.1 instead of the node's IP."""
    node_id = ray.get_runtime_context().get_node_id()
    return NodeMetricsExporter.options(
        name=f"{_NAME_PREFIX}{node_id}",
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(port, local_only)


def exporters() -> list[ray.actor.ActorHandle]:
    """The exporters of every node that has one."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
    return [ray.get_actor(name, namespace=NAMESPACE) for name in names if name.startswith(_NAME_PREFIX)]


_gathered: dict[str | None, tuple[float, asyncio.Task[list[Metric]]]] = {}  # exclude -> (started, gathering)


async def cluster_families(exclude: str | None = None, timeout_s: float = 5.0) -> list[Metric]:
    """The metrics of every process in the cluster except `exclude`; a node that does not answer is left out.
    Calls within CLUSTER_CACHE_S of a gathering (on the same event loop) share it instead of asking every node again."""
    now, loop = time.monotonic(), asyncio.get_running_loop()
    cached = _gathered.get(exclude)
    if cached is None or now - cached[0] > CLUSTER_CACHE_S or cached[1].get_loop() is not loop:
        cached = now, loop.create_task(_gather(exclude, timeout_s))
        _gathered[exclude] = cached
    return await asyncio.shield(cached[1])


async def _gather(exclude: str | None, timeout_s: float) -> list[Metric]:
    handles = await asyncio.to_thread(exporters)
    calls = [asyncio.wait_for(asyncio.wrap_future(h.collect.remote(exclude).future()), timeout_s) for h in handles]
    results = await asyncio.gather(*calls, return_exceptions=True)
    families: list[Metric] = []
    for result in results:
        if isinstance(result, BaseException):
            logger.warning("a node's metrics exporter did not answer: %r", result)
        else:
            families.extend(result)
    return merge(families)


class MetricsPusher:
    """A daemon thread pushing `registry` to this node's exporter every PUSH_INTERVAL_S, after `refresh()`.

    The exporter serves on `server.metrics_port`, on 127.0.0.1 when the API itself listens there only.
    """

    def __init__(self, source: str, registry: CollectorRegistry, server: ServerConfig, refresh: Callable[[], None] = lambda: None) -> None:
        self.source = source
        self._registry = registry
        self._port = server.metrics_port
        self._local_only = server.host in ("127.0.0.1", "localhost", "::1")
        self._refresh = refresh
        self._exporter: ray.actor.ActorHandle | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-pusher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PUSH_INTERVAL_S):
            try:
                self._refresh()
                if self._exporter is None:
                    self._exporter = node_exporter(self._port, self._local_only)
                ray.get(self._exporter.report.remote(self.source, list(self._registry.collect())), timeout=REPORT_TIMEOUT_S)
            except Exception:  # a missed push only delays the metrics; find the exporter again
                logger.warning("pushing metrics failed", exc_info=True)
                self._exporter = None

    def stop(self) -> None:
        """Stop pushing and take this source's series off the exporter at once. The thread ends first, so
        no push of it can follow (and undo) the forget; calls from one process reach the actor in order."""
        self._stop.set()
        self._thread.join(REPORT_TIMEOUT_S + PUSH_INTERVAL_S)
        if self._exporter is not None:
            self._exporter.forget.remote(self.source)
