"""Bounded retry of throttled EC2 calls: exponential backoff with full jitter.

botocore's own retries are switched off for the EC2 client (total_max_attempts=1), so
this is the only place that decides how often and how long a call is retried, and the
bound is known: at most ``attempts`` calls and ``max_total`` seconds of sleeping.
Full jitter (sleep = uniform(0, min(cap, base * 2**n))) spreads the retries of many
nodes throttled at the same moment (AWS Architecture Blog, "Exponential Backoff And Jitter").
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Error codes EC2 answers when it throttles (RequestLimitExceeded is EC2's own; the
# others are what other AWS query APIs and botocore's standard retry mode treat as throttling).
THROTTLE_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "SlowDown",
})


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError, "" for anything else."""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


@dataclass
class Backoff:
    attempts: int = 6  # calls in all, the first included
    base: float = 0.2  # seconds
    cap: float = 5.0  # longest single sleep
    max_total: float = 15.0  # longest total sleep
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def call(self, action: str, fn: Callable[[], T]) -> T:
        slept = 0.0
        for n in range(self.attempts):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - only throttling is retried, the rest re-raised
                code = error_code(exc)
                if code not in THROTTLE_CODES or n == self.attempts - 1:
                    raise
                if slept >= self.max_total:
                    raise
                delay = min(self.rng.uniform(0, min(self.cap, self.base * 2 ** n)), self.max_total - slept)
                log.warning("ec2_throttled_retrying", action=action, code=code, attempt=n + 1,
                            sleep=round(delay, 3))
                self.sleep(delay)
                slept += delay
        raise AssertionError("unreachable")
