"""One endpoint of an upstream: its address, weight, load and active health."""

from __future__ import annotations


class Endpoint:
    __slots__ = ("url", "weight", "outstanding", "healthy", "current_weight", "__weakref__")

    def __init__(self, url: str, weight: int = 1, healthy: bool = True) -> None:
        self.url = url.rstrip("/")
        """Base URL; the request's path and query are appended."""
        self.weight = weight
        self.outstanding = 0
        """Requests in flight on this endpoint (for least_outstanding)."""
        self.healthy = healthy
        """Active health: probes pass, or the worker is ready. Ejection is kept apart, per model."""
        self.current_weight = 0
        """Smooth weighted round robin state (for weighted)."""
