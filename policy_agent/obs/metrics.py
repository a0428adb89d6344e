"""Prometheus metrics of one agent, in its own registry (tests run several agents in one process)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# Label values of policy_agent_policies_degraded (bounded; no object names).
DEGRADED_MODES = ("last_good", "fallback")

# Applies are milliseconds to seconds; event-to-enforced should stay below 100 ms.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.apply_duration = Histogram(
            "policy_agent_apply_duration_seconds", "Time of one compile+apply to the kernel",
            registry=r, buckets=_LATENCY_BUCKETS,
        )
        self.compile_duration = Histogram(
            "policy_agent_compile_duration_seconds", "Time to compute the desired state of one apply",
            registry=r, buckets=_LATENCY_BUCKETS,
        )
        self.event_to_enforced = Histogram(
            "policy_agent_event_to_enforced_seconds",
            "From a source event received to the kernel commit that enforces it",
            ["kind"], registry=r, buckets=_LATENCY_BUCKETS,
        )
        self.applies = Counter("policy_agent_applies_total", "Applies to the kernel", ["reason"], registry=r)
        self.refreshes = Counter("policy_agent_refreshes_total", "Kernel read-backs (drift repair)", registry=r)
        self.errors = Counter(
            "policy_agent_errors_total", "Errors by where they happened", ["stage", "source"], registry=r
        )
        self.watch_restarts = Counter(
            "policy_agent_watch_restarts_total", "Relists/reconnects of a source after its first sync",
            ["source"], registry=r,
        )
        self.events = Counter("policy_agent_events_total", "Source events received", ["source", "type"], registry=r)
        self.rules = Gauge("policy_agent_rules_programmed", "Rules in our chains", ["family"], registry=r)
        self.chains = Gauge("policy_agent_chains_programmed", "Our chains", ["family"], registry=r)
        self.ipsets = Gauge("policy_agent_ipsets_programmed", "Our ipsets", registry=r)
        self.ipset_members = Gauge("policy_agent_ipset_members_programmed", "Members of our ipsets", registry=r)
        self.endpoints = Gauge("policy_agent_local_endpoints", "Local pod endpoints with rules", registry=r)
        self.in_sync = Gauge("policy_agent_in_sync", "1 when every source reported its initial state", registry=r)
        self.ready = Gauge(
            "policy_agent_ready", "1 after the first apply in sync while applies are not failing (/readyz)", registry=r
        )
        self.apply_failures = Gauge(
            "policy_agent_apply_consecutive_failures", "Applies that failed in a row (0 after a success)", registry=r
        )
        self.last_apply_error = Info("policy_agent_last_apply_error", "Error of the last failed apply", registry=r)
        self.observed_generation = Gauge(
            "policy_agent_observed_generation", "Store changes accepted so far", registry=r
        )
        self.applied_generation = Gauge(
            "policy_agent_applied_generation", "observed_generation covered by the last successful apply", registry=r
        )
        self.pending = Gauge("policy_agent_pending_events", "Events received but not yet enforced", registry=r)
        self.policies_degraded = Gauge(
            "policy_agent_policies_degraded",
            "NetworkPolicies and ClusterNetworkPolicies that cannot be parsed, enforced from their last good "
            "version (mode=last_good) or as a stand-in (mode=fallback: a NetworkPolicy's no-allow fallback, "
            "a ClusterNetworkPolicy's deny-all stand-in)",
            ["mode"], registry=r,
        )
        for mode in DEGRADED_MODES:
            self.policies_degraded.labels(mode).set(0)
        self.set_aside = Gauge(
            "policy_agent_dataplane_set_aside_objects",
            "Objects the kernel refused that the dataplane set aside (old version kept or absent; the rest applied)",
            ["kind"], registry=r,
        )
        for kind in ("chain", "ipset", "member"):  # bounded: these three kinds only
            self.set_aside.labels(kind).set(0)
        self.last_apply = Gauge(
            "policy_agent_last_apply_timestamp_seconds", "Unix time of the last successful apply", registry=r
        )

        # Labels: reason only (POD_IP_REJECT_REASONS), never pod names: bounded cardinality.
        self.pod_ip_rejected = Counter(
            "policy_agent_pod_ip_rejected_total",
            "Pod addresses left out at the edge (each pod/address/reason counted once until it changes)",
            ["reason"], registry=r,
        )

        # Flow verdict logs (obs/flowlog.py): only what the kernel's rate limit let through
        # to the log is counted. Cardinality: verdict x direction (4 series); the drop
        # counters go through BoundedLabel: at most flow_metrics_max_labels policies per
        # tier (3 tiers) and as many namespaces, each plus "other".
        self.flow_verdicts = Counter(
            "policy_agent_flow_verdicts_total", "Flow verdicts logged (new connections; rate-limited in the kernel)",
            ["verdict", "direction"], registry=r,
        )
        self.flow_log_lost = Counter(
            "policy_agent_flow_log_lost_total",
            "Times the kernel dropped flow log messages because the agent's socket buffer was full", registry=r,
        )
        self.flow_denied_by_policy = Counter(
            "policy_agent_flow_denied_by_policy_total",
            "Logged denials by deciding policy: tier admin/baseline (ClusterNetworkPolicy name) or networkpolicy "
            "(no policy allowed it: counted once for each NetworkPolicy isolating the pod)",
            ["tier", "policy"], registry=r,
        )
        self.flow_denied_by_namespace = Counter(
            "policy_agent_flow_denied_by_namespace_total",
            "Logged denials by the namespace of the pod whose policy denied (ingress: destination, egress: source)",
            ["namespace"], registry=r,
        )

    def watch_degraded_policies(self, sources) -> None:
        """policy_agent_policies_degraded{mode} reads the sources' optional
        ``degraded_policies() -> {mode: count}`` at scrape time (summed over sources)."""

        def count(mode: str) -> float:
            total = 0
            for s in sources:
                fn = getattr(s, "degraded_policies", None)
                if fn is None:
                    continue
                try:
                    total += int(fn().get(mode, 0))
                except Exception:  # noqa: BLE001 - a scrape must not fail on one source
                    continue
            return total

        for mode in DEGRADED_MODES:
            self.policies_degraded.labels(mode).set_function(lambda m=mode: count(m))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BoundedLabel:
    """The first ``limit`` distinct values keep their own label, every later one is
    ``other``: a label's series count never exceeds limit + 1 (thread-safe)."""

    OTHER = "other"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self.limit:
                return self.OTHER
            self._seen.add(value)
            return value
