"""The cluster tier's handle on a running `scripts/cluster.sh` cluster: kubectl, the nodes'
namespaces, workload Deployments, and probes made with `kubectl exec` from test pods
(the workload image's `probe-many`: one exec per source pod probes a whole matrix row)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from policy_agent.lab.cluster import node as node_mod
from policy_agent.lab.cluster import state as state_mod

REPO = Path(__file__).resolve().parents[2]
DEFAULT_KUBE_DIR = Path("/var/cache/policy-agent/kube-1.20.2")
WORKLOAD_IMAGE = "registry.example.com/policy-agent-workload:test"
AGENT_NS = "policy-agent-system"
DAEMONSETS = ("policy-agent", "vpcip-ipamd")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
# A pod's address range on node-<i> (docs/cluster.md): the pool file's secondary IPs.
POOL_FIRST, POOL_LAST = 32, 95


class KubectlError(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    proto: str  # "TCP" or "UDP"

    def as_json(self) -> dict:
        return {"host": self.host, "port": self.port, "proto": self.proto.lower()}


@dataclass
class Node:
    name: str  # "node-1"
    index: int
    netns: str
    state: dict  # what node.start_node returned (state.json "node" record)

    @property
    def root(self) -> Path:
        """The node's own files as seen from the root namespace (cluster-node contract)."""
        return Path(self.state["work"]) / "root"

    def argv(self, *cmd: str) -> list[str]:
        return [*node_mod.node_exec_argv(self.state), *cmd]

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-800:]}")
        return p

    def pool(self) -> list[str]:
        return [f"10.240.{self.index}.{i}" for i in range(POOL_FIRST, POOL_LAST + 1)]

    def ipam_state(self) -> dict:
        """vpcip-ipamd's checkpoint on this node (hostPath /var/run/vpcip-ipam/ipam.json)."""
        return json.loads(self.run("cat", "/var/run/vpcip-ipam/ipam.json").stdout)


@dataclass
class Pod:
    namespace: str
    name: str
    ip: str
    node: str
    labels: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Cluster:
    work: Path
    kubeconfig: Path
    kubectl_path: Path
    nodes: list[Node]
    up_seconds: float | None = None

    @classmethod
    def from_work(cls, work: Path) -> "Cluster":
        st = state_mod.State(work)
        info = st.info()
        kube_bin = Path(info.get("kube_bin") or DEFAULT_KUBE_DIR)
        nodes = []
        for ns in st.values("node"):
            nodes.append(Node(ns["name"], int(ns["name"].rsplit("-", 1)[1]), ns["netns"], ns))
        nodes.sort(key=lambda n: n.index)
        return cls(Path(work), Path(info["kubeconfig"]), kube_bin / "kubectl", nodes)

    # --- kubectl ---------------------------------------------------------------------

    def kubectl_argv(self, *args: str) -> list[str]:
        return [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args]

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60,
                check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(self.kubectl_argv("--request-timeout=30s", *args), input=input, capture_output=True,
                           text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-1500:]}")
        return p

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def apply(self, objs: Iterable[dict]) -> None:
        objs = list(objs)
        if objs:
            self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))

    def delete(self, objs: Iterable[dict], wait: bool = True) -> None:
        objs = [{"apiVersion": o.get("apiVersion", "v1"), "kind": o["kind"], "metadata": o["metadata"]} for o in objs]
        if objs:
            self.kubectl("delete", "--ignore-not-found", f"--wait={'true' if wait else 'false'}", "-f", "-",
                         input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}), timeout=180)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # --- pods ------------------------------------------------------------------------

    def pods(self, namespace: str, selector: str | None = None) -> list[dict]:
        args = ["pods", "-n", namespace] + (["-l", selector] if selector else [])
        return self.get(*args)["items"]

    def ready_pods(self, namespace: str, selector: str | None = None) -> list[Pod]:
        return [to_pod(p) for p in self.pods(namespace, selector) if is_ready(p)]

    def exec(self, pod: Pod | tuple[str, str], *cmd: str, timeout: float = 60, input: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        ns, name = (pod.namespace, pod.name) if isinstance(pod, Pod) else pod
        return self.kubectl("exec", *(["-i"] if input is not None else []), "-n", ns, name, "--", *cmd,
                            input=input, timeout=timeout, check=check)

    def agent_pod(self, node: str, ds: str = "policy-agent") -> dict:
        pods = [p for p in self.pods(AGENT_NS, f"app.kubernetes.io/name={ds}")
                if p["spec"].get("nodeName") == node and not p["metadata"].get("deletionTimestamp")]
        if not pods:
            raise RuntimeError(f"no {ds} pod on {node}")
        return pods[0]


def is_ready(pod: dict) -> bool:
    if pod["metadata"].get("deletionTimestamp") or pod.get("status", {}).get("phase") != "Running":
        return False
    conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    return conds.get("Ready") == "True" and bool(pod["status"].get("podIP"))


def to_pod(pod: dict) -> Pod:
    return Pod(pod["metadata"]["namespace"], pod["metadata"]["name"], pod["status"].get("podIP", ""),
               pod["spec"].get("nodeName", ""), dict(pod["metadata"].get("labels") or {}))


def wait_for(what: str, fn: Callable[[], object], timeout: float, interval: float = 0.5):
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = fn()
        except (KubectlError, subprocess.TimeoutExpired) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"[:3000])
        time.sleep(interval)


# --- workload objects ---------------------------------------------------------------------


def namespace(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}}



