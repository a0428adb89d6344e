"""Which iptables backend the host uses, decided as Calico's ``IptablesBackend=auto``.

1. If the nft backend's mangle table (v4 or v6) holds kubelet's/kube-proxy's
   ``KUBE-IPTABLES-HINT`` or ``KUBE-KUBELET-CANARY`` chain: nft.
2. Else the same test on legacy: legacy. Legacy is only probed when
   /proc/net/ip_tables_names exists (probing would otherwise load the module).
3. Else whichever holds more rules.
4. On a tie (in practice: no rules anywhere yet, e.g. a fresh node or a fresh
   network namespace) the backend the host's ``iptables`` command resolves to
   (``/usr/sbin/iptables`` -> alternatives -> ``xtables-nft-multi`` or
   ``xtables-legacy-multi``): kubelet and kube-proxy on this host will use that
   binary and put their hint chains there, so following it avoids a split.
   Calico and iptables-wrappers pick legacy on ties, which predates nft being the
   distributions' default (Debian >= 10, RHEL 8); we keep legacy only when the
   default cannot be determined. See docs/decisions/iptables-backend.md.
An explicit setting wins; a mismatch with the detected one is logged.
"""

from __future__ import annotations

import os
import shutil

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


def system_default(path: str | None = None) -> str | None:
    """The backend the host's ``iptables`` command runs, or None if it cannot be told."""
    path = path or shutil.which("iptables") or "/usr/sbin/iptables"
    try:
        real = os.path.basename(os.path.realpath(path, strict=True))
    except OSError:
        return None
    if "nft" in real:  # iptables-nft, xtables-nft-multi
        return "nft"
    if "legacy" in real:  # iptables-legacy, xtables-legacy-multi
        return "legacy"
    return None  # e.g. the pre-1.8 xtables-multi, which is legacy only, or a wrapper script


def choose(nft_hint: bool, legacy_hint: bool, nft_rules: int, legacy_rules: int, legacy_loaded: bool,
           default: str | None) -> tuple[str, str]:
    """(backend, reason) from what the probes saw; pure, for tests."""
    if nft_hint:
        return "nft", "hint_chain"
    if legacy_hint:
        return "legacy", "hint_chain"
    if not legacy_loaded:
        return "nft", "legacy_not_loaded"
    if nft_rules > legacy_rules:
        return "nft", "more_rules"
    if legacy_rules > nft_rules:
        return "legacy", "more_rules"
    if default in BACKENDS:
        return default, "tie_system_default"
    return "legacy", "tie_default_unknown"


def detect_backend(runner: Runner, setting: str = "auto") -> str:
    if setting not in ("auto", *BACKENDS):
        raise ValueError(f"iptables backend setting must be auto, nft or legacy, not {setting!r}")
    nft_hint, nft_rules = _probe(runner, "nft")
    loaded = legacy_available()
    if loaded:
        legacy_hint, legacy_rules = _probe(runner, "legacy")
    else:
        legacy_hint, legacy_rules = False, 0
    default = system_default()
    detected, why = choose(nft_hint, legacy_hint, nft_rules, legacy_rules, loaded, default)
    if setting != "auto":
        if setting != detected:
            log.warning("iptables_backend_mismatch", configured=setting, detected=detected, reason=why)
        return setting
    log.info("iptables_backend_detected", backend=detected, reason=why, nft_rules=nft_rules,
             legacy_rules=legacy_rules, system_default=default)
    return detected


def other_backend(backend: str) -> str:
    return "legacy" if backend == "nft" else "nft"
