"""The machines around the engine: local Ray clusters, placement of workers on nodes, Kubernetes tooling,
and the HAProxy (Serve's HTTP ingress) each node runs."""
