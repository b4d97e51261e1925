"""Passive outlier detection, Envoy's model: faults stay with the endpoint and model they met.

State is kept per (endpoint, model sent upstream), because one endpoint often serves many
models (a hosted API, a vLLM server with adapters): one model failing there must not take the
endpoint away from the others. A request without a model has a scope of its own (None).

- `eject.consecutive_failures` failures in a row eject the pair; a success resets the count.
  What counts is decided by the caller (attempt.py): the endpoint's failures before the commit
  point, never the request's own (see `EjectConfig`).
- Ejection time grows: `cooldown` times the pair's recent ejections, up to `max_cooldown`; a
  pair not ejected for `max_cooldown` starts over. After it, the pair is half-open: its count
  stays at the threshold, so one more failure ejects it again and one success clears it.
- At most `max_ejected_percent` of the upstream's endpoints (at least one) are ejected for a
  model at once; failures past the cap keep counting and eject once room frees up.

The panic threshold, which decides what to do when too few endpoints are left, lives with the
pool (upstreams.py): it also counts endpoints failing active health checks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from gateway.config.model import EjectConfig
from gateway.upstreams.endpoint import Endpoint

log = logging.getLogger("streamgate.outliers")

MAX_RECORDS = 4096
"""Bound on (endpoint, model) pairs remembered: models come from request bodies, so a client
sending made-up names must not grow this without limit. The oldest pair is forgotten first."""


class _Record:
    __slots__ = ("failures", "ejected_until", "ejections")

    def __init__(self) -> None:
        self.failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        """Recent ejections (the multiplier of `cooldown`)."""


class OutlierDetector:
    def __init__(
        self, upstream: str, config: EjectConfig, on_eject: Callable[[], None] = lambda: None
    ) -> None:
        self.upstream = upstream
        self._config = config
        self._on_eject = on_eject
        self._records: dict[tuple[Endpoint, str | None], _Record] = {}

    def ejected(self, endpoint: Endpoint, model: str | None, now: float) -> bool:
        if not self._records:  # the common case: nothing has failed
            return False
        record = self._records.get((endpoint, model))
        return record is not None and record.ejected_until > now

    def success(self, endpoint: Endpoint, model: str | None, now: float) -> None:
        record = self._records.get((endpoint, model))
        if record is None:
            return
        record.failures = 0
        if now - record.ejected_until > self._config.max_cooldown:
            del self._records[(endpoint, model)]  # nothing left worth remembering

    def failure(
        self, endpoint: Endpoint, model: str | None, now: float, peers: Sequence[Endpoint]
    ) -> bool:
        """Count one failure of the pair; True when it ejects it."""
        key = (endpoint, model)
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= MAX_RECORDS:
                del self._records[next(iter(self._records))]
            record = self._records[key] = _Record()
        record.failures += 1
        if record.failures < self._config.consecutive_failures or record.ejected_until > now:
            return False
        if not self._room(model, now, peers):
            return False
        config = self._config
        if now - record.ejected_until > config.max_cooldown:
            record.ejections = 0  # a long quiet spell: start the growth over
        record.ejections += 1
        duration = min(config.cooldown * record.ejections, config.max_cooldown)
        record.ejected_until = now + duration
        self._on_eject()
        log.warning(
            "%s %s ejected for model %r for %gs (%d failures in a row, ejection %d)",
            self.upstream,
            endpoint.url,
            model,
            duration,
            record.failures,
            record.ejections,
        )
        return True

    def _room(self, model: str | None, now: float, peers: Sequence[Endpoint]) -> bool:
        percent = self._config.max_ejected_percent
        if percent == 0:
            return False
        allowed = max(1, len(peers) * percent // 100)
        return sum(self.ejected(ep, model, now) for ep in peers) < allowed

    def models(self) -> set[str | None]:
        """Models with outlier state (for the panic gauge and /readyz)."""
        return {model for _, model in self._records}

    def forget(self, endpoint: Endpoint) -> None:
        """Drop the endpoint's state: a restarted worker is a new process and starts clean."""
        for key in [k for k in self._records if k[0] is endpoint]:
            del self._records[key]
