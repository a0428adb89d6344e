"""`policy-agent run`: the node agent. Sources -> store -> compile -> kernel, until SIGTERM.

Configuration comes from flags, then POLICY_AGENT_* environment variables, then
a YAML config file (--config), then defaults (see policy_agent.config). On
SIGTERM or SIGINT the agent stops its sources and loop and exits 0, leaving the
rules in the kernel enforcing: the next start replaces them atomically.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

import structlog

from policy_agent import config as config_mod

log = structlog.get_logger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run the node agent", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_mod.add_arguments(p)
    p.set_defaults(func=main)


class KubeAdapter:
    """Gives policy_agent.sources.kube.KubeSource the agent's source shape (start(sink)/stop())."""

    name = "kube"

    def __init__(self, kubeconfig: str, in_cluster: bool, pod_ip_policy: Any = None, *, node: str = "",
                 events: bool = False) -> None:
        self.kubeconfig = kubeconfig
        self.in_cluster = in_cluster
        self.pod_ip_policy = pod_ip_policy
        self.node = node
        self.events = events
        self.set_aside: Any = None  # callable -> the agent's set-aside list (run() wires it)
        self.recorder: Any = None
        self._src: Any = None

    def start(self, sink) -> None:
        from policy_agent.sources.kube import KubeSource, api_client_from_config

        api = api_client_from_config(self.kubeconfig or None, in_cluster=not self.kubeconfig and self.in_cluster)
        if self.events:
            from policy_agent.obs.kube_events import EventRecorder

            self.recorder = EventRecorder(api, self.node, set_aside=self.set_aside).start()
            inner, recorder = sink, self.recorder

            def sink(ev) -> None:  # Events on unparseable policies; never blocks the informer
                recorder.observe(ev)
                inner(ev)

        self._src = KubeSource(sink, api, source=self.name, pod_ip_policy=self.pod_ip_policy).start()

    def stop(self) -> None:
        if self._src is not None:
            self._src.close()
        if self.recorder is not None:
            self.recorder.stop()

    def degraded_policies(self) -> dict[str, int]:
        """Unparseable (Cluster)NetworkPolicies enforced from their last good version / as a fallback."""
        return self._src.degraded_policies() if self._src is not None else {}


def build_sources(cfg: config_mod.Config) -> list:
    from policy_agent.sources.cni import CniSource
    from policy_agent.sources.manifests import ManifestSource

    sources: list = []
    ip_policy = cfg.pod_ip_policy()
    if cfg.kube_enabled:
        kubeconfig, in_cluster = cfg.kube_client_source()  # --kubeconfig > in-cluster > $KUBECONFIG > ~/.kube/config
        sources.append(KubeAdapter(kubeconfig or "", in_cluster, ip_policy, node=cfg.node, events=cfg.kube_events))
    if cfg.manifests:
        sources.append(ManifestSource(cfg.manifests, pod_ip_policy=ip_policy))
    sources.append(CniSource(cfg.endpoint_dir))
    if cfg.link_monitor:
        from policy_agent.sources.links import LinkSource

        sources.append(LinkSource(cfg.iface_prefix, netns=cfg.netns))
    return sources


def build_agent(cfg: config_mod.Config, dataplane: Any = None, sources: list | None = None):
    from policy_agent.agent import Agent

    if dataplane is None:
        from policy_agent.dataplane.apply import Dataplane, default_state_path

        dataplane = Dataplane(
            netns=cfg.netns or None,
            backend=cfg.iptables_backend,
            state_path=cfg.state_file or default_state_path(cfg.netns or None),
            families=(4, 6) if cfg.ipv6 else (4,),
        )
    return Agent(
        cfg.node_config(),
        dataplane,
        build_sources(cfg) if sources is None else sources,
        status_dir=cfg.status_dir,
        min_interval=cfg.min_apply_interval,
        max_interval=cfg.max_apply_interval,
        refresh_interval=cfg.refresh_interval,
        unready_failures=cfg.unready_failures,
        unready_after=cfg.unready_after,
        pod_ip_policy=cfg.pod_ip_policy(),
    )


KUBE_PROXY_RECHECK = 10.0  # seconds between kube-proxy mode checks (at most the refresh interval)


def refuse_unsupported_kube_proxy(cfg: config_mod.Config) -> str | None:
    """The error to exit with when kube-proxy runs in IPVS mode where our dataplane lives.

    Checked before anything is written (enforcement would be wrong from the first
    packet: docs/decisions/kube-proxy-modes.md), and again every refresh interval while
    running: on a booting node kube-proxy may create kube-ipvs0 after we started (found
    in review). No setting overrides it.
    """
    from policy_agent.dataplane.kubeproxy import KubeProxyModeError, check_not_ipvs

    try:
        check_not_ipvs(cfg.netns or None)
    except KubeProxyModeError as exc:
        log.error("kube_proxy_ipvs_refused", netns=cfg.netns or None, error=str(exc))
        return str(exc)
    except OSError as exc:
        log.error("kube_proxy_mode_check_failed", netns=cfg.netns or None, error=str(exc))
        return f"cannot check the kube-proxy mode in network namespace {cfg.netns or '(own)'}: {exc}"
    return None


def run(cfg: config_mod.Config, stop: threading.Event) -> int:
    from policy_agent.obs.server import ObsServer, status_socket_path

    refused = refuse_unsupported_kube_proxy(cfg)
    if refused is not None:
        print(f"policy-agent run: {refused}", file=sys.stderr)
        return 1
    agent = build_agent(cfg)
    for s in agent.sources:
        if isinstance(s, KubeAdapter):  # Events also for policies whose chain the kernel refused
            s.set_aside = lambda: agent.set_aside
    try:
        sock = status_socket_path(cfg.status_socket, cfg.netns)
        server = ObsServer(agent, cfg.metrics_bind, cfg.metrics_port, socket_path=sock,
                           status_over_tcp=cfg.status_over_tcp)
    except (OSError, ValueError) as exc:
        log.error("obs_server_failed", bind=cfg.metrics_bind, port=cfg.metrics_port, socket=cfg.status_socket or None,
                  error=str(exc))
        return 1
    server.start()
    from policy_agent.obs import flowlog

    flows = flowlog.start(cfg, agent)  # its own thread; None when off or not possible
    log.info("agent_starting", node=cfg.node, netns=cfg.netns or None, manifests=cfg.manifests or None,
             kube=cfg.kube_enabled, endpoint_dir=cfg.endpoint_dir, status_socket=sock,
             status_url=server.url + "/status" if cfg.status_over_tcp else None)
    code = 0
    recheck = min(KUBE_PROXY_RECHECK, cfg.refresh_interval or KUBE_PROXY_RECHECK)
    try:
        agent.start()
        while not stop.wait(recheck):
            refused = refuse_unsupported_kube_proxy(cfg)
            if refused is not None:
                # Exit non-zero so the DaemonSet shows it; the rules stay (no flush window).
                print(f"policy-agent run: {refused}", file=sys.stderr)
                code = 1
                break
        log.info("agent_stopping", reason="signal" if code == 0 else "kube_proxy_ipvs")
    finally:
        agent.stop()
        server.stop()
        if flows is not None:
            flows.stop()
    log.info("agent_exit", note="rules left in place and enforcing")
    return code


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.from_args(args)
    except config_mod.ConfigError as exc:
        print(f"policy-agent run: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return run(cfg, stop)
