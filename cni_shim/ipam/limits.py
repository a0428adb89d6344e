"""ENI limits per instance type and the max-pods formula. Stdlib only (the executable uses it).

Values from the AWS VPC CNI's pkg/vpc/vpc_ip_resource_limit.go (default network card only).
"""

from __future__ import annotations

# instance type -> (max ENIs, IPv4 addresses per ENI including the ENI's primary)
ENI_LIMITS: dict[str, tuple[int, int]] = {
    "t3.nano": (2, 2),
    "t3.micro": (2, 2),
    "t3.small": (3, 4),
    "t3.medium": (3, 6),
    "t3.large": (3, 12),
    "t3.xlarge": (4, 15),
    "t3.2xlarge": (4, 15),
    "t3a.medium": (3, 6),
    "t3a.large": (3, 12),
    "m5.large": (3, 10),
    "m5.xlarge": (4, 15),
    "m5.2xlarge": (4, 15),
    "m5.4xlarge": (8, 30),
    "m5.8xlarge": (8, 30),
    "m5.12xlarge": (8, 30),
    "m5.16xlarge": (15, 50),
    "m5.24xlarge": (15, 50),
    "m6i.large": (3, 10),
    "m6i.xlarge": (4, 15),
    "c5.large": (3, 10),
    "c5.xlarge": (4, 15),
    "c5.2xlarge": (4, 15),
    "c5.4xlarge": (8, 30),
    "c5.9xlarge": (8, 30),
    "c5.18xlarge": (15, 50),
    "r5.large": (3, 10),
    "r5.xlarge": (4, 15),
    "r5.2xlarge": (4, 15),
}


# instance type -> vCPUs (for the prefix-mode max-pods cap below)
VCPUS: dict[str, int] = {
    "t3.nano": 2, "t3.micro": 2, "t3.small": 2, "t3.medium": 2, "t3.large": 2, "t3.xlarge": 4, "t3.2xlarge": 8,
    "t3a.medium": 2, "t3a.large": 2,
    "m5.large": 2, "m5.xlarge": 4, "m5.2xlarge": 8, "m5.4xlarge": 16, "m5.8xlarge": 32, "m5.12xlarge": 48,
    "m5.16xlarge": 64, "m5.24xlarge": 96, "m6i.large": 2, "m6i.xlarge": 4,
    "c5.large": 2, "c5.xlarge": 4, "c5.2xlarge": 8, "c5.4xlarge": 16, "c5.9xlarge": 36, "c5.18xlarge": 72,
    "r5.large": 2, "r5.xlarge": 4, "r5.2xlarge": 8,
}

IPS_PER_PREFIX = 16  # a delegated IPv4 /28


def max_pods(enis: int, ips_per_eni: int) -> int:
    """ENIs x (IPs per ENI - 1) + 2: each ENI's first address is its own; +2 host-network pods."""
    return enis * (ips_per_eni - 1) + 2


def max_pods_prefix(enis: int, ips_per_eni: int, vcpus: int = 0) -> int:
    """Prefix delegation: each secondary-IP slot holds a /28, so ENIs x (IPs per ENI - 1) x 16 + 2,
    capped as EKS's max-pods-calculator.sh does: 110 below 30 vCPUs, else 250 (0 vCPUs = unknown: 110)."""
    raw = enis * (ips_per_eni - 1) * IPS_PER_PREFIX + 2
    return min(raw, 250 if vcpus >= 30 else 110)


def limits_for(instance_type: str) -> tuple[int, int]:
    try:
        return ENI_LIMITS[instance_type]
    except KeyError:
        raise KeyError(
            f"unknown instance type {instance_type!r}; known: {', '.join(sorted(ENI_LIMITS))}"
        ) from None


def max_pods_for(instance_type: str) -> int:
    return max_pods(*limits_for(instance_type))
