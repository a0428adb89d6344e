"""The agent against a real kube-apiserver at scale: bulk load, restart to ready, RSS,
informer list cost, event -> enforced.

Server: the test suite's etcd + kube-apiserver 1.20.2 (tests/apiserver/kube_cluster.py),
started in a temp dir and stopped by pid. Workload: bench/workload.py at --pods N
(20 pods and 4 NetworkPolicies per namespace, 110 pods on node-1), every pod rendered as
a realistic API object (bench/agent/informer_memory.py's Deployment pod: managedFields,
probes, env, kubelet-written status; ~5.5 KB of JSON) with the workload's labels,
node, named ports and addresses.

1. Bulk load. Creating 50,000 pods through the API costs two requests each (create,
   then the status a kubelet would write) and took ~30 minutes on this machine; the
   objects are written straight into etcd instead (JSON, which the API server reads
   back whatever its storage media type; 100 puts per etcd transaction), the way a
   restored etcd backup looks to it. Timed; then we wait until the API server's watch
   cache holds the last object written.
2. Restart to ready: `policy-agent run` as a child process (dataplane in a fresh
   network namespace), from process start to /readyz 200, which needs every informer
   listed and the first apply committed. Twice: a cold node (empty kernel) and a restart
   (the first run's rules still in the kernel). The child's VmRSS / VmHWM once ready
   and after --settle seconds.
3. Informer list cost: bench/agent/informer_memory.py's child (a Pod-only KubeSource in
   a fresh process): list -> InSync time, RSS growth, bytes retained per cached pod.
4. Event -> enforced: the agent in this process (the same Agent, KubeSource and
   Dataplane the CLI builds; on_enforced tells when the kernel commit is done), and
   changes made through the API server with plain HTTP: from just before the request
   is sent to the commit that enforces it (so the API server's write, its watch
   delivery and the agent's decode are inside the figure). One change at a time with
   --gap between them. Kinds: local / remote pod gets its address (the kubelet's
   status write for a new pod), local / remote pod label change, NetworkPolicy add
   (selecting a local pod), namespace label change, local pod delete.

  sudo .venv/bin/python bench/agent/kube_scale.py --pods 50000 [--events 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "apiserver"))

import informer_memory as im  # noqa: E402
import kube_cluster as kc  # noqa: E402 - the test suite's etcd + kube-apiserver harness
import workload as w  # noqa: E402

from policy_agent.model.types import LabelSelector, Labels, NetworkPolicy, Pod  # noqa: E402

TXN_OPS = 100  # etcd's --max-txn-ops default is 128; ~0.6 MB a transaction at 5.5 KB a pod


# --- objects as the API server stores them ------------------------------------------


def _uid(kind: str, n: int) -> str:
    return f"{kind[:8].ljust(8, '0')}-0000-4000-8000-{n:012x}".replace(" ", "0")


def _selector(s: LabelSelector | None) -> dict:
    if s is None:
        return {}
    out: dict = {}
    if s.match_labels:
        out["matchLabels"] = dict(s.match_labels)
    if s.match_expressions:
        out["matchExpressions"] = [
            {"key": r.key, "operator": r.operator.value, **({"values": list(r.values)} if r.values else {})}
            for r in s.match_expressions
        ]
    return out


def policy_json(p: NetworkPolicy, n: int) -> dict:
    def rule(r, peer_key: str) -> dict:
        out: dict = {}
        if r.ports:
            out["ports"] = [{"protocol": pp.protocol.value, **({"port": pp.port} if pp.port is not None else {})}
                            for pp in r.ports]
        peers = []
        for peer in r.peers:
            d: dict = {}
            if peer.ip_block is not None:
                d["ipBlock"] = {"cidr": str(peer.ip_block.cidr),
                                **({"except": [str(e) for e in peer.ip_block.excepts]} if peer.ip_block.excepts else {})}
            if peer.pod_selector is not None:
                d["podSelector"] = _selector(peer.pod_selector)
            if peer.namespace_selector is not None:
                d["namespaceSelector"] = _selector(peer.namespace_selector)
            peers.append(d)
        if peers:
            out[peer_key] = peers
        return out

    spec: dict = {"podSelector": _selector(p.pod_selector), "policyTypes": [t.value for t in p.policy_types]}
    if p.ingress:
        spec["ingress"] = [rule(r, "from") for r in p.ingress]
    if p.egress:
        spec["egress"] = [rule(r, "to") for r in p.egress]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": p.name, "namespace": p.namespace, "uid": _uid("netpol", n), "generation": 1,
                         "creationTimestamp": "2026-11-29T20:00:00Z"},
            "spec": spec}


def namespace_json(name: str, labels: dict, n: int) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": _uid("namespac", n), "labels": labels,
                         "creationTimestamp": "2026-11-29T20:00:00Z"},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


_TEMPLATE = im.pod_template()


def pod_json(p: Pod, n: int, with_status: bool = True) -> dict:
    """The workload pod as a realistic API object (informer_memory's Deployment pod)."""
    t = _TEMPLATE
    meta = dict(t["metadata"], name=p.name, namespace=p.namespace, uid=_uid("pod", n), labels=dict(p.labels),
                generateName=p.name.rsplit("-", 1)[0] + "-")
    meta.pop("resourceVersion", None)
    spec = dict(t["spec"], nodeName=p.node_name)
    web = dict(t["spec"]["containers"][0],
               ports=[{"name": cp.name, "containerPort": cp.port, "protocol": cp.protocol.value} for cp in p.ports])
    spec["containers"] = [web, t["spec"]["containers"][1]]
    out = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    if with_status:
        ips = [str(ip) for ip in p.ips]
        out["status"] = dict(t["status"], podIP=ips[0], podIPs=[{"ip": ip} for ip in ips])
    else:
        out["status"] = {"phase": "Pending", "qosClass": "Burstable"}
    return out


# --- bulk load into etcd ------------------------------------------------------------


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def etcd_put_all(etcd_url: str, items: list[tuple[str, bytes]], threads: int = 4) -> None:
    """Puts through etcd's v3 JSON gateway, TXN_OPS keys a transaction, a few in flight."""
    host, port = etcd_url.split("//", 1)[1].split(":")
    local = threading.local()

    def txn(batch: list[tuple[str, bytes]]) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        body = json.dumps({"success": [{"requestPut": {"key": _b64(k), "value": _b64(v)}} for k, v in batch]})
        conn.request("POST", "/v3/kv/txn", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200 or b'"succeeded":true' not in data.replace(b" ", b""):
            raise RuntimeError(f"etcd txn failed: {r.status} {data[:300]!r}")

    batches = [items[i:i + TXN_OPS] for i in range(0, len(items), TXN_OPS)]
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        for f in concurrent.futures.as_completed([ex.submit(txn, b) for b in batches]):
            f.result()


# --- the API server over plain HTTP ---------------------------------------------------


class Api:
    """Minimal keep-alive HTTPS client (bearer token) for the changes and the checks."""

    def __init__(self, server: str, ca: Path) -> None:
        self.host, port = server.split("//", 1)[1].split(":")
        self.port = int(port)
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.conn: http.client.HTTPSConnection | None = None

    def call(self, method: str, path: str, body: dict | None = None, ctype: str = "application/json"):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=60)
            try:
                self.conn.request(method, path, json.dumps(body) if body is not None else None,
                                  {"Authorization": f"Bearer {kc.TOKEN}", "Content-Type": ctype,
                                   "Accept": "application/json"})
                r = self.conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException):
                self.conn = None
                if attempt:
                    raise
                continue
            if r.status >= 300:
                raise RuntimeError(f"{method} {path}: {r.status} {data[:400]!r}")
            return json.loads(data) if data else None
        raise AssertionError("unreachable")


