"""Informer cache memory and list cost at N pods (default 10,000).

Two workloads:
- ``synthetic`` (default; no root): N realistic pod objects as an API server sends them
  (a Deployment pod with managedFields, probes, env, volumes, status with conditions
  and containerStatuses; ~6 KB of JSON each), served as list pages of 500. Each method
  runs in a fresh child process and reports the time to turn the pages into a cache
  and the memory the cache keeps:
    raw     json.loads + policy_agent.model.parse.parse_pod -> frozen model values
            (what policy_agent.sources.kube does)
    client  the official client's model classes (ApiClient.deserialize -> V1Pod), the
            cache a model-class informer would keep
    client+model  V1Pod -> dict -> parse_pod on top of ``client`` (time only)
- ``apiserver`` (root): starts the local etcd + kube-apiserver of the test suite,
  creates N pods through the API with a concurrent client (spec.nodeName set, status
  written through the status subresource as a kubelet would), then runs the real
  KubeSource (Pod informer) against it and reports list time and process RSS growth.

Usage:
  .venv/bin/python bench/agent/informer_memory.py [--pods 10000] [--mode synthetic|apiserver|all]
Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = 500


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pod_template() -> dict:
    """A typical Deployment pod as the API server returns it (kubelet-written status)."""
    return {
        "metadata": {
            "name": "web-7d4b9c8f6d-x2x9k",
            "generateName": "web-7d4b9c8f6d-",
            "namespace": "team-a",
            "uid": "4f1c5a1e-9a43-4d7e-9a0a-3b1d9c0f2e11",
            "resourceVersion": "123456",
            "creationTimestamp": "2024-05-01T10:00:00Z",
            "labels": {
                "app": "web",
                "app.kubernetes.io/name": "web",
                "app.kubernetes.io/part-of": "shop",
                "pod-template-hash": "7d4b9c8f6d",
                "version": "v1",
                "team": "a",
            },
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2024-05-01T09:59:00Z",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9090",
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "web-7d4b9c8f6d",
                    "uid": "0c3a4b1e-1a2b-4c3d-8e9f-a0b1c2d3e4f5",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2024-05-01T10:00:00Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {
                            "f:generateName": {},
                            "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}, "f:version": {}},
                            "f:ownerReferences": {".": {}, 'k:{"uid":"0c3a4b1e"}': {}},
                        },
                        "f:spec": {
                            "f:containers": {'k:{"name":"web"}': {".": {}, "f:env": {}, "f:image": {}, "f:ports": {}}},
                            "f:dnsPolicy": {},
                            "f:restartPolicy": {},
                        },
                    },
                },
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2024-05-01T10:00:05Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:status": {
                            "f:conditions": {'k:{"type":"Ready"}': {".": {}, "f:status": {}}},
                            "f:containerStatuses": {},
                            "f:podIP": {},
                            "f:podIPs": {".": {}, 'k:{"ip":"10.0.0.1"}': {".": {}, "f:ip": {}}},
                        }
                    },
                },
            ],
        },
        "spec": {
            "volumes": [
                {
                    "name": "kube-api-access-abcde",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        ],
                        "defaultMode": 420,
                    },
                }
            ],
            "containers": [
                {
                    "name": "web",
                    "image": "registry.example.com/shop/web:1.4.2",
                    "ports": [
                        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
                    ],
                    "env": [{"name": f"ENV_{i}", "value": f"value-{i}"} for i in range(6)],
                    "resources": {
                        "limits": {"cpu": "500m", "memory": "256Mi"},
                        "requests": {"cpu": "100m", "memory": "128Mi"},
                    },
                    "volumeMounts": [
                        {
                            "name": "kube-api-access-abcde",
                            "readOnly": True,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        }
                    ],
                    "livenessProbe": {
                        "httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"},
                        "periodSeconds": 10,
                    },
                    "readinessProbe": {
                        "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                        "periodSeconds": 5,
                    },
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                },
                {
                    "name": "sidecar",
                    "image": "registry.example.com/proxy:2.0",
                    "ports": [{"name": "proxy", "containerPort": 15001, "protocol": "TCP"}],
                    "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                },
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "nodeName": "node-1",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": "2024-05-01T10:00:05Z"}
                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "hostIP": "192.168.1.10",
            "podIP": "10.0.0.1",
            "podIPs": [{"ip": "10.0.0.1"}],
            "startTime": "2024-05-01T10:00:00Z",
            "containerStatuses": [
                {
                    "name": n,
                    "state": {"running": {"startedAt": "2024-05-01T10:00:04Z"}},
                    "lastState": {},
                    "ready": True,
                    "restartCount": 0,
                    "image": f"registry.example.com/{n}:1",
                    "imageID": f"registry.example.com/{n}@sha256:" + "ab" * 32,
                    "containerID": "containerd://" + "cd" * 32,
                    "started": True,
                }
                for n in ("web", "sidecar")
            ],
            "qosClass": "Burstable",
        },
    }


def make_pods(n: int) -> list[dict]:
    base = pod_template()
    pods = []
    for i in range(n):
        p = copy.deepcopy(base)
        m = p["metadata"]
        m["name"] = f"web-{i:05d}"
        m["namespace"] = f"team-{i % 50}"
        m["uid"] = f"4f1c5a1e-9a43-4d7e-{i:04x}-3b1d9c0f2e11"
        m["resourceVersion"] = str(100000 + i)
        m["labels"]["app"] = f"app-{i % 200}"
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        p["status"]["podIP"] = ip
        p["status"]["podIPs"] = [{"ip": ip}]
        p["spec"]["nodeName"] = f"node-{i % 100}"
        pods.append(p)
    return pods


def pages(n: int) -> list[bytes]:
    pods = make_pods(n)
    out = []
    for i in range(0, n, PAGE):
        body = {
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "200000"},
            "items": pods[i : i + PAGE],
        }
        out.append(json.dumps(body).encode())
    return out


def _build_cache(mode: str, bodies: list[bytes]) -> dict:
    cache: dict = {}
    if mode == "raw":
        from policy_agent.model.parse import parse_pod

        for body in bodies:
            for d in json.loads(body)["items"]:
                m = d["metadata"]
                cache[(m["namespace"], m["name"])] = parse_pod(d)
        return cache
    from kubernetes import client

    from policy_agent.model.parse import parse_pod

    api = client.ApiClient()
    for body in bodies:
        lst = api.deserialize(body.decode(), "V1PodList", "application/json")
        for p in lst.items:
            key = (p.metadata.namespace, p.metadata.name)
            cache[key] = parse_pod(api.sanitize_for_serialization(p)) if mode == "client+model" else p
    return cache


def child(mode: str, n: int) -> dict:
    bodies = pages(n)  # built before measuring: this is the wire, not the cache
    nbytes = sum(len(b) for b in bodies)
    _build_cache(mode, pages(PAGE))  # warm imports and regex caches
    gc.collect()
    rss0 = rss_kb()
    # Pass 1, untraced: wall time and RSS growth.
    t0 = time.perf_counter()
    cache = _build_cache(mode, bodies)
    elapsed = time.perf_counter() - t0
    gc.collect()
    rss1 = rss_kb()
    count = len(cache)
    del cache
    gc.collect()
    # Pass 2, traced: what the cache keeps (the list bodies are garbage by then).
    tracemalloc.start()
    cache = _build_cache(mode, bodies)
    gc.collect()
    retained, peak = tracemalloc.get_traced_memory()  # with ``cache`` alive
    tracemalloc.stop()
    assert len(cache) == count
    return {
        "workload": "synthetic",
        "method": mode,
        "pods": count,
        "json_mb_total": round(nbytes / 2**20, 1),
        "seconds": round(elapsed, 3),
        "cache_retained_mb": round(retained / 2**20, 1),
        "peak_traced_mb": round(peak / 2**20, 1),
        "rss_growth_mb": round((rss1 - rss0) / 1024, 1),
    }


def run_synthetic(n: int) -> list[dict]:
    results = []
    for mode in ("raw", "client", "client+model"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--pods", str(n)],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    return results


def run_apiserver(n: int, list_modes: tuple[str, ...] = ("cache", "pages")) -> dict:
    """Create n pods in the local test apiserver, then list+watch them with KubeSource."""
    import concurrent.futures
    import tempfile

    sys.path.insert(0, str(REPO / "tests" / "apiserver"))
    from kube_cluster import start_local  # noqa: E402 - test harness shared with the suite

    work = Path(tempfile.mkdtemp(prefix="pa-kube-bench-"))
    cl = start_local(work)
    try:
        from kubernetes import client

        api = cl.api_client()
        core = client.CoreV1Api(api)
        nss = [f"bench-{i}" for i in range(20)]
        for ns in nss:
            core.create_namespace({"metadata": {"name": ns}})
        tmpl = pod_template()

        def create(i: int) -> None:
            ns = nss[i % len(nss)]
            name = f"web-{i:05d}"
            ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
            body = {
                "metadata": {
                    "name": name,
                    "labels": dict(tmpl["metadata"]["labels"], app=f"app-{i % 200}"),
                    "annotations": tmpl["metadata"]["annotations"],
                },
                "spec": dict(tmpl["spec"], nodeName=f"node-{i % 100}", volumes=[]),
            }
            body["spec"]["containers"] = [dict(c, volumeMounts=[]) for c in tmpl["spec"]["containers"]]
            core.create_namespaced_pod(ns, body)
            status = dict(tmpl["status"], podIP=ip, podIPs=[{"ip": ip}])
            core.patch_namespaced_pod_status(name, ns, {"status": status})

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            for f in concurrent.futures.as_completed([ex.submit(create, i) for i in range(n)]):
                f.result()
        create_s = time.perf_counter() - t0
        print(
            json.dumps({"workload": "apiserver", "created_pods": n, "create_and_status_seconds": round(create_s, 1)}),
            flush=True,
        )
        api.close()

        # Measure in fresh children so the RSS growth is the informer's alone: once
        # untraced (time, RSS), once under tracemalloc (what the cache retains).
        # Both list strategies of sources/kube.py (docs/decisions/kube-list-strategy.md):
        # "cache" = resourceVersion=0 from the watch cache, "pages" = limit/continue from etcd.
        every = {}
        for mode in list_modes:
            res = {"list_mode": mode}
            for trace in (False, True):
                out = subprocess.run(
                    [sys.executable, __file__, "--child-informer", str(cl.kubeconfig), "--pods", str(n),
                     "--list-mode", mode] + (["--trace"] if trace else []),
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                res.update({k: v for k, v in r.items() if trace == ("traced" in k)})
            res["create_and_status_seconds"] = round(create_s, 1)
            res["retained_bytes_per_pod"] = round(res["retained_traced_mb"] * 2**20 / max(res["pods"], 1))
            print(json.dumps(res), flush=True)
            every[mode] = res
        return every
    finally:
        cl.local.stop()
        shutil.rmtree(work, ignore_errors=True)


def child_informer(kubeconfig: str, n: int, trace: bool, list_mode: str = "cache") -> dict:
    import threading

    import kubernetes  # noqa: F401 - import cost out of the measurement

    from policy_agent.sources.kube import KubeSource, WatchOptions, api_client_from_config

    api = api_client_from_config(kubeconfig=kubeconfig)
    synced = threading.Event()

    def sink(ev):
        if type(ev).__name__ == "InSync":
            synced.set()

    gc.collect()
    rss0 = rss_kb()
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    src = KubeSource(sink, api, kinds=("Pod",), options=WatchOptions(list_from_cache=list_mode == "cache")).start()
    assert synced.wait(600), "no InSync"
    elapsed = time.perf_counter() - t0
    gc.collect()
    inf = src.informers["Pod"]
    res = {"workload": "apiserver", "method": "KubeSource (raw JSON -> model)", "pods": len(src.cache("Pod")),
           "list_mode": inf.list_mode, "list_pages": inf.list_pages}
    if trace:
        retained, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        res.update(retained_traced_mb=round(retained / 2**20, 1), peak_traced_mb=round(peak / 2**20, 1))
    else:
        rss1 = rss_kb()
        res.update(
            list_seconds=round(elapsed, 2),
            rss_before_mb=round(rss0 / 1024, 1),
            rss_growth_mb=round((rss1 - rss0) / 1024, 1),
            process_rss_mb=round(rss1 / 1024, 1),
        )
    src.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--mode", choices=("synthetic", "apiserver", "all"), default="synthetic")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-informer", help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--list-mode", choices=("cache", "pages"), default="cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.pods)))
        return
    if a.child_informer:
        print(json.dumps(child_informer(a.child_informer, a.pods, a.trace, a.list_mode)))
        return
    if a.mode in ("synthetic", "all"):
        run_synthetic(a.pods)
    if a.mode in ("apiserver", "all"):
        if os.geteuid() != 0:
            sys.exit("apiserver mode needs root (starts etcd and kube-apiserver)")
        run_apiserver(a.pods)


if __name__ == "__main__":
    main()
