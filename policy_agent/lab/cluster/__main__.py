"""`python -m policy_agent.lab.cluster up|down|status` (scripts/cluster.sh wraps it).

A real Kubernetes 1.20 cluster on this machine, in network namespaces (see --help and
docs/cluster.md). `up` prints the admin kubeconfig path as its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from policy_agent.lab.cluster import control, network, state

REPO = Path(__file__).resolve().parents[3]
DEFAULT_WORK = "/var/lib/policy-agent-cluster"
DS_NAMESPACE = "policy-agent-system"
DAEMONSETS = ("policy-agent", "vpcip-ipamd")
APT_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "etcd-server", "openssl", "iptables",
                "ipset", "conntrack", "iproute2", "util-linux")
# Root-namespace /proc/sys values that must be the same after a run (kubelet and
# kube-proxy write some of them unless the node's mount namespace masks them).
SYSCTL_TREES = ("kernel", "vm", "fs", "net/core", "net/ipv4", "net/ipv6/conf/all", "net/netfilter", "net/bridge")
SYSCTL_VOLATILE = ("kernel/ns_last_pid", "kernel/random/", "kernel/pty/nr", "fs/dentry-state", "fs/inode-nr",
                   "fs/inode-state", "fs/file-nr", "fs/aio-nr", "fs/quota/", "net/netfilter/nf_conntrack_count")

HELP = f"""\
A real Kubernetes 1.20 cluster on this machine: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler in one network namespace, and N nodes (containerd + kubelet + kube-proxy,
each in its own network and mount namespace), with the project's manifests applied
(`kubectl apply -f manifests/ -f manifests/shim/`).

Network namespaces (enter one with `nsenter --net=/run/netns/NAME`; for a node's files and
containerd socket also its mount namespace: `status` prints the command):
  {network.VPC_NS:<16} the "VPC" router (10.240.0.1 on every link)
  {network.CTL_NS:<16} the control plane, 10.240.0.2 (kube-apiserver :6443, etcd 127.0.0.1:2379)
  {network.node_ns(1):<16} node-1, 10.240.1.10, pods 10.240.1.32-95
  {network.node_ns(2):<16} node-2, 10.240.2.10, pods 10.240.2.32-95 (and so on)
Service CIDR {network.SERVICE_CIDR} (kubernetes = {control.KUBERNETES_SVC_IP}).

