"""Who may call: API keys checked against the registry behind a short cache, and per-key token buckets
(in this process, or shared by the worker processes through a file). No FastAPI here: ``deps`` wires these
into routes as dependencies."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

from lepton.registry.access import KeyInfo
from lepton.serve.errors import ApiError
from lepton.serve.shared import SharedBuckets, spend_token


class KeyCache:
    """``Registry.verify_key`` behind a short cache of accepted keys (by digest, never the key itself), so a
    request does not cost a database query; a revoked key stops working within ``ttl`` seconds."""

    MAX_ENTRIES = 10_000

    def __init__(self, registry, ttl: float):
        self.registry, self.ttl = registry, ttl
        self._keys: dict[bytes, tuple[KeyInfo, float]] = {}

    def authenticate(self, authorization: str) -> KeyInfo:
        """The key of an ``Authorization: Bearer <key>`` header; ApiError 401 when missing, invalid or revoked."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})
        info = self.verify(token.strip())
        if info is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
        return info

    def verify(self, token: str) -> KeyInfo | None:
        if self.ttl <= 0:
            return self.registry.verify_key(token)
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        hit = self._keys.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        info = self.registry.verify_key(token)
        if info is None:
            self._keys.pop(digest, None)
            return None
        if len(self._keys) >= self.MAX_ENTRIES:  # bounded: keep only entries still valid, or start afresh
            self._keys = {k: v for k, v in self._keys.items() if v[1] > now}
            if len(self._keys) >= self.MAX_ENTRIES:
                self._keys.clear()
        self._keys[digest] = (info, now + self.ttl)
        return info


class TokenBucket:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, float(burst), time.monotonic()

    def take(self) -> float:
        """0 when allowed, else the seconds until a token is available."""
        now = time.monotonic()
        self.tokens, wait = spend_token(self.tokens, now - self.stamp, self.rate, self.burst)
        self.stamp = now
        return wait


class RateLimiter:
    """``rate`` requests per second with bursts of ``burst`` per identity (a key id, or the client's address);
    with ``shared_file`` the buckets live in a file that every worker process maps, with ``store`` (an object
    with ``take(ident)`` and ``close()``, e.g. ``RedisBuckets``) wherever that keeps them."""

    def __init__(self, rate: float, burst: int, shared_file: Path | None = None, store: Any = None):
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, TokenBucket] = {}
        self.shared = store if store is not None else (
            SharedBuckets(shared_file, rate, burst) if shared_file is not None and rate > 0 else None)

    def check(self, ident: str) -> None:
        """ApiError 429 with ``Retry-After`` when ``ident`` is over its limit."""
        if self.rate <= 0:
            return
        if self.shared is not None:
            wait = self.shared.take(ident)
        else:
            wait = self.buckets.setdefault(ident, TokenBucket(self.rate, self.burst)).take()
        if wait:
            raise ApiError(429, "rate_limited", "rate limit exceeded for this API key",
                           {"Retry-After": str(max(1, math.ceil(wait)))})

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
