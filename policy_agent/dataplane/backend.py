"""Which iptables backend the host uses, decided as Calico's ``IptablesBackend=auto``.

1. If the nft backend's mangle table (v4 or v6) holds kubelet's/kube-proxy's
   ``KUBE-IPTABLES-HINT`` or ``KUBE-KUBELET-CANARY`` chain: nft.
2. Else the same test on legacy: legacy. Legacy is only probed when
   /proc/net/ip_tables_names exists (probing would otherwise load the module).
3. Else whichever holds more rules; legacy wins ties (Calico, iptables-wrappers).
An explicit setting wins; a mismatch with the detected one is logged.
"""

from __future__ import annotations

import structlog

from policy_agent.dataplane.iptables import parse_save
from policy_agent.dataplane.kernel import BACKENDS, binary, legacy_available
from policy_agent.dataplane.runner import Runner

log = structlog.get_logger(__name__)

HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


def _probe(runner: Runner, backend: str) -> tuple[bool, int]:
    hinted, rules = False, 0
    for family in (4, 6):
        rc, out, _ = runner.try_run([binary(backend, family, "save")])
        if rc != 0:
            continue
        tables = parse_save(out)
        mangle = tables.get("mangle")
        if mangle and any(c in mangle.chains for c in HINT_CHAINS):
            hinted = True
        rules += sum(len(c.rules) for t in tables.values() for c in t.chains.values())
    return hinted, rules


def detect_backend(runner: Runner, setting: str = "auto") -> str:
    if setting not in ("auto", *BACKENDS):
        raise ValueError(f"iptables backend setting must be auto, nft or legacy, not {setting!r}")
    nft_hint, nft_rules = _probe(runner, "nft")
    if legacy_available():
        legacy_hint, legacy_rules = _probe(runner, "legacy")
    else:
        legacy_hint, legacy_rules = False, 0
    if nft_hint:
        detected, why = "nft", "hint_chain"
    elif legacy_hint:
        detected, why = "legacy", "hint_chain"
    elif nft_rules > legacy_rules:
        detected, why = "nft", "more_rules"
    elif legacy_available():
        detected, why = "legacy", "more_or_equal_rules"
    else:
        detected, why = "nft", "legacy_not_loaded"
    if setting != "auto":
        if setting != detected:
            log.warning("iptables_backend_mismatch", configured=setting, detected=detected, reason=why)
        return setting
    log.info("iptables_backend_detected", backend=detected, reason=why, nft_rules=nft_rules, legacy_rules=legacy_rules)
    return detected


def other_backend(backend: str) -> str:
    return "legacy" if backend == "nft" else "nft"
