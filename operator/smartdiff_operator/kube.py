"""The few Kubernetes API calls the operator makes, over the ``kubernetes`` client.

Role: create a child object (an existing one is left alone: names are
deterministic, so "already exists" means "done"), read a generation, its Job and
its Pods as plain JSON dicts (exactly as the API server sends them), and write a
generation's status with a merge patch that carries ``resourceVersion`` -- a
precondition, so a write based on a stale read fails with 409 instead of
overwriting what the runtime wrote meanwhile.

Errors are ``KubeError`` with the HTTP status, the API server's reason and
message; ``transient`` says whether retrying may help (5xx, 429, timeouts,
connection errors) -- the handlers turn that into kopf's retry decision.

Talks to: the API server (``kubernetes.client.ApiClient``); credentials from
``$KUBECONFIG`` / ``~/.kube/config``, else the pod's ServiceAccount.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from smartdiff.api.videogeneration import GROUP, PLURAL, VERSION

MERGE_PATCH: Final = "application/merge-patch+json"
REQUEST_TIMEOUT: Final = (5.0, 30.0)


@dataclass(frozen=True)
class KindPath:
    """Where objects of one kind live in the REST API."""

    prefix: str
    plural: str


KIND_PATHS: Final = {
    "ServiceAccount": KindPath("/api/v1", "serviceaccounts"),
    "Service": KindPath("/api/v1", "services"),
    "Pod": KindPath("/api/v1", "pods"),
    "Role": KindPath("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": KindPath("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": KindPath("/apis/batch/v1", "jobs"),
    "VideoGeneration": KindPath(f"/apis/{GROUP}/{VERSION}", PLURAL),
}


class KubeError(RuntimeError):
    """An API call failed; ``status`` 0 means no HTTP response (connection, timeout)."""

    def __init__(self, action: str, status: int, reason: str, message: str) -> None:
        super().__init__(f"{action}: HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.api_message = message

    @property
    def transient(self) -> bool:
        """Whether trying again later may succeed."""
        return self.status == 0 or self.status == 429 or self.status >= 500

    @property
    def conflict(self) -> bool:
        return self.status == 409


class KubeApi:
    """Synchronous, JSON-in JSON-out access to the API server.

    Args:
        api_client: a configured ``kubernetes.client.ApiClient``.
    """

    def __init__(self, api_client: k8s_client.ApiClient) -> None:
        self._client = api_client

    @classmethod
    def from_environment(cls) -> KubeApi:
        """From ``$KUBECONFIG`` (or ``~/.kube/config``), else the in-cluster ServiceAccount."""
        kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        configuration = k8s_client.Configuration()
        if Path(kubeconfig.split(os.pathsep)[0]).is_file():
            k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            k8s_config.load_incluster_config(client_configuration=configuration)
        send_bearer_token(configuration)
        return cls(k8s_client.ApiClient(configuration))

    def close(self) -> None:
        self._client.close()

    def _call(
        self,
        action: str,
        method: str,
        path: str,
        *,
        body: object = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        try:
            response = self._client.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except k8s_client.ApiException as error:
            reason, message = _error_details(error)
            raise KubeError(action, int(error.status or 0), reason, message) from None
        except (OSError, ValueError) as error:  # urllib3 connection/timeout errors
            raise KubeError(action, 0, type(error).__name__, str(error)) from None
        data = json.loads(response.data or b"{}")
        if not isinstance(data, dict):
            raise KubeError(action, 0, "BadResponse", f"expected a JSON object, got {data!r:.80}")
        return data

    def _object_path(self, kind: str, namespace: str, name: str | None = None) -> str:
        where = KIND_PATHS[kind]
        path = f"{where.prefix}/namespaces/{quote(namespace)}/{where.plural}"
        return f"{path}/{quote(name)}" if name is not None else path

    def create(self, manifest: Mapping[str, Any]) -> bool:
        """Create ``manifest``; False if an object of that name already exists."""
        kind = str(manifest["kind"])
        meta = manifest["metadata"]
        action = f"create {kind} {meta['namespace']}/{meta['name']}"
        try:
            self._call(action, "POST", self._object_path(kind, meta["namespace"]), body=manifest)
        except KubeError as error:
            if error.status == 409 and error.reason == "AlreadyExists":
                return False
            raise
        return True

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            return self._call(
                f"get {kind} {namespace}/{name}", "GET", self._object_path(kind, namespace, name)
            )
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    def list_objects(self, kind: str, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Objects of ``kind`` in ``namespace`` matching ``label_selector``."""
        data = self._call(
            f"list {kind} in {namespace} ({label_selector})",
            "GET",
            self._object_path(kind, namespace),
            query=[("labelSelector", label_selector)],
        )
        items = data.get("items") or []
        return [item for item in items if isinstance(item, dict)]

    def list_generations(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """VideoGenerations in ``namespace``, or in the whole cluster."""
        where = KIND_PATHS["VideoGeneration"]
        path = (
            f"{where.prefix}/namespaces/{quote(namespace)}/{where.plural}"
            if namespace is not None
            else f"{where.prefix}/{where.plural}"
        )
        data = self._call(f"list VideoGenerations in {namespace or 'all namespaces'}", "GET", path)
        return [item for item in data.get("items") or [] if isinstance(item, dict)]

    def patch_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        *,
        resource_version: str | None,
    ) -> dict[str, Any]:
        """Merge-patch a VideoGeneration's status; 409 if ``resource_version`` is stale."""
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        return self._call(
            f"patch VideoGeneration {namespace}/{name} status",
            "PATCH",
            self._object_path("VideoGeneration", namespace, name) + "/status",
            body=body,
            content_type=MERGE_PATCH,
        )


def send_bearer_token(configuration: k8s_client.Configuration) -> None:
    """Make the client send the token its config loaders found.

    The loaders of ``kubernetes`` 36 store a token under ``api_key["authorization"]``
    while the generated ``Configuration.auth_settings`` only sends
    ``api_key["BearerToken"]``: without this, token users (ServiceAccounts) are
    anonymous. The hook also runs on every request, so rotated tokens follow.
    """
    loader_hook = configuration.refresh_api_key_hook

    def refresh(config: k8s_client.Configuration) -> None:
        if loader_hook is not None:
            loader_hook(config)
        token = config.api_key.get("authorization")
        if token:
            config.api_key["BearerToken"] = token

    configuration.refresh_api_key_hook = refresh
    refresh(configuration)


def _error_details(error: k8s_client.ApiException) -> tuple[str, str]:
    """The ``Status`` object's reason and message, else the HTTP reason."""
    try:
        status = json.loads(error.body or b"{}")
    except (TypeError, ValueError):
        status = {}
    if not isinstance(status, dict):
        status = {}
    reason = str(status.get("reason") or error.reason or "Error")
    message = str(status.get("message") or error.body or "")
    return reason, message
