"""Every name we put in the kernel, from explicit inputs; ownership is by prefix.

Stdlib only: the CNI shim imports this module and must start fast. Nothing here
reads the environment; callers pass the prefix in.
"""

from __future__ import annotations

import base64
import hashlib
import re

IFNAME_MAX = 15  # IFNAMSIZ (16) minus the NUL
CHAIN_MAX = 28  # iptables chain-name limit (felix MaxChainNameLength)
IPSET_MAX = 31  # IPSET_MAXNAMELEN (32) minus the NUL

DEFAULT_IFACE_PREFIX = "eni"
_IFACE_PREFIX_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]{0,3}$")
# Prefixes the AWS CNI refuses because they collide with real host interfaces.
_RESERVED_IFACE_PREFIXES = frozenset({"eth", "lo", "vlan"})

# One marker for everything we own. Chains: "pa-..."; ipsets: "pa4..."/"pa6...".
CHAIN_PREFIX = "pa-"
IPSET_PREFIX = "pa"
_OWNED_IPSET_RE = re.compile(r"^pa[46][a-z]-")


def validate_iface_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is usable as a host veth prefix, else raise ValueError."""
    if not _IFACE_PREFIX_RE.match(prefix or ""):
        raise ValueError(
            f"interface prefix {prefix!r} must be 1-4 characters of [a-zA-Z0-9_-] starting with a letter"
        )
    if prefix in _RESERVED_IFACE_PREFIXES:
        raise ValueError(f"interface prefix {prefix!r} is reserved (clashes with host interfaces)")
    return prefix


def veth_suffix(namespace: str, pod: str, index: int = 0) -> str:
    """First 11 hex chars of sha1("<ns>.<pod>"), the AWS VPC CNI / Calico convention."""
    if index:
        pod = f"{pod}.{index}"
    return hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def veth_name(prefix: str, namespace: str, pod: str, index: int = 0) -> str:
    """Host-side veth name for a pod: prefix + veth_suffix()."""
    validate_iface_prefix(prefix)
    return prefix + veth_suffix(namespace, pod, index)


def iface_wildcard(prefix: str) -> str:
    """The iptables interface wildcard that covers every pod veth, e.g. ``eni+``."""
    return validate_iface_prefix(prefix) + "+"


def _hash_b32(text: str, length: int) -> str:
    # base32 lower-case: only [a-z2-7], safe in chain and set names and in shells.
    digest = hashlib.sha224(text.encode()).digest()
    return base64.b32encode(digest).decode().lower().rstrip("=")[:length]


def length_limited(prefix: str, suffix: str, limit: int) -> str:
    """prefix+suffix if it fits, else prefix + "_" + hash(suffix).

    Like felix GetLengthLimitedID: a hashed name always has "_" right after the
    prefix, and a suffix that itself starts with "_" is always hashed, so a plain
    name can never equal a hashed one.
    """
    if not suffix:
        suffix = "_"
    if len(prefix) + len(suffix) <= limit and not suffix.startswith("_"):
        return prefix + suffix
    room = limit - len(prefix) - 1
    if room < 10:
        raise ValueError(f"prefix {prefix!r} leaves too little room for a hash under {limit}")
    return prefix + "_" + _hash_b32(suffix, room)


# --- chains -------------------------------------------------------------------

CHAIN_INPUT = "pa-INPUT"
CHAIN_FORWARD = "pa-FORWARD"
CHAIN_OUTPUT = "pa-OUTPUT"
CHAIN_FROM_WL_DISPATCH = "pa-from-wl-dispatch"
CHAIN_TO_WL_DISPATCH = "pa-to-wl-dispatch"
CHAIN_WL_TO_HOST = "pa-wl-to-host"


def dispatch_child_chain(direction: str, key: str) -> str:
    """Second-level dispatch chain, e.g. pa-from-wl-dispatch-a (direction 'from'|'to')."""
    if direction not in ("from", "to"):
        raise ValueError(f"direction must be 'from' or 'to', not {direction!r}")
    return length_limited(f"pa-{direction}-wl-dispatch-", key, CHAIN_MAX)


def to_workload_chain(iface: str) -> str:
    """Per-endpoint ingress chain (traffic to the pod)."""
    return length_limited("pa-tw-", iface, CHAIN_MAX)


def from_workload_chain(iface: str) -> str:
    """Per-endpoint egress chain (traffic from the pod)."""
    return length_limited("pa-fw-", iface, CHAIN_MAX)


def policy_chain(namespace: str, name: str, direction: str) -> str:
    """Per-policy chain shared by every local endpoint the policy selects.

    direction: 'ingress' -> pa-pi-..., 'egress' -> pa-po-...
    """
    kind = {"ingress": "pi", "egress": "po"}.get(direction)
    if kind is None:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}")
    return length_limited(f"pa-{kind}-", f"{namespace}.{name}", CHAIN_MAX)


def owns_chain(name: str) -> bool:
    return name.startswith(CHAIN_PREFIX)


# --- ipsets -------------------------------------------------------------------

# kind letters: s = pod-selector set (hash:net), n = named-port set (hash:ip,port),
# b = ipBlock set (hash:net with nomatch excepts), e = endpoint own-address set,
# t = temporary set used for swap.
IPSET_KINDS = frozenset("snbet")


def ipset_name(family: int, kind: str, identity: str) -> str:
    """ipset name ``pa<family><kind>-<hash of identity>``, always exactly 31 chars.

    The identity is a canonical string (selector, named port, CIDR list) so equal
    content shares one set. The family digit is part of the name because ipset
    swap and references need one family per set.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    if kind not in IPSET_KINDS:
        raise ValueError(f"unknown ipset kind {kind!r}")
    prefix = f"{IPSET_PREFIX}{family}{kind}-"
    return prefix + _hash_b32(identity, IPSET_MAX - len(prefix))


def temp_ipset_name(name: str) -> str:
    """A temporary set name for building ``name`` and swapping it in."""
    if not owns_ipset(name):
        raise ValueError(f"{name!r} is not one of our ipsets")
    return f"{name[:3]}t-" + _hash_b32("tmp:" + name, IPSET_MAX - 5)


def owns_ipset(name: str) -> bool:
    return bool(_OWNED_IPSET_RE.match(name))


# Comment marker carried first on every rule we write; the value is the rule hash.
RULE_HASH_PREFIX = "pa:"
RULE_HASH_LEN = 16
