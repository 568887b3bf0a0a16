"""The Kubernetes API client for the current kubeconfig (or a given one), without touching global state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kubernetes import config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError


def api_client(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """A client for `context` of `kubeconfig` (default: $KUBECONFIG or ~/.kube/config), or the
    in-cluster service account when there is no kubeconfig and this runs in a pod."""
    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except (ConfigException, FileNotFoundError) as error:
        if kubeconfig or context:
            raise RuntimeError(f"cannot use the kubeconfig: {error}") from error
        try:
            config.load_incluster_config()
        except ConfigException:
            raise RuntimeError(f"no Kubernetes cluster configured (kubeconfig: {error})") from error
        return ApiClient()


@contextmanager
def readable_errors(client: ApiClient) -> Iterator[None]:
    """Turn an unreachable API server or a refused call into a RuntimeError that says which."""
    host = client.configuration.host
    try:
        yield
    except HTTPError as error:
        raise RuntimeError(f"cannot reach the Kubernetes API at {host}: {getattr(error, 'reason', error)}") from error
    except ApiException as error:
        raise RuntimeError(f"the Kubernetes API at {host} answered {error.status} {error.reason}: {error.body or ''}".strip()) from error