# --- measurements -------------------------------------------------------------------


def rss_of(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_process_run(kubeconfig: Path, work: Path, node_ns: str, backend: str, settle: float, tag: str) -> dict:
    """`policy-agent run` from process start to /readyz 200; its RSS; stopped (rules stay)."""
    port = _free_port()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "POLICY_AGENT_METRICS_PORT": str(port),
           "POLICY_AGENT_FLOW_LOG_FILE": str(work / f"flows-{tag}.jsonl"), "HOME": str(work)}
    cmd = [sys.executable, "-m", "policy_agent.cli", "--log-format", "json", "run", "--node", w.NODE,
           "--netns", node_ns, "--kubeconfig", str(kubeconfig), "--iptables-backend", backend,
           "--endpoint-dir", str(work / "ep"), "--status-dir", str(work / "st"),
           "--state-file", str(work / "dataplane-state.json")]
    log_path = work / f"agent-{tag}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    try:
        ready_s = None
        peak_during = 0.0
        while time.monotonic() - t0 < 900:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited {proc.returncode}: {log_path.read_text()[-3000:]}")
            peak_during = max(peak_during, rss_of(proc.pid).get("VmHWM", 0.0))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        ready_s = time.monotonic() - t0
                        break
            except OSError:
                pass
            time.sleep(0.1)
        if ready_s is None:
            raise RuntimeError("agent not ready within 900 s")
        at_ready = rss_of(proc.pid)
        time.sleep(settle)
        settled = rss_of(proc.pid)
        events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        by_event = {e.get("event"): e for e in events}
        return {"ready_s": round(ready_s, 2), "rss_at_ready_mb": at_ready.get("VmRSS"),
                "rss_after_settle_mb": settled.get("VmRSS"), "peak_rss_mb": settled.get("VmHWM"),
                "settle_s": settle,
                "first_apply_s": (by_event.get("agent_ready") or {}).get("apply_seconds"),
                "gc_frozen_objects": (by_event.get("gc_frozen") or {}).get("objects")}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def informer_child(kubeconfig: Path, n: int, mode: str) -> dict:
    res: dict = {"list_mode": mode}
    for trace in (False, True):
        out = subprocess.run([sys.executable, str(HERE / "informer_memory.py"), "--child-informer", str(kubeconfig),
                              "--pods", str(n), "--list-mode", mode] + (["--trace"] if trace else []),
                             check=True, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
        r = json.loads(out.strip().splitlines()[-1])
        res.update({k: v for k, v in r.items() if trace == ("traced" in k)})
    res["retained_bytes_per_pod"] = round(res["retained_traced_mb"] * 2**20 / max(res["pods"], 1))
    res["rss_growth_bytes_per_pod"] = round(res["rss_growth_mb"] * 2**20 / max(res["pods"], 1))
    return res


class Waiter:
    """on_enforced callbacks with the time they came, so the driver can wait for the next."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: list[tuple[str, float, float]] = []

    def __call__(self, kind: str, seconds: float) -> None:
        with self.cond:
            self.seen.append((kind, seconds, time.monotonic()))
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.seen)

    def wait_after(self, mark: int, timeout: float = 60.0) -> tuple[str, float, float]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.seen) > mark, timeout):
                raise TimeoutError("change not enforced in time")
            return self.seen[mark]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def latency_run(cl, api: Api, node_ns: str, backend: str, events: int, gap: float, n_next: int,
                workload_pods: list[Pod], refresh_interval: float = 30.0) -> dict:
    from policy_agent.agent import Agent
    from policy_agent.commands.run import KubeAdapter
    from policy_agent.compiler.options import NodeConfig
    from policy_agent.dataplane.apply import Dataplane

    waiter = Waiter()
    agent = Agent(NodeConfig(w.NODE), Dataplane(netns=node_ns, backend=backend),
                  [KubeAdapter(str(cl.kubeconfig), False, node=w.NODE)], on_enforced=waiter,
                  refresh_interval=refresh_interval)
    t0 = time.monotonic()
    agent.start()
    try:
        if not agent.wait_ready(900):
            raise RuntimeError("in-process agent not ready")
        ready_s = time.monotonic() - t0
        results: dict[str, list[float]] = {}
        agent_side: dict[str, list[float]] = {}
        api_side: dict[str, list[float]] = {}  # request sent -> response read

        def one(kind: str, fn) -> None:
            time.sleep(gap)
            m = waiter.mark()
            t = time.monotonic()
            fn()
            answered = time.monotonic()  # the API server's response: its write is done
            _, own, at = waiter.wait_after(m)
            results.setdefault(kind, []).append(at - t)
            agent_side.setdefault(kind, []).append(own)
            api_side.setdefault(kind, []).append(answered - t)

        def settle() -> None:  # the create's own event, not timed
            time.sleep(gap)

        n_ns = len(workload_pods) // w.PODS_PER_NS  # at 2k pods there are only 100 namespaces
        rng_ns = [f"ns-{i:03d}" for i in range(0, min(2 * events, n_ns), 2)]
        made: list[tuple[str, str]] = []
        for e in range(events):
            for where, node in (("local", w.NODE), ("remote", "node-7")):
                ns = rng_ns[e % len(rng_ns)]
                n_next += 1
                p = w.pod_obj(ns, e % w.PODS_PER_NS, n_next, node, name=f"new-{where}-{e}")
                body = pod_json(p, n_next, with_status=False)
                del body["metadata"]["uid"]
                m = waiter.mark()
                api.call("POST", f"/api/v1/namespaces/{ns}/pods", body)
                waiter.wait_after(m)
                settle()
                status = pod_json(p, n_next)["status"]
                one(f"{where}_pod_gets_address", lambda ns=ns, p=p, status=status: api.call(
                    "PATCH", f"/api/v1/namespaces/{ns}/pods/{p.name}/status", {"status": status},
                    "application/merge-patch+json"))
                if where == "local":
                    made.append((ns, p.name))
        # label changes: existing local and remote pods, app moves to the next value
        pods = {(p.namespace, p.name): p for p in workload_pods}
        local = sorted(k for k, p in pods.items() if p.node_name == w.NODE)
        remote = sorted(k for k, p in pods.items() if p.node_name != w.NODE)
        for e in range(events):
            for where, keys in (("local", local), ("remote", remote)):
                ns, name = keys[(e * 37) % len(keys)]
                cur = pods[(ns, name)]  # a change must change something, or the informer drops it
                app = f"app-{(int(cur.labels['app'].split('-')[1]) + 1) % w.APPS}"
                pods[(ns, name)] = Pod(cur.namespace, cur.name, Labels({**cur.labels, "app": app}), cur.node_name,
                                       cur.ips, cur.ports)
                one(f"{where}_pod_label_change", lambda ns=ns, name=name, app=app: api.call(
                    "PATCH", f"/api/v1/namespaces/{ns}/pods/{name}", {"metadata": {"labels": {"app": app}}},
                    "application/merge-patch+json"))
        # policy add selecting a local pod
        for e in range(events):
            ns, name = local[e % len(local)]
            pol = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": f"bench-{e}", "namespace": ns},
                   "spec": {"podSelector": {"matchLabels": {"pod-template-hash": pods[(ns, name)].labels[
                       "pod-template-hash"]}},
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "monitor"}}}],
                                         "ports": [{"protocol": "TCP", "port": 7000 + e}]}]}}
            one("policy_add", lambda ns=ns, pol=pol: api.call(
                "POST", f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", pol))
        # namespace label change (team: moves its pods between namespace-selector sets)
        team = {f"ns-{i:03d}": i % 25 for i in range(len(workload_pods) // w.PODS_PER_NS)}  # bench/workload.py
        for e in range(events):
            ns = f"ns-{(e * 13) % len(team):03d}"
            team[ns] = (team[ns] + 1 + e % 24) % 25
            one("namespace_label_change", lambda ns=ns, t=team[ns]: api.call(
                "PATCH", f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {"team": f"t{t}"}}},
                "application/merge-patch+json"))
        # local pod delete (the pods added above)
        for ns, name in made:
            one("local_pod_delete", lambda ns=ns, name=name: api.call(
                "DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", {"gracePeriodSeconds": 0}))
        st = agent.status()
        return {
            "in_process_ready_s": round(ready_s, 2),
            "counts": st["counts"],
            "refresh_interval_s": refresh_interval,
            "drift_checks": agent.metrics.refreshes._value.get(),
            "run_s": round(time.monotonic() - t0 - ready_s, 1),
            "latency_ms": {k: {"n": len(v), "p50": round(pct(v, 0.5) * 1e3, 1), "p99": round(pct(v, 0.99) * 1e3, 1),
                               "max": round(max(v) * 1e3, 1), "mean": round(statistics.mean(v) * 1e3, 1)}
                           for k, v in results.items()},
            "agent_side_ms": {k: {"p50": round(pct(v, 0.5) * 1e3, 1), "p99": round(pct(v, 0.99) * 1e3, 1)}
                              for k, v in agent_side.items()},
            "api_response_ms": {k: {"p50": round(pct(v, 0.5) * 1e3, 1), "p99": round(pct(v, 0.99) * 1e3, 1)}
                                for k, v in api_side.items()},
            "rss_mb_agent_plus_driver": rss_of(os.getpid()),
        }
    finally:
        agent.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=50_000)
    ap.add_argument("--events", type=int, default=200, help="changes per kind")
    ap.add_argument("--gap", type=float, default=0.1, help="pause between changes (s)")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds after ready before the RSS is read again")
    ap.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    ap.add_argument("--refresh-interval", type=float, default=30.0,
                    help="the agent's drift check period during the latency run (its default: 30 s)")
    ap.add_argument("--kube-bin", default="", help="directory with kube-apiserver (default: the test suite's cache)")
    ap.add_argument("--parts", default="restart,informer,latency")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (etcd, kube-apiserver, network namespaces)")
    from policy_agent import logs
    from policy_agent.lab import netns

    logs.configure("console", "warning")
    parts = set(args.parts.split(","))
    bin_dir = Path(args.kube_bin) if args.kube_bin else kc.CACHE
    if not (bin_dir / "kube-apiserver").exists():
        sys.exit(f"no kube-apiserver in {bin_dir} (scripts/build-kube.sh builds it; or --kube-bin)")
    out: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "loadavg_at_start": os.getloadavg(),
                 "machine": f"{os.cpu_count()} cpus, {im_cpu()}, {platform.platform()}",
                 "server": f"kube-apiserver 1.20.2 + etcd (local), {bin_dir}"}
    work = Path(tempfile.mkdtemp(prefix="pa-kube-scale-"))
    local = kc.LocalCluster(work, bin_dir)
    node_ns = None
    try:
        local.make_pki()
        local.start_etcd()
        namespaces, pods, pols = w.cluster(args.pods)
        t0 = time.monotonic()
        items: list[tuple[str, bytes]] = []
        for i, ns in enumerate(namespaces):
            items.append((f"/registry/namespaces/{ns.name}", json.dumps(namespace_json(ns.name, dict(ns.labels), i)).encode()))
        for i, p in enumerate(pods):
            items.append((f"/registry/pods/{p.namespace}/{p.name}", json.dumps(pod_json(p, i)).encode()))
        for i, p in enumerate(pols):
            items.append((f"/registry/networkpolicies/{p.namespace}/{p.name}", json.dumps(policy_json(p, i)).encode()))
        render_s = time.monotonic() - t0
        nbytes = sum(len(v) for _, v in items)
        t0 = time.monotonic()
        etcd_put_all(local.etcd_url, items)
        put_s = time.monotonic() - t0
        del items
        t0 = time.monotonic()
        local.start_apiserver()
        api_start_s = time.monotonic() - t0
        kubeconfig = work / "kubeconfig"
        kc._write_kubeconfig(kubeconfig, local.server, work / "pki" / "server.crt")
        cl = kc.Cluster(kubeconfig, str(bin_dir / "kubectl"), local.server, "", local)
        api = Api(local.server, work / "pki" / "server.crt")
        last = pods[-1]
        t0 = time.monotonic()
        kc._wait(lambda: api.call("GET", f"/api/v1/namespaces/{last.namespace}/pods?resourceVersion=0&"
                                         f"fieldSelector=metadata.name%3D{last.name}")["items"], 900,
                 "the watch cache to hold the last pod", interval=1.0)
        cache_s = time.monotonic() - t0
        out["load"] = {"namespaces": len(namespaces), "pods": len(pods), "policies": len(pols),
                       "local_pods": sum(p.node_name == w.NODE for p in pods), "json_mb": round(nbytes / 2**20, 1),
                       "pod_json_bytes": len(json.dumps(pod_json(pods[0], 0))),
                       "render_s": round(render_s, 1), "etcd_put_s": round(put_s, 1),
                       "etcd_put_objects_per_s": round(len(namespaces + pods + pols) / put_s),
                       "apiserver_start_s": round(api_start_s, 1), "watch_cache_filled_s": round(cache_s, 1)}
        print(json.dumps({"load": out["load"]}), flush=True)
        node_ns = netns.unique_name("kscale", "node")
        netns.create(node_ns)
        if "restart" in parts:
            out["agent_process"] = {}
            for tag in ("cold", "restart"):
                out["loadavg_before_" + tag] = os.getloadavg()
                r = agent_process_run(kubeconfig, work, node_ns, args.backend, args.settle, tag)
                out["agent_process"][tag] = r
                print(json.dumps({tag: r}), flush=True)
        if "informer" in parts:
            out["informer"] = {}
            for mode in ("cache", "pages"):
                r = informer_child(kubeconfig, len(pods), mode)
                out["informer"][mode] = r
                print(json.dumps({"informer": r}), flush=True)
        if "latency" in parts:
            out["loadavg_before_latency"] = os.getloadavg()
            r = latency_run(cl, api, node_ns, args.backend, args.events, args.gap, len(pods) + 1000, pods,
                            args.refresh_interval)
            out["agent_in_process"] = r
            print(json.dumps({"latency": r}), flush=True)
        out["loadavg_at_end"] = os.getloadavg()
        text = json.dumps(out, indent=1)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
        return 0
    finally:
        if node_ns is not None:
            netns.delete(node_ns)
        local.stop()
        shutil.rmtree(work, ignore_errors=True)


def im_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