def fresh_namespace(cluster: Cluster, name: str, labels: dict | None = None) -> str:
    """Delete ``name`` if an earlier run left it, create it, and wait until its default
    ServiceAccount exists (pods created before it are refused)."""
    cluster.kubectl("delete", "namespace", "--ignore-not-found", name, timeout=300)
    cluster.apply([namespace(name, labels)])
    wait_for(f"ServiceAccount default in {name}",
             lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0, 60)
    return name

def workload_pod_spec(ports: Iterable[tuple[int, str]] = ((80, "TCP"), (80, "UDP"), (81, "TCP"), (81, "UDP")),
                      node: str | None = None, spread: str | None = None) -> dict:
    """The workload container serving ``ports`` with upstream's port names (serve-80-tcp...)."""
    ports = list(ports)
    tcp = sorted({p for p, proto in ports if proto == "TCP"})
    udp = sorted({p for p, proto in ports if proto == "UDP"})
    spec: dict = {
        "terminationGracePeriodSeconds": 2,
        "enableServiceLinks": False,
        "containers": [{
            "name": "workload",
            "image": WORKLOAD_IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "args": ["serve"],
            "env": [{"name": "WORKLOAD_TCP_PORTS", "value": ",".join(map(str, tcp))},
                    {"name": "WORKLOAD_UDP_PORTS", "value": ",".join(map(str, udp))}],
            "ports": [{"containerPort": p, "protocol": proto, "name": f"serve-{p}-{proto.lower()}"}
                      for p, proto in ports],
            # From the node to its own pods is never policed (kubelet probes), so Ready
            # means "serving" whatever policy selects the pod.
            "readinessProbe": {"tcpSocket": {"port": tcp[0]}, "periodSeconds": 1, "failureThreshold": 3}
            if tcp else None,
        }],
    }
    if spec["containers"][0]["readinessProbe"] is None:
        del spec["containers"][0]["readinessProbe"]
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    if spread:
        # Deployments of one group spread evenly over the nodes, placed by the scheduler.
        spec["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                              "whenUnsatisfiable": "DoNotSchedule",
                                              "labelSelector": {"matchLabels": {"spread": spread}}}]
    return spec


def deployment(ns: str, name: str, labels: dict, replicas: int = 1, **spec_args) -> dict:
    labels = dict(labels)
    if spec_args.get("spread"):
        labels["spread"] = spec_args["spread"]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {k: v for k, v in labels.items() if k != "spread"}},
            "template": {"metadata": {"labels": labels}, "spec": workload_pod_spec(**spec_args)},
        },
    }


def bare_pod(ns: str, name: str, labels: dict, **spec_args) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "name": name, "labels": dict(labels)},
            "spec": workload_pod_spec(**spec_args)}


def wait_deployments(cluster: Cluster, deployments: list[dict], timeout: float = 180) -> dict[tuple[str, str], Pod]:
    """{(ns, deployment name): its one Ready pod} once every Deployment has exactly one."""
    def ready():
        out = {}
        by_ns: dict[str, list[dict]] = {}
        for d in deployments:
            by_ns.setdefault(d["metadata"]["namespace"], []).append(d)
        for ns, ds in by_ns.items():
            pods = cluster.pods(ns)
            for d in ds:
                sel = d["spec"]["selector"]["matchLabels"]
                mine = [p for p in pods if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in sel.items())
                        and not p["metadata"].get("deletionTimestamp")]
                if len(mine) != d["spec"]["replicas"] or not all(is_ready(p) for p in mine):
                    return None
                out[(ns, d["metadata"]["name"])] = to_pod(mine[0])
        return out
    return wait_for(f"{len(deployments)} Deployment(s) ready", ready, timeout, interval=1.0)


