"""The EC2 provider: ENIs and addresses from the EC2 API, through boto3.

Only vpcip-ipamd imports this (never the vpcip-cni executable). Every EC2 call goes
through ``_call("Action", ...)``: it is counted, retried on throttling (retry.Backoff),
and any EC2 failure becomes ProviderUnavailable (SubnetExhausted when the subnet is
full), which the pool turns into "try again later" for the pod and a warning for the
upkeep loop. tests/cni/test_ec2_iam.py checks that docs/iam-policy.json allows exactly
the actions named in ``_call`` here.

Crash safety without a journal: every ENI is tagged at creation (in the same
CreateNetworkInterface call), so at any crash point what we made is findable:
an ENI that never got attached (or was detached) is deleted by gc_leaked() after a
grace period; an attached ENI of ours, and every address on our ENIs, that the
checkpoint does not know is adopted as free by inventory() at the next start (and
trimmed to the targets from there). Failures we see are rolled back at once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Collection

import boto3
import botocore.config
import botocore.exceptions
import structlog
from botocore import xform_name

from cni_shim.ipam.imds import Imds, InstanceFacts, read_facts
from cni_shim.ipam.limits import ENI_LIMITS, IPS_PER_PREFIX, VCPUS
from cni_shim.ipam.provider import EniInfo, Limits, ProviderUnavailable, Slot, SubnetExhausted
from cni_shim.ipam.retry import THROTTLE_CODES, Backoff, error_code

log = structlog.get_logger(__name__)

# Tag names the AWS VPC CNI puts on the ENIs it creates (pkg/awsutils/awsutils.go):
TAG_INSTANCE = "node.k8s.amazonaws.com/instance_id"
TAG_CLUSTER = "cluster.k8s.amazonaws.com/name"
# Our own tag names (not the AWS CNI's): who made the ENI and when (RFC 3339, UTC).
TAG_CREATED_BY = "vpcip.dev/created-by"
TAG_CREATED_AT = "vpcip.dev/created-at"
CREATED_BY = "vpcip-ipamd"

EXHAUSTED_CODES = frozenset({
    "InsufficientFreeAddressesInSubnet", "PrivateIpAddressLimitExceeded", "InsufficientCidrBlocks",
    "PrefixLimitExceeded", "AttachmentLimitExceeded",
})
FAULT_ENV = "VPCIP_IPAMD_FAULT"  # test-only: "pause-after-{create,attach,assign}=SECONDS"
V6_PREFIX_LEN = 80


@dataclass(frozen=True)
class Ec2Settings:
    cluster_name: str = ""
    prefix_delegation: bool = False
    dual_stack: bool = False  # each pod also gets an IPv6 address (a /80 per /28 in prefix mode)
    leaked_eni_grace: float = 600.0  # seconds an unattached ENI of ours may live before GC deletes it


def _faults() -> dict[str, float]:
    out = {}
    for part in os.environ.get(FAULT_ENV, "").split(","):
        k, _, v = part.partition("=")
        if k.startswith("pause-after-") and v:
            out[k] = float(v)
    return out


def quiet_sdk_logs() -> None:
    """botocore logs request headers (access key id, signature) at DEBUG: never let it."""
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_client(region: str) -> Any:
    """EC2 client from the default credential chain; AWS_ENDPOINT_URL_EC2 honoured by boto3 itself."""
    quiet_sdk_logs()
    cfg = botocore.config.Config(
        retries={"total_max_attempts": 1, "mode": "standard"},  # retry.Backoff decides
        connect_timeout=5, read_timeout=20, user_agent_extra="vpcip-ipamd",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or region
    return boto3.session.Session(region_name=region).client("ec2", config=cfg)


class Ec2Provider:
    def __init__(self, client: Any, facts: InstanceFacts, settings: Ec2Settings,
                 limits: Limits | None = None, backoff: Backoff | None = None) -> None:
        self.client = client
        self.facts = facts
        self.settings = settings
        self.primary = facts.primary
        self.backoff = backoff or Backoff()
        self.calls: Counter[str] = Counter()  # EC2 requests sent, per action (retries included)
        self._view: dict[str, dict] | None = None
        self._primary_ips: dict[str, str] = {}  # ENI id -> its own address (never a pod's)
        # IPv6 addresses EC2 holds per ENI as far as we know (moto answers AssignIpv6Addresses
        # with all of them, EC2 with the new ones only).
        self._v6_held: dict[str, set[str]] = {}
        self._faults = _faults()
        self.limits = limits or self._limits()

    @classmethod
    def from_environment(cls, settings: Ec2Settings, imds: Imds | None = None) -> "Ec2Provider":
        facts = read_facts(imds or Imds())
        return cls(make_client(facts.region), facts, settings)

    # --- EC2 calls -----------------------------------------------------------------

    def _call(self, action: str, **kw: Any) -> dict:
        method = getattr(self.client, xform_name(action))

        def once() -> dict:
            self.calls[action] += 1
            return method(**kw)

        try:
            return self.backoff.call(action, once)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if code in EXHAUSTED_CODES:
                raise SubnetExhausted(
                    f"subnet {self.primary.subnet_id} has no free address for this node (EC2 {action}: {code}); "
                    "try again later") from None
            what = "throttled" if code in THROTTLE_CODES else "failed"
            raise ProviderUnavailable(f"EC2 {action} {what} ({code}): {exc}") from None
        except botocore.exceptions.BotoCoreError as exc:  # endpoint down, timeout, no credentials
            raise ProviderUnavailable(f"EC2 {action} failed: {exc}") from None

    def _fault(self, name: str) -> None:
        secs = self._faults.get(name, 0.0)
        if secs > 0:
            log.warning("fault_pause", point=name, seconds=secs)
            time.sleep(secs)

    def _limits(self) -> Limits:
        itype = self.facts.instance_type
        pd = self.settings.prefix_delegation
        if itype in ENI_LIMITS:
            enis, ips = ENI_LIMITS[itype]
            return Limits(itype, enis, ips, pd, VCPUS.get(itype, 0))
        resp = self._call("DescribeInstanceTypes", InstanceTypes=[itype])
        try:
            it = resp["InstanceTypes"][0]
            net = it["NetworkInfo"]
            return Limits(itype, int(net["MaximumNetworkInterfaces"]), int(net["Ipv4AddressesPerInterface"]), pd,
                          int(it.get("VCpuInfo", {}).get("DefaultVCpus", 0)))
        except (KeyError, IndexError, TypeError, ValueError):
            raise ProviderUnavailable(f"EC2 DescribeInstanceTypes gave no network limits for {itype!r}") from None

    # --- EC2's view of this instance -----------------------------------------------

    def describe(self) -> dict[str, dict]:
        """This instance's attached ENIs by id (DescribeNetworkInterfaces, attachment.instance-id)."""
        out: dict[str, dict] = {}
        kw: dict[str, Any] = {"Filters": [{"Name": "attachment.instance-id", "Values": [self.facts.instance_id]}]}
        while True:
            resp = self._call("DescribeNetworkInterfaces", **kw)
            for eni in resp.get("NetworkInterfaces", []):
                out[eni["NetworkInterfaceId"]] = eni
            if not resp.get("NextToken"):
                break
            kw["NextToken"] = resp["NextToken"]
        self._view = out
        return out

    def _cached(self) -> dict[str, dict]:
        return self._view if self._view is not None else self.describe()

    def _ours(self, eni: dict) -> bool:
        tags = {t["Key"]: t["Value"] for t in eni.get("TagSet", [])}
        return tags.get(TAG_CREATED_BY) == CREATED_BY and tags.get(TAG_INSTANCE) == self.facts.instance_id

    def _info(self, eni: dict) -> EniInfo:
        dev = int(eni.get("Attachment", {}).get("DeviceIndex", 0))
        self._primary_ips[eni["NetworkInterfaceId"]] = eni.get("PrivateIpAddress", "")
        subnet = ""
        for i in self.facts.interfaces:
            if i.subnet_id == eni.get("SubnetId") and i.subnet_ipv4_cidrs:
                subnet = i.subnet_ipv4_cidrs[0]
        return EniInfo(eni["NetworkInterfaceId"], dev, eni.get("PrivateIpAddress", ""),
                       254 if dev == 0 else dev + 1, eni.get("MacAddress", ""), subnet)

    def _slots_of(self, eni: dict) -> list[Slot]:
        """The pod addresses EC2 says the ENI holds, in this provider's mode."""
        if self.settings.prefix_delegation:
            v4 = [a for p in eni.get("Ipv4Prefixes", []) for a in _expand(p["Ipv4Prefix"])]
            v6 = [a for p in eni.get("Ipv6Prefixes", []) for a in _expand(p["Ipv6Prefix"])]
        else:
            v4 = [a["PrivateIpAddress"] for a in eni.get("PrivateIpAddresses", []) if not a.get("Primary")]
            v6 = [a["Ipv6Address"] for a in eni.get("Ipv6Addresses", [])]
        if not self.settings.dual_stack:
            v6 = []
        self._v6_held[eni["NetworkInterfaceId"]] = set(v6)
        return [Slot(ip, v6[i] if i < len(v6) else "") for i, ip in enumerate(v4)]

    # --- Provider protocol -----------------------------------------------------------

    def eni(self, eni_id: str) -> EniInfo | None:
        e = self._cached().get(eni_id)
        return self._info(e) if e is not None and (eni_id == self.primary.interface_id or self._ours(e)) else None

    def knows(self, eni_id: str, ipv4: str) -> bool:
        e = self._cached().get(eni_id)
        return e is not None and any(s.ipv4 == ipv4 for s in self._slots_of(e))

    def inventory(self) -> list[tuple[EniInfo, list[Slot]]]:
        """What EC2 says this node holds: the primary ENI and our attached ENIs, with their addresses."""
        out = []
        for e in sorted(self.describe().values(), key=lambda e: e.get("Attachment", {}).get("DeviceIndex", 0)):
            if e["NetworkInterfaceId"] == self.primary.interface_id or self._ours(e):
                out.append((self._info(e), self._slots_of(e)))
        return out

    def attach_eni(self, attached: Collection[str]) -> EniInfo | None:
        view = self.describe()
        pid = self.primary.interface_id
        if pid not in attached and pid in view:
            return self._info(view[pid])
        for e in sorted(view.values(), key=lambda e: e.get("Attachment", {}).get("DeviceIndex", 0)):
            if e["NetworkInterfaceId"] not in attached and self._ours(e):
                log.info("eni_adopted", eni=e["NetworkInterfaceId"])  # attached before a crash
                return self._info(e)
        if len(view) >= self.limits.max_enis:
            return None
        used = {int(e.get("Attachment", {}).get("DeviceIndex", -1)) for e in view.values()}
        free = [d for d in range(1, self.limits.max_enis + len(used)) if d not in used]
        return self._create_and_attach(free[0])

    def _tags(self) -> list[dict[str, str]]:
        tags = {TAG_INSTANCE: self.facts.instance_id, TAG_CREATED_BY: CREATED_BY,
                TAG_CREATED_AT: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if self.settings.cluster_name:
            tags[TAG_CLUSTER] = self.settings.cluster_name
        return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]

    def _create_and_attach(self, device: int) -> EniInfo:
        resp = self._call(
            "CreateNetworkInterface", SubnetId=self.primary.subnet_id, Groups=list(self.primary.security_groups),
            Description=f"vpcip-ipamd ENI of {self.facts.instance_id}",
            TagSpecifications=[{"ResourceType": "network-interface", "Tags": self._tags()}],
        )
        eni = resp["NetworkInterface"]
        eid = eni["NetworkInterfaceId"]
        log.info("eni_created", eni=eid, subnet=self.primary.subnet_id, device=device)
        self._fault("pause-after-create")
        att_id = ""
        try:
            att_id = self._call("AttachNetworkInterface", NetworkInterfaceId=eid,
                                InstanceId=self.facts.instance_id, DeviceIndex=device)["AttachmentId"]
            self._fault("pause-after-attach")
            self._call("ModifyNetworkInterfaceAttribute", NetworkInterfaceId=eid,
                       Attachment={"AttachmentId": att_id, "DeleteOnTermination": True})
        except ProviderUnavailable:
            self._remove_eni(eid, att_id)
            raise
        eni["Attachment"] = {"AttachmentId": att_id, "DeviceIndex": device}
        self._view = None
        return self._info(eni)

    def _remove_eni(self, eid: str, att_id: str) -> bool:
        """Detach (if attached) and delete; what fails is left for gc_leaked (the ENI is tagged)."""
        try:
            if att_id:
                self._call("DetachNetworkInterface", AttachmentId=att_id, Force=True)
            for n in range(5):  # a detach takes a moment on EC2: delete needs status "available"
                try:
                    self._call("DeleteNetworkInterface", NetworkInterfaceId=eid)
                    log.info("eni_deleted", eni=eid)
                    return True
                except ProviderUnavailable as exc:
                    if "InvalidNetworkInterfaceID.NotFound" in str(exc):
                        return True
                    if n == 4:
                        raise
                    time.sleep(0.5 * (n + 1))
        except ProviderUnavailable as exc:
            log.warning("eni_remove_failed_left_for_gc", eni=eid, error=str(exc))
        return False

    def release_eni(self, eni_id: str) -> bool:
        if eni_id == self.primary.interface_id:
            return False  # never the primary ENI
        e = self._cached().get(eni_id) or self.describe().get(eni_id)
        if e is None or not self._ours(e):
            return False
        self._remove_eni(eni_id, e.get("Attachment", {}).get("AttachmentId", ""))
        self._view = None
        return True

    def assign_ips(self, eni_id: str, have: Collection[str], count: int) -> list[Slot]:
        if count <= 0:
            return []
        self._view = None
        if self.settings.prefix_delegation:
            held = {ipaddress.ip_network(f"{ip}/28", strict=False) for ip in have}
            n = min(-(-count // IPS_PER_PREFIX), self.limits.ips_per_eni - 1 - len(held))
            if n <= 0:
                return []
            resp = self._call("AssignPrivateIpAddresses", NetworkInterfaceId=eni_id, Ipv4PrefixCount=n)
            v4p = [p["Ipv4Prefix"] for p in resp.get("AssignedIpv4Prefixes", [])]
            v4 = [a for p in v4p for a in _expand(p)]
        else:
            n = min(count, self.limits.slots_per_eni - len(have))
            if n <= 0:
                return []
            resp = self._call("AssignPrivateIpAddresses", NetworkInterfaceId=eni_id,
                              SecondaryPrivateIpAddressCount=n)
            v4p = []
            # EC2 answers with the addresses it just assigned; moto answers with all of the
            # ENI's. Dropping what the pool holds and the ENI's own address serves both.
            skip = set(have) | {self._primary_ips.get(eni_id, "")}
            v4 = [a["PrivateIpAddress"] for a in resp.get("AssignedPrivateIpAddresses", [])
                  if a["PrivateIpAddress"] not in skip]
        self._fault("pause-after-assign")
        v6: list[str] = []
        if self.settings.dual_stack:
            try:
                if self.settings.prefix_delegation:
                    r6 = self._call("AssignIpv6Addresses", NetworkInterfaceId=eni_id, Ipv6PrefixCount=len(v4p))
                    v6 = [a for p in r6.get("AssignedIpv6Prefixes", []) for a in _expand(p)]
                else:
                    r6 = self._call("AssignIpv6Addresses", NetworkInterfaceId=eni_id, Ipv6AddressCount=len(v4))
                    held6 = self._v6_held.setdefault(eni_id, set())
                    v6 = [a for a in r6.get("AssignedIpv6Addresses", []) if a not in held6]
                    held6.update(v6)
                if len(v6) < len(v4):
                    raise ProviderUnavailable(f"EC2 AssignIpv6Addresses gave {len(v6)} addresses for {len(v4)}")
            except ProviderUnavailable:
                # Dual-stack slots need both: give the IPv4 addresses (and any IPv6 ones) back.
                self._unassign(eni_id, [Slot(a, v6[i] if i < len(v6) else "") for i, a in enumerate(v4)])
                raise
        slots = [Slot(a, v6[i] if v6 else "") for i, a in enumerate(v4)]
        log.info("ec2_addresses_assigned", eni=eni_id, count=len(slots),
                 prefixes=v4p if self.settings.prefix_delegation else None)
        return slots

    def release_ips(self, eni_id: str, slots: Collection[Slot]) -> None:
        self._unassign(eni_id, list(slots))

    def _unassign(self, eni_id: str, slots: list[Slot]) -> None:
        if not slots:
            return
        self._view = None
        v4 = [s.ipv4 for s in slots]
        v6 = [s.ipv6 for s in slots if s.ipv6]
        try:
            if self.settings.prefix_delegation:
                self._call("UnassignPrivateIpAddresses", NetworkInterfaceId=eni_id,
                           Ipv4Prefixes=sorted({_net(a, 28) for a in v4}))
                if v6:
                    self._call("UnassignIpv6Addresses", NetworkInterfaceId=eni_id,
                               Ipv6Prefixes=sorted({_net(a, V6_PREFIX_LEN) for a in v6}))
            else:
                self._call("UnassignPrivateIpAddresses", NetworkInterfaceId=eni_id, PrivateIpAddresses=v4)
                if v6:
                    self._call("UnassignIpv6Addresses", NetworkInterfaceId=eni_id, Ipv6Addresses=v6)
                    self._v6_held.get(eni_id, set()).difference_update(v6)
        except ProviderUnavailable as exc:
            # Left on the ENI: the next start adopts it as free again (inventory()).
            log.warning("ec2_unassign_failed", eni=eni_id, ipv4=v4, error=str(exc))

    # --- leaked ENIs -------------------------------------------------------------------

    def gc_leaked(self, now: float | None = None) -> list[str]:
        """Delete ENIs of ours (by tag) that are not attached and older than the grace period."""
        now = time.time() if now is None else now
        key, value = ((TAG_CLUSTER, self.settings.cluster_name) if self.settings.cluster_name
                      else (TAG_INSTANCE, self.facts.instance_id))
        resp = self._call("DescribeNetworkInterfaces", Filters=[
            {"Name": "status", "Values": ["available"]},
            {"Name": f"tag:{TAG_CREATED_BY}", "Values": [CREATED_BY]},
            {"Name": f"tag:{key}", "Values": [value]},
        ])
        deleted = []
        for e in resp.get("NetworkInterfaces", []):
            tags = {t["Key"]: t["Value"] for t in e.get("TagSet", [])}
            try:
                born = datetime.strptime(tags.get(TAG_CREATED_AT, ""), "%Y-%m-%dT%H:%M:%SZ").replace(
                    tzinfo=timezone.utc).timestamp()
            except ValueError:
                born = 0.0  # no or bad creation tag: old enough
            if e.get("Status") != "available" or tags.get(TAG_CREATED_BY) != CREATED_BY:
                continue
            if now - born < self.settings.leaked_eni_grace:
                continue
            if self._remove_eni(e["NetworkInterfaceId"], ""):
                deleted.append(e["NetworkInterfaceId"])
        if deleted:
            log.info("leaked_enis_deleted", enis=deleted)
        return deleted


def _expand(prefix: str) -> list[str]:
    """The pod addresses of a delegated prefix: all 16 of a /28; the first 16 after the base of a /80."""
    net = ipaddress.ip_network(prefix, strict=False)
    if net.version == 4:
        return [str(a) for a in net]
    return [str(net.network_address + i) for i in range(1, IPS_PER_PREFIX + 1)]


def _net(addr: str, plen: int) -> str:
    return str(ipaddress.ip_network(f"{addr}/{plen}", strict=False))
