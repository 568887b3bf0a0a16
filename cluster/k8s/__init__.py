"""Kubernetes tooling: `llmcluster preflight` (will the model fit the cluster's GPU nodes?) and
`llmcluster status --kubernetes` (the RayService the Helm chart created), on the `kubernetes` client."""