def in_pool(cluster: Cluster, pod: Pod) -> bool:
    return pod.ip in cluster.node(pod.node).pool()


# --- probes (kubectl exec into the source pod) ----------------------------------------


class ExecFailed(RuntimeError):
    pass


def probe_row(cluster: Cluster, src: Pod, targets: list[Target], timeout: float = 1.0,
              attempts: int = 3) -> list[tuple[bool, str]]:
    """Probe every target from ``src`` with one `kubectl exec ... workload probe-many`.

    An exec that fails (the API server or kubelet busy) is retried: it says nothing about the
    dataplane. A probe's own failure is a result, never retried here."""
    arg = json.dumps([t.as_json() for t in targets], separators=(",", ":"))
    err = ""
    for attempt in range(attempts):
        try:
            p = cluster.exec(src, "workload", "probe-many", "--timeout", str(timeout), arg,
                             timeout=30 + timeout * 2, check=False)
        except subprocess.TimeoutExpired:
            err = "kubectl exec timed out"
            continue
        if p.returncode == 0:
            try:
                results = json.loads(p.stdout.strip().splitlines()[-1])["results"]
                return [(bool(r["ok"]), r.get("error", "")) for r in results]
            except (ValueError, KeyError, IndexError):
                err = f"unreadable probe-many output {p.stdout[-300:]!r}"
        else:
            err = p.stderr.strip()[-500:]
        time.sleep(0.5 * (attempt + 1))
    raise ExecFailed(f"kubectl exec {src.ref} workload probe-many failed {attempts} times: {err}")


def probe_rows(cluster: Cluster, rows: dict, timeout: float = 1.0) -> dict:
    """{key: (src Pod, [Target])} -> {key: [(ok, error)]}, one exec per row, rows in parallel."""
    out: dict = {}
    errors: dict = {}

    def run(key, src, targets):
        try:
            out[key] = probe_row(cluster, src, targets, timeout)
        except Exception as exc:  # noqa: BLE001 - re-raised below with every row's error
            errors[key] = exc

    threads = [threading.Thread(target=run, args=(k, s, t)) for k, (s, t) in rows.items() if t]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise ExecFailed("; ".join(f"{k}: {e}" for k, e in errors.items()))
    return out


class ProbeLoop:
    """Continuous probing from one pod: `kubectl exec -i ... probe-many --repeat` prints a JSON
    line per round until the test closes stdin (stop()), so a round costs no exec."""

    def __init__(self, cluster: Cluster, src: Pod, targets: list[Target], interval: float = 0.3,
                 timeout: float = 1.0, max_seconds: float = 600) -> None:
        self.src, self.targets = src, targets
        arg = json.dumps([t.as_json() for t in targets], separators=(",", ":"))
        self.proc = subprocess.Popen(
            cluster.kubectl_argv("exec", "-i", "-n", src.namespace, src.name, "--", "workload", "probe-many",
                                 "--repeat", "--interval", str(interval), "--timeout", str(timeout),
                                 "--max-seconds", str(max_seconds), arg),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.rounds: list[tuple[float, list[tuple[bool, str]]]] = []
        self.garbage: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                d = json.loads(line)
                self.rounds.append((float(d["t"]), [(bool(r["ok"]), r.get("error", "")) for r in d["results"]]))
            except (ValueError, KeyError):
                self.garbage.append(line.rstrip())

    def wait_rounds(self, n: int, timeout: float = 60) -> None:
        wait_for(f"{n} probe rounds from {self.src.ref}", lambda: len(self.rounds) >= n or self.proc.poll() is not None,
                 timeout, interval=0.2)
        if len(self.rounds) < n:
            raise ExecFailed(f"probe loop in {self.src.ref} ended early: {self.stderr()}")

    def stop(self, timeout: float = 30) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own kubectl, by its Popen handle
            self.proc.wait()
        self._reader.join(timeout=10)

    def stderr(self) -> str:
        return (self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else "")[-800:]
