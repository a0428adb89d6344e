"""ClusterNetworkPolicy test helpers: install/remove our CRD on the test cluster, build objects."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from kube_helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "manifests" / "crd" / "10-clusternetworkpolicies.yaml"
CRD_NAME = "clusternetworkpolicies.policy.networking.k8s.io"
EXAMPLES = REPO / "examples" / "cluster-network-policy"
API_VERSION = "policy.networking.k8s.io/v1alpha2"


def crd_installed(cluster) -> bool:
    return bool(cluster.kubectl("get", "crd", CRD_NAME, "--ignore-not-found", "-o", "name").strip())


def _served(cluster) -> bool:
    p = subprocess.run(
        [cluster.kubectl_bin, "--kubeconfig", str(cluster.kubeconfig), "get", "--raw",
         f"/apis/{API_VERSION}/clusternetworkpolicies?limit=1"],
        capture_output=True, text=True, timeout=60,
    )
    return p.returncode == 0


def install_crd(cluster) -> None:
    """kubectl apply of our manifest, then wait until the resource is served."""
    cluster.kubectl("apply", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for", "condition=established", "--timeout=60s", f"crd/{CRD_NAME}")
    wait_for(lambda: _served(cluster), 60, "clusternetworkpolicies served")


def remove_crd(cluster) -> None:
    """Delete the CRD (and so every ClusterNetworkPolicy) and wait until it is not served."""
    cluster.kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=true", "--timeout=120s")
    wait_for(lambda: not _served(cluster), 60, "clusternetworkpolicies no longer served")


def cnp(name: str, tier: str, priority: int, subject: dict, ingress=None, egress=None) -> dict:
    spec: dict = {"tier": tier, "priority": priority, "subject": subject}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": API_VERSION, "kind": "ClusterNetworkPolicy", "metadata": {"name": name}, "spec": spec}


def kubectl_apply(cluster, *objs: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def kubectl_create(cluster, obj: dict, *args: str) -> subprocess.CompletedProcess:
    """kubectl create of one object; the caller reads returncode, stdout and stderr.
    Without kubectl's own schema check: the verdict is the API server's."""
    return subprocess.run(
        [cluster.kubectl_bin, "--kubeconfig", str(cluster.kubeconfig), "--request-timeout=60s", "create",
         "--validate=false", "-f", "-", *args],
        input=json.dumps(obj), capture_output=True, text=True, timeout=120,
    )
