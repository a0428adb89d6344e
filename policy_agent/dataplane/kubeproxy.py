"""kube-proxy modes that change where service traffic crosses the filter table.

In IPVS mode, service traffic to a backend pod on this node is rewritten in
LOCAL_IN and leaves through OUTPUT, not FORWARD; our OUTPUT chain returns for
pod interfaces (node-to-pod is not policed), so the backend's ingress policy
would be skipped. The agent refuses to start there (docs/decisions/kube-proxy-modes.md).
iptables and nftables modes DNAT in PREROUTING/OUTPUT, before our FORWARD chain,
and need nothing from us.

Read-only: looks up one link by name and reads /proc; writes nothing.
"""

from __future__ import annotations

import socket

from policy_agent.shared.netns import in_netns

IPVS_LINK = "kube-ipvs0"  # the dummy link kube-proxy creates in IPVS mode for service VIPs
_IPVS_PROC = "/proc/thread-self/net/ip_vs"  # thread-self: the netns this thread entered
_IPVS_PROTOCOLS = ("TCP", "UDP", "SCTP", "FWM")


class KubeProxyModeError(RuntimeError):
    """kube-proxy runs in a mode under which this agent cannot enforce policy."""


def ipvs_virtual_services(text: str) -> int:
    """Virtual services listed in /proc/net/ip_vs text (header lines and real servers skipped)."""
    return sum(1 for line in text.splitlines() if line.split(" ", 1)[0] in _IPVS_PROTOCOLS)


def ipvs_findings(netns: str | None = None) -> list[str]:
    """What shows kube-proxy IPVS mode in ``netns`` (None: this namespace); empty if nothing."""
    found: list[str] = []
    with in_netns(netns):
        try:
            socket.if_nametoindex(IPVS_LINK)  # resolved in this thread's (entered) namespace
        except OSError:
            pass
        else:
            found.append(f"a link named {IPVS_LINK} exists (kube-proxy creates it in IPVS mode)")
        try:
            with open(_IPVS_PROC, encoding="ascii", errors="replace") as f:
                services = ipvs_virtual_services(f.read())
        except OSError:  # no ip_vs module, or not readable: nothing to learn here
            services = 0
        if services:
            found.append(f"/proc/net/ip_vs lists {services} IPVS virtual service(s)")
    return found


def check_not_ipvs(netns: str | None = None) -> None:
    """Raise KubeProxyModeError naming what was found, why it matters and what to do."""
    found = ipvs_findings(netns)
    if not found:
        return
    where = f"network namespace {netns}" if netns else "this network namespace"
    raise KubeProxyModeError(
        f"kube-proxy IPVS mode detected in {where}: {'; '.join(found)}. "
        "Refusing to start: in IPVS mode, service traffic to a backend pod on this node is delivered "
        "through the OUTPUT chain instead of FORWARD, where this agent does not apply the backend's "
        "ingress policy, so NetworkPolicy would be skipped for service traffic. "
        "Run kube-proxy in iptables or nftables mode (--proxy-mode=iptables or nftables) and remove "
        f"the IPVS leftovers (`kube-proxy --cleanup` deletes {IPVS_LINK} and the IPVS services), "
        "then start the agent again."
    )