The API server is reachable from the root namespace through a forwarder on 127.0.0.1
(the kubeconfig `up` prints, <work>/admin.kubeconfig). Everything made is recorded in
<work>/state.json before use; `down` removes it, also after a crash.
"""


def _say(msg: str) -> None:
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


class UpError(RuntimeError):
    pass


# --- prerequisites ---------------------------------------------------------------------


def ensure_apt() -> None:
    q = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Status}\n", *APT_PACKAGES],
                       capture_output=True, text=True)
    installed = {ln.split()[0] for ln in q.stdout.splitlines() if ln.endswith(" installed")}
    missing = [p for p in APT_PACKAGES if p not in installed]
    if not missing:
        return
    _say(f"installing {' '.join(missing)} (apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        p = subprocess.run(argv, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise UpError(f"{' '.join(argv[:2])} failed: {p.stderr.strip()[-1500:]}")


def _script_dir(script: str, what: str) -> Path:
    path = REPO / "scripts" / script
    if not path.exists():
        raise UpError(f"{what}: scripts/{script} does not exist yet; it must print the {what} directory")
    p = subprocess.run(["bash", str(path)], stdout=subprocess.PIPE, text=True)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines or not Path(lines[-1]).is_dir():
        raise UpError(f"{what}: `bash scripts/{script}` failed (exit {p.returncode}; output {p.stdout.strip()[-300:]!r})")
    return Path(lines[-1])


def kube_bin_dir() -> Path:
    d = _script_dir("build-kube.sh", "kube binaries")
    need = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy")
    missing = [b for b in need if not (d / b).exists()]
    if missing:
        raise UpError(f"kube binaries: {d} lacks {', '.join(missing)}")
    return d


def image_archives(given: str | None = None) -> tuple[Path, ...]:
    d = Path(given) if given else _script_dir("build-images.sh", "images")
    try:
        names = json.loads((d / "images.json").read_text())
    except (OSError, ValueError) as exc:
        raise UpError(f"images: {d}/images.json unreadable: {exc}") from None
    archives = tuple(d / f for f in names)
    missing = [str(a) for a in archives if not a.exists()]
    if missing:
        raise UpError(f"images: {d}/images.json names missing archives: {', '.join(missing)}")
    return archives


def sysctl_snapshot() -> dict:
    out = {}
    for tree in SYSCTL_TREES:
        for d, _dirs, files in os.walk(f"/proc/sys/{tree}"):
            for f in files:
                p = os.path.join(d, f)
                key = p[len("/proc/sys/"):]
                if key.startswith(SYSCTL_VOLATILE):
                    continue
                try:
                    with open(p) as h:
                        out[key] = h.read()
                except OSError:
                    pass
    return out


def sysctl_changes(before: dict) -> list[str]:
    after = sysctl_snapshot()
    return [f"{k}: {before[k].strip()!r} -> {after[k].strip()!r}" for k in before if k in after and after[k] != before[k]]


# --- kubectl -----------------------------------------------------------------------------


def kubectl(kube_bin: Path, kubeconfig: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(kube_bin / "kubectl"), "--kubeconfig", str(kubeconfig), "--request-timeout=20s", *args],
                          capture_output=True, text=True, timeout=timeout)


def diagnostics(kube_bin: Path, kubeconfig: Path) -> str:
    parts = []
    for args in (("get", "nodes", "-o", "wide"), ("get", "pods", "-A", "-o", "wide"),
                 ("get", "ds", "-A"), ("get", "events", "-A", "--sort-by=.lastTimestamp")):
        try:
            p = kubectl(kube_bin, kubeconfig, *args, timeout=30)
            out = p.stdout if p.returncode == 0 else p.stderr
        except subprocess.TimeoutExpired:
            out = "(timed out)"
        lines = out.strip().splitlines()
        parts.append(f"$ kubectl {' '.join(args)}\n" + "\n".join(lines[-40:]))
    return "\n\n".join(parts)


def _apply_retrying(kube_bin: Path, kubeconfig: Path, what: str, *args: str) -> None:
    """kubectl ``args``, retried while the API server finishes its bootstrap."""
    deadline = time.monotonic() + 60
    while True:
        p = kubectl(kube_bin, kubeconfig, *args)
        if p.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise UpError(f"{what} failed: {p.stderr.strip()[-2000:]}")
        time.sleep(1)


def apply_manifests(kube_bin: Path, kubeconfig: Path) -> None:
    """Exactly as docs/install.md says: the ClusterNetworkPolicy CRD first (this API server,
    1.20, does not serve it), then `kubectl apply -f manifests/ -f manifests/shim/`."""
    crd = "crd/clusternetworkpolicies.policy.networking.k8s.io"
    if kubectl(kube_bin, kubeconfig, "get", crd).returncode != 0:
        _apply_retrying(kube_bin, kubeconfig, "kubectl apply -f manifests/crd/",
                        "apply", "-f", str(REPO / "manifests" / "crd"))
        _apply_retrying(kube_bin, kubeconfig, f"kubectl wait --for condition=established {crd}",
                        "wait", "--for", "condition=established", "--timeout=30s", crd)
    _apply_retrying(kube_bin, kubeconfig, "kubectl apply -f manifests/ -f manifests/shim/",
                    "apply", "-f", str(REPO / "manifests"), "-f", str(REPO / "manifests" / "shim"))


def wait_daemonsets(kube_bin: Path, kubeconfig: Path, nodes: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        p = kubectl(kube_bin, kubeconfig, "-n", DS_NAMESPACE, "get", "ds", "-o", "json")
        if p.returncode == 0:
            items = {d["metadata"]["name"]: d.get("status", {}) for d in json.loads(p.stdout)["items"]}
            state_ = {n: (items.get(n, {}).get("numberReady", 0), items.get(n, {}).get("desiredNumberScheduled", 0),
                          items.get(n, {}).get("updatedNumberScheduled", 0)) for n in DAEMONSETS}
            last = ", ".join(f"{n} ready {r}/{d}" for n, (r, d, _u) in state_.items())
            if all(r == d == u == nodes for r, d, u in state_.values()):
                return
        else:
            last = p.stderr.strip()
        if time.monotonic() > deadline:
            raise UpError(f"timed out after {timeout:.0f}s waiting for DaemonSets {', '.join(DAEMONSETS)} ready on "
                          f"{nodes} node(s) ({last})\n\n{diagnostics(kube_bin, kubeconfig)}")
        time.sleep(1)


# --- up / down / status --------------------------------------------------------------------


def _check_free(st: state.State) -> None:
    if st.exists():
        raise UpError(f"a cluster is already up in {st.work} (state.json exists); run `scripts/cluster.sh down` first")
    from policy_agent.lab import netns

    taken = netns.list_names(network.PREFIX)
    if taken:
        raise UpError(f"network namespaces {', '.join(taken)} exist but are not in {st.path}: another cluster "
                      "(another --work?) is up; run `scripts/cluster.sh down --work <its dir>`")
    # Node cgroups outlive the namespaces during a `down`: one may still be running.
    cgroups = sorted(str(p) for p in Path(state.CGROUP_ROOT).glob(f"*/{network.PREFIX}*"))
    if cgroups:
        raise UpError(f"cgroups {', '.join(cgroups[:3])} exist: another cluster is up or being taken down; "
                      "wait for it, or run `scripts/cluster.sh down --work <its dir>`")


def up(args) -> int:
    work = Path(args.work)
    timings: dict = {}
    t_all = time.monotonic()
    with state.locked(work, "up"):
        st = state.State(work)
        _check_free(st)
        names = [network.node_name(i) for i in range(1, args.nodes + 1)]
        t = time.monotonic()
        ensure_apt()
        kube_bin = kube_bin_dir()
        archives = image_archives(args.images) if args.nodes else ()
        timings["prerequisites"] = time.monotonic() - t
        node_mod = None
        if args.nodes:
            try:
                from policy_agent.lab.cluster import node as node_mod
            except ImportError as exc:
                raise UpError(f"nodes: policy_agent/lab/cluster/node.py cannot be imported ({exc}); "
                              "use --nodes 0 for the control plane alone") from None
        before = sysctl_snapshot()
        (work / "sysctl-before.json").parent.mkdir(parents=True, exist_ok=True)
        st.record("info", {"work": str(work), "nodes": args.nodes, "kube_bin": str(kube_bin),
                           "started": time.time(), "pid": os.getpid()})
        (work / "sysctl-before.json").write_text(json.dumps(before))
        cp = None
        threads: list[threading.Thread] = []
        try:
            t = time.monotonic()
            cp = control.prepare(work, kube_bin, names)
            timings["pki"] = time.monotonic() - t
            t = time.monotonic()
            network.build(args.nodes, st.record)
            timings["network"] = time.monotonic() - t
            t = time.monotonic()
            control.start(cp, st.record)
            st.record("info", {"kubeconfig": str(cp.admin_kubeconfig), "forward_port": cp.forward_port,
                               "server": cp.server})
            node_errors: dict = {}
            if args.nodes:
                threads = [threading.Thread(target=_start_node, args=(node_mod, st, cp, archives, i, node_errors),
                                            name=f"start-{network.node_name(i)}") for i in range(1, args.nodes + 1)]
                for th in threads:
                    th.start()
            ready = control.wait_ready(cp, ("kube-apiserver",), timeout=args.timeout)
            control.start_controllers(cp, st.record)
            if not args.no_manifests:
                apply_manifests(kube_bin, cp.admin_kubeconfig)
            ready.update(control.wait_ready(cp, ("kube-controller-manager", "kube-scheduler"), timeout=args.timeout))
            timings["control_plane"] = time.monotonic() - t
            _say(f"control plane ready ({', '.join(f'{k} {v}s' for k, v in ready.items())})")
            for th in threads:
                th.join()
            timings["nodes_started"] = time.monotonic() - t
            if node_errors:
                raise UpError("; ".join(f"{n}: {e}" for n, e in sorted(node_errors.items())))
            if not args.no_manifests:
                wait_daemonsets(kube_bin, cp.admin_kubeconfig, args.nodes, args.timeout)
                timings["daemonsets_ready"] = time.monotonic() - t
            changed = sysctl_changes(before)
            if changed:
                raise UpError("the machine's sysctls changed during up (must never happen): " + "; ".join(changed))
        except BaseException as exc:
            if isinstance(exc, (UpError, control.ControlError, state.StateError, RuntimeError, OSError,
                                subprocess.SubprocessError, ValueError)):
                _say(f"up failed: {exc}")
                if cp is not None and not isinstance(exc, UpError) and cp.forward_port:
                    _say("cluster state:\n" + diagnostics(kube_bin, cp.admin_kubeconfig))
            else:
                _say(f"up interrupted: {exc!r}")
            # A node still starting would race the teardown: let it finish (it cannot be cancelled).
            for th in threads:
                th.join()
            if args.keep_on_failure:
                _say(f"left running for inspection (--keep-on-failure); remove with: scripts/cluster.sh down --work {work}")
            else:
                _say("removing what was made")
                errors: list[str] = []
                _teardown(st, errors)
                if errors:
                    _say("teardown errors (state.json kept):\n  " + "\n  ".join(errors))
                else:
                    (work / ".lock").unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        work.rmdir()
            if isinstance(exc, KeyboardInterrupt):
                raise
            return 1
    timings["total"] = time.monotonic() - t_all
    _say("up in " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    st.record("info", {"up_seconds": {k: round(v, 1) for k, v in timings.items()}})
    print(cp.admin_kubeconfig)
    return 0


def _start_node(node_mod, st: state.State, cp: control.ControlPlane, archives, i: int, errors: dict) -> None:
    name = network.node_name(i)
    try:
        spec = node_mod.NodeSpec(
            name=name, netns=network.node_ns(i), node_ip=network.node_ip(i),
            work=cp.work / "nodes" / name, kube_bin=cp.kube_bin,
            kubelet_kubeconfig=cp.ctl_kubeconfigs[f"kubelet-{name}"],
            proxy_kubeconfig=cp.ctl_kubeconfigs["kube-proxy"], ca_file=cp.pki.ca,
            cluster_cidr=network.VPC_CIDR, service_cidr=network.SERVICE_CIDR,
            pool_json=network.pool_json(i), image_archives=tuple(archives))
        t = time.monotonic()
        node_state = node_mod.start_node(spec, st.record)
        st.record("node", node_state)
        _say(f"{name} started in {time.monotonic() - t:.1f}s")
    except Exception as exc:  # noqa: BLE001 - reported by up with every other node's error
        errors[name] = f"start_node failed: {exc}"


def _stop_node_fn():
    try:
        from policy_agent.lab.cluster import node as node_mod
    except ImportError:
        return None
    return node_mod.stop_node


def _teardown(st: state.State, errors: list[str]) -> None:
    state.teardown(st, _stop_node_fn() if st.values("node") else None, errors)
    work = st.work
    # The work area itself: everything but the state file and the lock, then those too if clean.
    t = time.monotonic()
    if work.is_dir():
        for child in work.iterdir():
            if child.name in ("state.json", ".lock"):
                continue
            try:
                state.remove_path(str(child))
            except Exception as exc:  # noqa: BLE001 - reported at the end
                errors.append(f"path {child}: {exc}")
    _say(f"work area emptied in {time.monotonic() - t:.1f}s")
    if not errors:
        st.path.unlink(missing_ok=True)


def down(args) -> int:
    work = Path(args.work)
    t = time.monotonic()
    if not work.exists():
        _say(f"nothing to remove ({work} does not exist)")
        return 0
    with state.locked(work, "down"):
        st = state.State(work)
        before = None
        try:
            before = json.loads((work / "sysctl-before.json").read_text())
        except (OSError, ValueError):
            pass
        errors: list[str] = []
        _teardown(st, errors)
        changed = sysctl_changes(before) if before is not None else []
    if not errors:
        for f in (work / ".lock",):
            f.unlink(missing_ok=True)
        try:
            work.rmdir()
        except OSError:
            pass
    from policy_agent.lab import netns

    stray = netns.list_names(network.PREFIX)
    if stray:
        _say(f"note: network namespaces {', '.join(stray)} remain; they are not in {st.path} (another --work?)")
    if errors:
        _say("down finished with errors (state.json kept; run down again after fixing):\n  " + "\n  ".join(errors))
        return 1
    _say(f"down in {time.monotonic() - t:.1f}s")
    if changed:
        _say("ERROR: the machine's sysctls differ from before `up` (must never happen): " + "; ".join(changed))
        return 1
    return 0


def status(args) -> int:
    work = Path(args.work)
    st = state.State(work)
    if not st.exists():
        print(f"no cluster in {work}")
        return 1
    info = st.info()
    print(f"work: {work}")
    for k in ("nodes", "kubeconfig", "server", "up_seconds"):
        if k in info:
            print(f"{k}: {info[k]}")
    from policy_agent.lab import netns

    print("network namespaces:")
    for name in st.values("netns"):
        print(f"  {name:<16} {'present' if netns.exists(name) else 'MISSING'}")
    print("processes:")
    for p in st.values("pid"):
        up_ = state.pid_alive(p["pid"], p.get("start"))
        print(f"  {p['pid']:>8} {p.get('name') or '?':<28} {'running' if up_ else 'EXITED'}")
    nodes = st.values("node")
    if nodes:
        print("nodes:")
        stop_mod = None
        try:
            from policy_agent.lab.cluster import node as stop_mod
        except ImportError:
            pass
        for ns_ in nodes:
            enter = " ".join(stop_mod.node_exec_argv(ns_)) if stop_mod else "?"
            print(f"  {ns_.get('name', '?'):<8} enter: {enter}")
    kc = info.get("kubeconfig")
    if kc and Path(kc).exists() and info.get("kube_bin"):
        p = kubectl(Path(info["kube_bin"]), Path(kc), "get", "nodes", "-o", "wide", timeout=30)
        print(p.stdout.rstrip() or p.stderr.rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cluster.sh", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{up,down,status}")
    work_default = os.environ.get("POLICY_AGENT_CLUSTER_WORK", DEFAULT_WORK)
    p_up = sub.add_parser("up", help="build what is missing, start the cluster, print the kubeconfig path")
    p_up.add_argument("--nodes", type=int, default=2, help="number of nodes (0: control plane only); default 2")
    p_up.add_argument("--work", default=work_default, help=f"work area (default {work_default})")
    p_up.add_argument("--timeout", type=float, default=300.0, help="seconds per wait (default 300)")
    p_up.add_argument("--images", default=os.environ.get("POLICY_AGENT_CLUSTER_IMAGES"),
                      help="use this images directory (images.json + tars) instead of running scripts/build-images.sh")
    p_up.add_argument("--no-manifests", action="store_true", help="do not apply manifests/crd/, manifests/ and manifests/shim/")
    p_up.add_argument("--keep-on-failure", action="store_true", help="leave a failed cluster up for inspection")
    p_down = sub.add_parser("down", help="remove everything <work>/state.json records")
    p_down.add_argument("--work", default=work_default)
    p_st = sub.add_parser("status", help="what is running")
    p_st.add_argument("--work", default=work_default)
    p_fw = sub.add_parser("forward")  # internal: the root-loopback forwarder process
    p_fw.add_argument("--fd", type=int, required=True)
    p_fw.add_argument("--netns", required=True)
    p_fw.add_argument("--to", required=True)
    args = ap.parse_args(argv)
    from policy_agent import logs

    # stderr only: stdout of `up` ends with the kubeconfig path, which scripts read.
    logs.configure("console", os.environ.get("POLICY_AGENT_CLUSTER_LOG_LEVEL", "info"))
    if args.cmd == "forward":
        control.serve_forwarder(args.fd, args.netns, args.to)
        return 0
    if os.geteuid() != 0:
        _say("needs root (network namespaces, mounts, cgroups)")
        return 2
    if args.cmd == "up" and not 0 <= args.nodes <= network.MAX_NODES:
        ap.error(f"--nodes: {args.nodes} is out of range (0-{network.MAX_NODES})")
    try:
        return {"up": up, "down": down, "status": status}[args.cmd](args)
    except (UpError, state.StateError) as exc:
        _say(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
