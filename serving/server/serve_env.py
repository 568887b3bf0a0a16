"""The environment of the Serve controller, inherited by the HTTP proxies and replicas it starts.

`deploy` passes it as the controller's runtime environment; the Helm chart takes it from
files/project-defaults.yaml (scripts/gen_chart_schema.py writes that file from here).
"""

# Environment of the Serve controller, inherited by the proxies and replicas it starts.
SERVE_CONTROLLER_ENV = {
    # Ray Serve's high-throughput ingress: HAProxy (a C load balancer, shipped with ray[serve] on Linux) takes the
    # Python proxy actor's place and forwards HTTP straight to the API replicas' own HTTP servers, so a streamed token
    # crosses one Ray hop (LLM to API replica) and no Python proxy (benchmarks/README.md, serving overhead).
    # THROUGHPUT_OPTIMIZED also runs user code and the router in the replica's own event loop (our replicas never
    # block it: engine steps run in a thread), buffers the replicas' Serve logs and freezes start-up objects out of the GC.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ...but not its buffering of the replicas' Serve logs: access and warning lines reached a replica's log file
    # only once 1,000 had gathered (or with an ERROR), and never from a replica that was killed. One write per request.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # An API replica being removed keeps answering this long while every HAProxy drops it from its backends (they
    # reload within a second of the controller's word); Serve's default, 30 s, made every shutdown take 30 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # On 2 cores that are also loading a model, a proxy can take longer than Serve's default 5 s
    # to report ready, and is then restarted over and over.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    # The controller's loop wakes 2 rather than 10 times a second: idle, it is the busiest Ray process, and on
    # 2 cores every wake-up takes a core from an engine step.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Replicas report their autoscaling signals (queue, KV usage, TTFT) every second rather than every 10 s.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    # A replica that failed its health checks (dead or stuck engine) has nothing left to drain: stop it at
    # once, so its requests fail now rather than after drain_timeout_s (Serve drains it by default).
    "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
}
