"""Prometheus metrics of one agent, in its own registry (tests run several agents in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

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
        self.last_apply = Gauge(
            "policy_agent_last_apply_timestamp_seconds", "Unix time of the last successful apply", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
