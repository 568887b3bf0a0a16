"""Kubernetes tooling: `llmcluster preflight` (will the model fit the cluster's GPU nodes?) and
`llmcluster status --kubernetes` (the RayService the Helm chart created), on the `kubernetes` client."""

try:
    import kubernetes  # noqa: F401
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "the Kubernetes commands need the kubernetes client: pip install 'llm-cluster[kubernetes]'", name=error.name
    ) from error
