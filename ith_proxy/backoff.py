"""Retry timing: exponential backoff with equal jitter (stdlib only).

Shared by whatever retries a remote peer: the forwarder's outbox entries, and
the backend link's reconnects (DESIGN §5: "exponential backoff with jitter").

Equal jitter, not full jitter: the n-th retry waits between half and all of
``min(cap, base * 2**(n-1))``.  Half is fixed, so a peer that is down gets
ever fewer attempts (full jitter can draw a near-zero wait at any n); half is
random, so entries that failed together at one outage spread apart.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """``base`` and ``cap`` in seconds; after ``max_attempts`` attempts the
    work fails for good (0: retry forever)."""

    base: float = 5.0
    cap: float = 3600.0
    max_attempts: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and math.isfinite(self.cap)):
            raise ValueError("backoff base and cap must be finite")
        if self.base <= 0 or self.cap < self.base:
            raise ValueError("backoff needs 0 < base <= cap")
        if self.max_attempts < 0:
            raise ValueError("max_attempts must be >= 0")

    def ceiling(self, attempts: int) -> float:
        """The longest wait after ``attempts`` failed attempts (>= 1)."""
        return min(self.cap, self.base * 2.0 ** min(max(attempts, 1) - 1, 60))

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after ``attempts`` failed attempts: in
        [ceiling/2, ceiling]; ``rand`` gives [0, 1) (injectable for tests)."""
        ceiling = self.ceiling(attempts)
        return ceiling / 2 + min(max(rand(), 0.0), 1.0) * ceiling / 2

    def exhausted(self, attempts: int) -> bool:
        return self.max_attempts > 0 and attempts >= self.max_attempts
