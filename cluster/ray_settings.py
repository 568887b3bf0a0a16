"""What every Ray node of the project runs with: the local cluster's (cluster/local.py) and the Helm chart's
pods (scripts/gen_chart_schema.py writes these into the chart's files/project-defaults.yaml)."""

# Ray keeps num_cpus idle worker processes ready for tasks; Serve runs only actors, each in a process of its own, and
# every idle Ray worker wakes 100 times a second (~1% of a core, taken from the engine): let them go once idle.
RAY_NODE_ENV: dict[str, str] = {"RAY_num_workers_soft_limit": "0"}

# The log monitor copies every worker's output to connected drivers; ours connect with log_to_driver=False (and
# Serve's REST deployments have none), the logs stay in their files (and the dashboard), and it would cost ~1% of a
# core polling them.
RAY_START_PARAMS: dict[str, str] = {"include-log-monitor": "false"}
