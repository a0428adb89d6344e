"""Compiler inputs that are not Kubernetes objects: which node, which prefix, which marks."""

from __future__ import annotations

from dataclasses import dataclass

from policy_agent.shared.naming import DEFAULT_IFACE_PREFIX, validate_iface_prefix

# Marks used by others: 0x80 (AWS VPC CNI connmark), 0xc000 (kube-proxy masq/drop).
RESERVED_MARK_BITS = 0x80 | 0xC000
DEFAULT_MARK_MASK = 0xFFFF0000  # Calico's default; disjoint from the above


@dataclass(frozen=True)
class NodeConfig:
    node_name: str
    iface_prefix: str = DEFAULT_IFACE_PREFIX
    mark_mask: int = DEFAULT_MARK_MASK
    deny_action: str = "DROP"  # or "REJECT"
    # Traffic a pod sends to its own node: after the pod's egress policy,
    # ACCEPT (Calico's k8s default) or DROP.
    endpoint_to_host_action: str = "ACCEPT"
    ipv6: bool = True

    def __post_init__(self) -> None:
        validate_iface_prefix(self.iface_prefix)
        if self.mark_mask & RESERVED_MARK_BITS:
            raise ValueError(f"mark mask {self.mark_mask:#x} overlaps bits used by the AWS CNI/kube-proxy (0x80, 0xc000)")
        if bin(self.mark_mask).count("1") < 2:
            raise ValueError(f"mark mask {self.mark_mask:#x} needs at least 2 bits")
        if self.deny_action not in ("DROP", "REJECT"):
            raise ValueError(f"deny_action must be DROP or REJECT, not {self.deny_action!r}")
        if self.endpoint_to_host_action not in ("ACCEPT", "DROP"):
            raise ValueError(f"endpoint_to_host_action must be ACCEPT or DROP, not {self.endpoint_to_host_action!r}")

    def _bits(self) -> list[int]:
        return [1 << i for i in range(32) if self.mark_mask & (1 << i)]

    @property
    def accept_mark(self) -> int:
        """Set by an allowing egress/ingress verdict; the final accept needs it."""
        return self._bits()[0]

    @property
    def scratch_mark(self) -> int:
        return self._bits()[1]
