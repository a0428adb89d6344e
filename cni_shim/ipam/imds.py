"""Instance facts from the EC2 instance metadata service, IMDSv2 (session tokens) only.

A small stdlib client rather than botocore's IMDSFetcher: botocore exposes token
handling and path reads only as private methods (_fetch_metadata_token, _get_request)
and falls back to IMDSv1 when the token PUT is refused; we want v2 or nothing and a
stable API. Never goes through an HTTP proxy. The endpoint is the standard
AWS_EC2_METADATA_SERVICE_ENDPOINT (default http://169.254.169.254/).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254/"
ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
TOKEN_PATH = "latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
META = "latest/meta-data/"


class ImdsError(RuntimeError):
    pass


class ImdsNotFound(ImdsError):
    pass


@dataclass(frozen=True)
class InterfaceFacts:
    mac: str
    interface_id: str
    device_number: int
    subnet_id: str
    vpc_id: str
    subnet_ipv4_cidrs: tuple[str, ...]
    subnet_ipv6_cidrs: tuple[str, ...]
    vpc_ipv4_cidrs: tuple[str, ...]
    security_groups: tuple[str, ...]
    local_ipv4s: tuple[str, ...]  # the first is the interface's primary address
    ipv6s: tuple[str, ...]


@dataclass(frozen=True)
class InstanceFacts:
    instance_id: str
    instance_type: str
    availability_zone: str
    region: str
    primary_mac: str
    interfaces: tuple[InterfaceFacts, ...]

    @property
    def primary(self) -> InterfaceFacts:
        for i in self.interfaces:
            if i.device_number == 0:
                return i
        raise ImdsError("instance metadata lists no interface with device-number 0")


class Imds:
    def __init__(self, endpoint: str | None = None, timeout: float = 2.0, token_ttl: int = 21600,
                 attempts: int = 3) -> None:
        base = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        self.base = base if base.endswith("/") else base + "/"
        self.timeout = timeout
        self.token_ttl = token_ttl
        self.attempts = attempts
        self._token = ""
        self._token_expiry = 0.0
        # IMDS is link-local: a proxy from the environment must never see these requests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, method: str, path: str, headers: dict[str, str]) -> str:
        req = urllib.request.Request(self.base + path, method=method, headers=headers)
        with self._opener.open(req, timeout=self.timeout) as resp:
            return resp.read().decode()

    def token(self, refresh: bool = False) -> str:
        if refresh or not self._token or time.monotonic() >= self._token_expiry:
            try:
                self._token = self._request("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(self.token_ttl)})
            except (urllib.error.URLError, OSError) as exc:
                raise ImdsError(f"IMDSv2 token request to {self.base}{TOKEN_PATH} failed: {exc}") from None
            # Renew a minute early so a token never expires between check and use.
            self._token_expiry = time.monotonic() + max(self.token_ttl - 60, 1)
        return self._token

    def get(self, path: str) -> str:
        """GET latest/meta-data/<path> with a session token; ImdsNotFound on 404."""
        last: Exception | None = None
        for n in range(self.attempts):
            try:
                return self._request("GET", META + path, {TOKEN_HEADER: self.token()})
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise ImdsNotFound(f"instance metadata {path}: not found") from None
                if exc.code == 401:  # token expired or revoked: fetch a new one and retry
                    self._token = ""
                    last = exc
                    continue
                last = exc
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.1 * (n + 1))
        raise ImdsError(f"instance metadata {path}: {last}")

    def get_list(self, path: str) -> tuple[str, ...]:
        try:
            return tuple(x.strip().rstrip("/") for x in self.get(path).splitlines() if x.strip())
        except ImdsNotFound:
            return ()


def read_facts(imds: Imds) -> InstanceFacts:
    """Everything the EC2 provider needs to know about this instance, from IMDS."""
    ifaces = []
    for mac in imds.get_list("network/interfaces/macs/"):
        p = f"network/interfaces/macs/{mac}/"
        ifaces.append(InterfaceFacts(
            mac=mac,
            interface_id=imds.get(p + "interface-id").strip(),
            device_number=int(imds.get(p + "device-number").strip()),
            subnet_id=imds.get(p + "subnet-id").strip(),
            vpc_id=imds.get(p + "vpc-id").strip(),
            subnet_ipv4_cidrs=imds.get_list(p + "subnet-ipv4-cidr-block"),
            subnet_ipv6_cidrs=imds.get_list(p + "subnet-ipv6-cidr-blocks"),
            vpc_ipv4_cidrs=imds.get_list(p + "vpc-ipv4-cidr-blocks"),
            security_groups=imds.get_list(p + "security-group-ids"),
            local_ipv4s=imds.get_list(p + "local-ipv4s"),
            ipv6s=imds.get_list(p + "ipv6s"),
        ))
    az = imds.get("placement/availability-zone").strip()
    try:
        region = imds.get("placement/region").strip()
    except ImdsNotFound:
        region = az[:-1]  # older IMDS: us-east-1a -> us-east-1
    facts = InstanceFacts(
        instance_id=imds.get("instance-id").strip(),
        instance_type=imds.get("instance-type").strip(),
        availability_zone=az,
        region=region,
        primary_mac=imds.get("mac").strip(),
        interfaces=tuple(sorted(ifaces, key=lambda i: i.device_number)),
    )
    facts.primary  # noqa: B018 - fail early, naming what is missing
    log.info("imds_facts", instance_id=facts.instance_id, instance_type=facts.instance_type, az=az,
             interfaces=len(ifaces), subnet=facts.primary.subnet_id)
    return facts
