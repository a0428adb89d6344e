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

    def __init__(self, kubeconfig: str, in_cluster: bool) -> None:
        self.kubeconfig = kubeconfig
        self.in_cluster = in_cluster
        self._src: Any = None

    def start(self, sink) -> None:
        from policy_agent.sources.kube import KubeSource, api_client_from_config

        api = api_client_from_config(self.kubeconfig or None, in_cluster=not self.kubeconfig and self.in_cluster)
        self._src = KubeSource(sink, api, source=self.name).start()

    def stop(self) -> None:
        if self._src is not None:
            self._src.close()


def build_sources(cfg: config_mod.Config) -> list:
    from policy_agent.sources.cni import CniSource
    from policy_agent.sources.manifests import ManifestSource

    sources: list = []
    if cfg.kube_enabled:
        sources.append(KubeAdapter(cfg.kubeconfig, cfg.in_cluster))
    if cfg.manifests:
        sources.append(ManifestSource(cfg.manifests))
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
    )


def run(cfg: config_mod.Config, stop: threading.Event) -> int:
    from policy_agent.obs.server import ObsServer

    agent = build_agent(cfg)
    try:
        server = ObsServer(agent, cfg.metrics_bind, cfg.metrics_port)
    except OSError as exc:
        log.error("obs_server_failed", bind=cfg.metrics_bind, port=cfg.metrics_port, error=str(exc))
        return 1
    server.start()
    log.info("agent_starting", node=cfg.node, netns=cfg.netns or None, manifests=cfg.manifests or None,
             kube=cfg.kube_enabled, endpoint_dir=cfg.endpoint_dir, status=server.url + "/status")
    try:
        agent.start()
        stop.wait()
        log.info("agent_stopping", reason="signal")
    finally:
        agent.stop()
        server.stop()
    log.info("agent_exit", note="rules left in place and enforcing")
    return 0


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
