"""The agent's root-only status socket is where `kubectl exec ... policy-agent status` and
root on the node can reach it, and the DaemonSet opts into nothing wider."""

from __future__ import annotations

from manifest_util import container, covered, find, host_mounts


def _agent_env() -> dict[str, str]:
    c = container(find("DaemonSet", "policy-agent"), "policy-agent")
    env = {e["name"]: e.get("value") for e in c.get("env") or []}
    env.update(find("ConfigMap", "policy-agent-config").get("data") or {})
    return env


def test_status_socket_is_on_a_host_path_mounted_at_the_same_place():
    from policy_agent.obs.server import status_socket_path

    env = _agent_env()
    path = status_socket_path(env.get("POLICY_AGENT_STATUS_SOCKET", ""), env.get("POLICY_AGENT_NETNS", ""))
    # The same path inside the container (exec) and on the node (root's shell).
    assert covered(path, host_mounts(find("DaemonSet", "policy-agent"), "policy-agent"))


def test_status_stays_off_tcp_in_the_shipped_config():
    assert _agent_env().get("POLICY_AGENT_STATUS_OVER_TCP", "false").lower() in ("false", "0", "no", "off")
