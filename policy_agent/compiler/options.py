"""Compiler inputs that are not Kubernetes objects: which node, which prefix, which marks."""

from __future__ import annotations

from dataclasses import dataclass

from policy_agent.shared.naming import DEFAULT_IFACE_PREFIX, validate_iface_prefix

# Marks used by others: 0x80 (AWS VPC CNI connmark), 0xc000 (kube-proxy masq/drop).
RESERVED_MARK_BITS = 0x80 | 0xC000
DEFAULT_MARK_MASK = 0xFFFF0000  # Calico's default; disjoint from the above
ENDPOINT_TO_HOST_ACTIONS = ("RETURN", "ACCEPT", "DROP")


DEFAULT_FLOW_LOG_GROUP = 30210  # NFLOG group of flow verdicts (ulogd and others default to 0-2)


@dataclass(frozen=True)
class FlowLogOptions:
    """Which verdicts get an NFLOG rule, and its kernel rate limits (docs/decisions/flow-logs.md)."""

    group: int = DEFAULT_FLOW_LOG_GROUP
    deny: bool = True  # denied new connections
    allow: bool = False  # allowed new connections (a rule per allow rule: more rules)
    rate: int = 100  # log lines per second for the node, per verdict and family
    burst: int = 200
    per_source_rate: int = 20  # per source address; 0 = no per-source limit
    per_source_burst: int = 50

    def __post_init__(self) -> None:
        if not 0 <= self.group <= 65535:
            raise ValueError(f"flow log group must be 0-65535, not {self.group}")
        if self.rate < 1 or self.burst < 1:
            raise ValueError(f"flow log rate and burst must be >= 1 (got {self.rate}/s burst {self.burst})")
        if self.per_source_rate < 0 or (self.per_source_rate and self.per_source_burst < 1):
            raise ValueError(
                f"flow log per-source rate must be >= 0 and its burst >= 1 (got {self.per_source_rate}/s burst "
                f"{self.per_source_burst})")

    @property
    def enabled(self) -> bool:
        return self.deny or self.allow


@dataclass(frozen=True)
class NodeConfig:
    node_name: str
    iface_prefix: str = DEFAULT_IFACE_PREFIX
    mark_mask: int = DEFAULT_MARK_MASK
    deny_action: str = "DROP"  # or "REJECT"
    # Traffic a pod sends to its own node, once the pod's egress policy allowed it:
    # RETURN to the host's own INPUT rules (host firewall, kube-proxy's KUBE-FIREWALL),
    # ACCEPT at once (Calico's k8s default; skips the host's rules) or DROP.
    endpoint_to_host_action: str = "RETURN"
    ipv6: bool = True
    # NFLOG rules at the verdicts (None: none; the agent's settings turn deny logging on).
    flow_log: FlowLogOptions | None = None

    def __post_init__(self) -> None:
        validate_iface_prefix(self.iface_prefix)
        if self.mark_mask & RESERVED_MARK_BITS:
            raise ValueError(f"mark mask {self.mark_mask:#x} overlaps bits used by the AWS CNI/kube-proxy (0x80, 0xc000)")
        if bin(self.mark_mask).count("1") < 2:
            raise ValueError(f"mark mask {self.mark_mask:#x} needs at least 2 bits")
        if self.deny_action not in ("DROP", "REJECT"):
            raise ValueError(f"deny_action must be DROP or REJECT, not {self.deny_action!r}")
        if self.endpoint_to_host_action not in ENDPOINT_TO_HOST_ACTIONS:
            raise ValueError(
                f"endpoint_to_host_action must be one of {', '.join(ENDPOINT_TO_HOST_ACTIONS)}, "
                f"not {self.endpoint_to_host_action!r}"
            )

    def _bits(self) -> tuple[int, ...]:
        # Read for every rule built: computed once per config (frozen, so stored aside).
        bits = self.__dict__.get("_mark_bits")
        if bits is None:
            bits = tuple(1 << i for i in range(32) if self.mark_mask & (1 << i))
            object.__setattr__(self, "_mark_bits", bits)
        return bits

    @property
    def accept_mark(self) -> int:
        """Set by an allowing egress/ingress verdict; the final accept needs it."""
        return self._bits()[0]

    @property
    def scratch_mark(self) -> int:
        return self._bits()[1]
