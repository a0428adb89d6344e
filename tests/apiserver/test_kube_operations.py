"""kubectl conventions against the real kube-apiserver: KUBECONFIG, Events, the kubectl plugin.

1. `policy-agent run` with only ``KUBECONFIG`` set (no flag, no POLICY_AGENT_KUBECONFIG, not
   in a cluster) reaches the API server and goes ready; likewise with only ``$HOME/.kube/config``,
   and with ``KUBECONFIG`` a colon-separated list the official loader merges. The dataplane
   runs in a private network namespace.
2. Events: a NetworkPolicy the API server accepts but our parser refuses gets exactly one
   Warning Event naming the field, from the real agent process, and from the informer +
   EventRecorder even after several relists (etcd compaction -> 410 Gone -> relist).
   The manifests' ClusterRole allows create/patch on events and nothing more on them.
3. The kubectl plugin: the real kubectl (built next to kube-apiserver) finds
   ``kubectl-policy_agent`` on PATH, the plugin finds the agent pod on the node through the
   API server (a Pod object with the DaemonSet's labels bound to the node), and prints the
   exact ``kubectl exec`` argv it would run. Exec itself cannot run here: there is no
   kubelet to run containers (that is kubectl's own, tested upstream).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from kube_helpers import apply, namespace_yaml, pod_yaml, set_pod_ips, wait_for

from policy_agent.lab import netns
from policy_agent.obs.server import fetch_status, status_socket_path
from policy_agent.obs.kube_events import EventRecorder
from policy_agent.sources.kube import KubeSource, WatchOptions

pytestmark = [pytest.mark.apiserver, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
MAPPED_EXCEPT = {"cidr": "10.0.0.0/8", "except": ["::ffff:10.1.0.0/112"]}  # accepted by 1.20.2, refused by us
BAD_FIELD = "spec.ingress[0].from[0].ipBlock.except[0]"
FAST = WatchOptions(watch_timeout_min=3, read_grace=3, backoff_initial=0.2, backoff_max=2, list_read_timeout=20)


def _ns(tag: str) -> str:
    return f"pa-ops-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _bad_policy(ns: str, name: str) -> str:
    return json.dumps({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"namespace": ns, "name": name},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [{"ipBlock": MAPPED_EXCEPT}]}]},
    })


def _events(cluster, ns: str, name: str) -> list[dict]:
    items = json.loads(cluster.kubectl("get", "events", "-n", ns, "-o", "json"))["items"]
    return [e for e in items if e["involvedObject"].get("kind") == "NetworkPolicy"
            and e["involvedObject"].get("name") == name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_agent_until_ready(tmp_path: Path, env: dict[str, str], node: str) -> tuple[subprocess.Popen, str, int]:
    """Start `policy-agent run` (dataplane in a fresh netns) with exactly ``env``; wait for /readyz."""
    ns = netns.unique_name("ops", "kc")
    netns.create(ns)
    port = _free_port()
    full_env = {"PATH": os.environ["PATH"], "POLICY_AGENT_METRICS_PORT": str(port),
                "POLICY_AGENT_FLOW_LOG_FILE": str(tmp_path / "flows.jsonl"), **env}
    cmd = [sys.executable, "-m", "policy_agent.cli", "--log-format", "json", "run", "--node", node,
           "--netns", ns, "--endpoint-dir", str(tmp_path / "ep"), "--status-dir", str(tmp_path / "st")]
    log = open(tmp_path / "agent.log", "w")
    proc = subprocess.Popen(cmd, env=full_env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    log.close()

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "agent.log").read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 120, "agent ready")
    except BaseException:
        _stop(proc, ns)
        raise
    return proc, ns, port


def _stop(proc: subprocess.Popen, ns: str) -> None:
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    finally:
        netns.delete(ns)


def _kube_in_sync(ns: str) -> bool:
    s = fetch_status(status_socket_path(netns=ns))
    return s["sources"]["kube"]["in_sync"] and s["ready"]


# --- 1 + 2: KUBECONFIG, and the agent's Event ---------------------------------------------


@pytest.mark.kernel
def test_run_with_only_kubeconfig_env_goes_ready_and_posts_one_event(cluster, tmp_path):
    ns = _ns("env")
    apply(cluster, namespace_yaml(ns), _bad_policy(ns, "db-ingress"))
    home = tmp_path / "home"
    home.mkdir()  # no .kube/config there: KUBECONFIG is the only way to the cluster
    proc, nns, _ = _run_agent_until_ready(tmp_path, {"KUBECONFIG": str(cluster.kubeconfig), "HOME": str(home)},
                                          "node-kc")
    try:
        assert _kube_in_sync(nns)
        wait_for(lambda: _events(cluster, ns, "db-ingress"), 60, "the agent's Event on the unparseable policy")
        [ev] = _events(cluster, ns, "db-ingress")
        assert ev["type"] == "Warning" and ev["reason"] == "PolicyFallback", ev
        assert BAD_FIELD in ev["message"] and "fallback" in ev["message"], ev["message"]
        assert ev["source"] == {"component": "policy-agent", "host": "node-kc"}
        assert ev["involvedObject"]["uid"]
    finally:
        _stop(proc, nns)
    log = (tmp_path / "agent.log").read_text()
    assert '"kube": true' in log or '"kube":true' in log


@pytest.mark.kernel
def test_run_with_only_home_kube_config_goes_ready(cluster, tmp_path):
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    shutil.copy(cluster.kubeconfig, home / ".kube" / "config")
    proc, nns, _ = _run_agent_until_ready(tmp_path, {"HOME": str(home)}, "node-home")
    try:
        assert _kube_in_sync(nns)
    finally:
        _stop(proc, nns)


@pytest.mark.kernel
def test_run_with_a_kubeconfig_list_merged_as_kubectl_does(cluster, tmp_path):
    """KUBECONFIG=a:b where a holds the cluster and context and b the user: only the merge works."""
    kc = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    a = {k: v for k, v in kc.items() if k != "users"}
    b = {"apiVersion": "v1", "kind": "Config", "users": kc["users"]}
    (tmp_path / "a").write_text(yaml.safe_dump(a))
    (tmp_path / "b").write_text(yaml.safe_dump(b))
    env = {"KUBECONFIG": f"{tmp_path / 'a'}:{tmp_path / 'missing'}:{tmp_path / 'b'}", "HOME": str(tmp_path)}
    proc, nns, _ = _run_agent_until_ready(tmp_path, env, "node-list")
    try:
        assert _kube_in_sync(nns)
    finally:
        _stop(proc, nns)


# --- 2: one Event across relists --------------------------------------------------------


def test_unparseable_policy_gets_exactly_one_event_across_relists(cluster):
    if cluster.local is None:
        pytest.skip("needs the local test cluster (etcd compaction forces the relists)")
    ns = _ns("relist")
    apply(cluster, namespace_yaml(ns), _bad_policy(ns, "bad"))
    api = cluster.api_client()
    rec = EventRecorder(api, "node-relist").start()
    seen: list = []

    def sink(ev) -> None:
        rec.observe(ev)
        seen.append(ev)

    src = KubeSource(sink, api, kinds=("NetworkPolicy",), options=FAST).start()
    try:
        assert src.wait_synced(60)
        wait_for(lambda: _events(cluster, ns, "bad"), 60, "the Event")
        for i in range(3):
            before = src.relists
            # Move etcd's revision two past ours (a watch from RV n starts at n+1), then compact.
            apply(cluster, namespace_yaml(f"{ns}-r{i}a"), namespace_yaml(f"{ns}-r{i}b"))
            cluster.local.compact()
            wait_for(lambda b=before: src.relists > b, 90, f"relist {i + 1} (410 Gone after compaction)")
        errors = [e for e in seen if type(e).__name__ == "SourceError" and e.key == (ns, "bad")]
        assert len(errors) >= 4, errors  # the first list and every relist re-reported it...
        evs = _events(cluster, ns, "bad")
        assert len(evs) == 1, evs  # ...and it became one Event
        assert BAD_FIELD in evs[0]["message"] and evs[0]["reason"] == "PolicyFallback"
        # (The recorder also saw other tests' bad policies in the shared cluster: count ours only.)
        assert rec.suppressed >= 3 and rec.dropped == 0
    finally:
        src.close()
        rec.stop()


def test_manifest_cluster_role_allows_create_patch_events_and_no_more(cluster):
    for f in ("00-namespace.yaml", "10-rbac.yaml"):
        cluster.kubectl("apply", "-f", str(REPO / "manifests" / f))
    sa = "system:serviceaccount:policy-agent-system:policy-agent"

    def can(*args: str) -> str:
        return cluster.kubectl("auth", "can-i", *args, "--as", sa, check=False).strip()

    assert can("create", "events", "-n", "default") == "yes"
    assert can("patch", "events", "-n", "default") == "yes"
    for verb in ("get", "list", "watch", "delete", "update"):
        assert can(verb, "events", "-n", "default") == "no", verb
    assert can("create", "networkpolicies", "-n", "default") == "no"


# --- 3: the kubectl plugin ---------------------------------------------------------------


def _daemonset_labels() -> dict[str, str]:
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "30-daemonset.yaml").read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    return ds["spec"]["template"]["metadata"]["labels"]


def test_kubectl_plugin_finds_the_agent_pod_on_the_node(cluster, tmp_path):
    ns = _ns("plugin")
    labels = _daemonset_labels()
    apply(cluster, namespace_yaml(ns),
          pod_yaml(ns, "policy-agent-aaaaa", labels, node="node-a"),
          pod_yaml(ns, "policy-agent-bbbbb", labels, node="node-b"),
          pod_yaml(ns, "web-on-a", {"app": "web"}, node="node-a"),
          pod_yaml(ns, "policy-agent-ccccc", labels, node="node-c"))
    api = cluster.api_client()
    for pod, ip in (("policy-agent-aaaaa", "10.233.7.1"), ("policy-agent-bbbbb", "10.233.7.2"),
                    ("web-on-a", "10.233.7.3")):
        set_pod_ips(api, ns, pod, ip)  # Running, as a kubelet would report; ccccc stays Pending

    # kubectl finds kubectl-policy_agent on PATH and maps `policy-agent` to it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    plugin = bindir / "kubectl-policy_agent"
    plugin.write_text(f"#!/bin/sh\nexec {sys.executable} -m policy_agent.kubectl_plugin \"$@\"\n")
    plugin.chmod(0o755)
    kubectl_dir = str(Path(cluster.kubectl_bin).parent)
    env = {"PATH": f"{bindir}:{kubectl_dir}:{os.environ['PATH']}", "KUBECONFIG": str(cluster.kubeconfig),
           "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}

    def plugin_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([cluster.kubectl_bin, "policy-agent", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    p = plugin_run("--node", "node-a", "-n", ns, "--print-command", "explain", "--from", "x/a", "--to", "y/b",
                   "--port", "80")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == ["kubectl", "exec", "-n", ns, "policy-agent-aaaaa", "-c", "policy-agent", "--",
                                    "policy-agent", "explain", "--from", "x/a", "--to", "y/b", "--port", "80"]
    p = plugin_run("--node", "node-b", "-n", ns, "--print-command", "dump", "--format", "json")
    assert json.loads(p.stdout)[4:] == ["policy-agent-bbbbb", "-c", "policy-agent", "--", "policy-agent", "dump",
                                        "--format", "json"]
    p = plugin_run("--node", "node-b", "-n", ns, "--print-command", "status")
    assert json.loads(p.stdout)[-2:] == ["policy-agent", "status"]
    p = plugin_run("--node", "node-b", "-n", ns, "--print-command", "flows", "--verdict", "deny")
    assert json.loads(p.stdout)[-4:] == ["policy-agent", "flows", "--verdict", "deny"]
    # No agent pod on the node / not running: a clear error, exit 2.
    p = plugin_run("--node", "node-z", "-n", ns, "status")
    assert p.returncode == 2 and "no policy-agent pod on node 'node-z'" in p.stderr, p.stderr
    p = plugin_run("--node", "node-c", "-n", ns, "status")
    assert p.returncode == 2 and "is not running (policy-agent-ccccc: Pending)" in p.stderr, p.stderr
    # Without --print-command it execs kubectl exec, which reaches the API server and fails
    # there: no kubelet runs the container (the pod exists only as an API object).
    p = plugin_run("--node", "node-a", "-n", ns, "status")
    assert p.returncode != 0 and "policy-agent-aaaaa" not in p.stdout
