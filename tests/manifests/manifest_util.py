"""Load the manifests and the lint rules shared by the manifest tests.

The lint functions return a list of problems (empty = fine) so the tests can show
both that our manifests pass and that a bad manifest is caught.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"

# What the agent may do, and nothing more (issue 7): read pods, namespaces, policies;
# issue 14: ClusterNetworkPolicies, and nodes for their `nodes` peers.
ALLOWED_RBAC = {
    ("", "pods"): {"get", "list", "watch"},
    ("", "namespaces"): {"get", "list", "watch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch"},
    ("policy.networking.k8s.io", "clusternetworkpolicies"): {"get", "list", "watch"},
    # issue 15: Events on NetworkPolicies the agent cannot enforce (its one write).
    ("", "events"): {"create", "patch"},
}
AGENT_CAPABILITIES = {"NET_ADMIN", "NET_RAW"}


def package_version() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg["metadata"]["version"]


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(id "path#index kind/name", document) for every document under manifests/."""
    out = []
    for path in manifest_files():
        with open(path) as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is None:
                    continue
                rel = path.relative_to(REPO)
                out.append((f"{rel}#{i} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in documents() if d.get("kind") == kind]


def find(kind: str, name: str) -> dict[str, Any]:
    for d in by_kind(kind):
        if d["metadata"]["name"] == name:
            return d
    raise KeyError(f"{kind}/{name} not in manifests/")


def pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if doc.get("kind") in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
        yield doc["spec"]["template"]["spec"]
    elif doc.get("kind") == "Pod":
        yield doc["spec"]


def containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for c in spec.get("initContainers", []) or []:
        yield "init", c
    for c in spec.get("containers", []) or []:
        yield "main", c


# --- lint rules -------------------------------------------------------------------

def lint_images(doc: dict[str, Any], version: str) -> list[str]:
    problems = []
    for spec in pod_specs(doc):
        for _, c in containers(spec):
            image = c.get("image", "")
            name_part, _, tag = image.rpartition(":")
            if "@" in image:
                continue  # pinned by digest
            if not name_part or "/" in tag:
                problems.append(f"container {c['name']}: image {image!r} has no tag")
            elif tag == "latest":
                problems.append(f"container {c['name']}: image {image!r} uses :latest")
            elif tag != version:
                problems.append(f"container {c['name']}: image tag {tag!r} is not the package version {version!r}")
    return problems


def lint_resources(doc: dict[str, Any]) -> list[str]:
    problems = []
    for spec in pod_specs(doc):
        for _, c in containers(spec):
            res = c.get("resources") or {}
            for section, keys in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
                for key in keys:
                    if key not in (res.get(section) or {}):
                        problems.append(f"container {c['name']}: resources.{section}.{key} is not set")
    return problems


def lint_probes(doc: dict[str, Any]) -> list[str]:
    problems = []
    for spec in pod_specs(doc):
        for role, c in containers(spec):
            if role == "init":
                continue
            for probe in ("livenessProbe", "readinessProbe"):
                p = c.get(probe)
                if not p:
                    problems.append(f"container {c['name']}: {probe} is not set")
                    continue
                http = p.get("httpGet")
                if http and spec.get("hostNetwork") and http.get("host") not in ("127.0.0.1", "::1"):
                    problems.append(
                        f"container {c['name']}: {probe} probes the node address; serve health on loopback "
                        "and set httpGet.host 127.0.0.1"
                    )
    return problems


def lint_rbac(doc: dict[str, Any]) -> list[str]:
    if doc.get("kind") not in ("ClusterRole", "Role"):
        return []
    problems = []
    if doc.get("aggregationRule"):
        problems.append("aggregationRule would widen the role")
    for i, rule in enumerate(doc.get("rules") or []):
        if rule.get("nonResourceURLs") or rule.get("resourceNames"):
            problems.append(f"rules[{i}]: nonResourceURLs/resourceNames are not expected")
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                allowed = ALLOWED_RBAC.get((group, resource))
                if allowed is None:
                    problems.append(f"rules[{i}]: {resource!r} in group {group!r} is not allowed")
                    continue
                wider = set(rule.get("verbs") or []) - allowed
                if wider:
                    problems.append(f"rules[{i}]: verbs {sorted(wider)} on {resource!r} are wider than {sorted(allowed)}")
    return problems


def lint_security(doc: dict[str, Any]) -> list[str]:
    problems = []
    for spec in pod_specs(doc):
        for _, c in containers(spec):
            sc = c.get("securityContext") or {}
            caps = sc.get("capabilities") or {}
            sys_admin = {"SYS_ADMIN", "CAP_SYS_ADMIN"} & set(caps.get("add") or [])
            if sc.get("privileged"):
                problems.append(f"container {c['name']}: privileged")
            if sys_admin:
                # The API server rejects allowPrivilegeEscalation: false together with
                # privileged or CAP_SYS_ADMIN (pod validation, not in the OpenAPI schema).
                if sc.get("allowPrivilegeEscalation") is False:
                    problems.append(f"container {c['name']}: allowPrivilegeEscalation false with SYS_ADMIN is rejected")
            elif sc.get("allowPrivilegeEscalation", True):
                problems.append(f"container {c['name']}: allowPrivilegeEscalation is not false")
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"container {c['name']}: capabilities.drop does not contain ALL")
    return problems


def lint_daemonset(doc: dict[str, Any]) -> list[str]:
    if doc.get("kind") != "DaemonSet":
        return []
    problems = []
    spec = doc["spec"]["template"]["spec"]
    if {"operator": "Exists"} not in (spec.get("tolerations") or []):
        problems.append("no catch-all toleration {operator: Exists}: it would not run on every node")
    if spec.get("priorityClassName") != "system-node-critical":
        problems.append("priorityClassName is not system-node-critical")
    strategy = doc["spec"].get("updateStrategy") or {}
    if strategy.get("type") != "RollingUpdate" or (strategy.get("rollingUpdate") or {}).get("maxUnavailable") != 1:
        problems.append("updateStrategy is not RollingUpdate with maxUnavailable 1")
    declared = {v["name"] for v in spec.get("volumes") or []}
    for _, c in containers(spec):
        for m in c.get("volumeMounts") or []:
            if m["name"] not in declared:
                problems.append(f"container {c['name']}: mounts undeclared volume {m['name']!r}")
    for v in spec.get("volumes") or []:
        if "hostPath" in v and not v["hostPath"].get("type"):
            problems.append(f"volume {v['name']}: hostPath without a type")
    return problems


ALL_LINTS = (lint_resources, lint_probes, lint_rbac, lint_security, lint_daemonset)


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    for spec in pod_specs(doc):
        for _, c in containers(spec):
            if c["name"] == name:
                return c
    raise KeyError(name)


def host_mounts(doc: dict[str, Any], container_name: str) -> dict[str, tuple[str, str]]:
    """mountPath -> (hostPath, type) for one container's hostPath mounts."""
    spec = next(pod_specs(doc))
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    out = {}
    for m in container(doc, container_name).get("volumeMounts") or []:
        hp = volumes[m["name"]].get("hostPath")
        if hp:
            out[m["mountPath"]] = (hp["path"], hp.get("type", ""))
    return out


def covered(path: str, mounts: dict[str, tuple[str, str]]) -> bool:
    """True if path (a host path) is visible at the same path through one of the mounts.

    /var/run is a symlink to /run on the hosts we support and in the Debian base image,
    so the two spellings name the same place.
    """
    path = _canonical(path)
    for mount_path, (host_path, _) in mounts.items():
        mount_path, host_path = _canonical(mount_path), _canonical(host_path)
        if mount_path == host_path and os.path.commonpath([path, host_path]) == host_path:
            return True
    return False


def _canonical(path: str) -> str:
    return "/run" + path[len("/var/run"):] if path == "/var/run" or path.startswith("/var/run/") else path
