"""State shared by servers on different hosts through Redis (``lepton serve --redis URL``): per-key token buckets,
so a key's rate limit holds across every replica behind a load balancer, and a reload generation, so an admin
reload answered by one replica reaches all of them. The file-based store (``lepton.serve.shared``) remains the
single-host default.

A bucket is updated by one Lua script on the Redis server, atomic and timed by the server's own clock (replicas'
clocks differ); buckets expire once they would be full again. When Redis cannot be reached a request is let
through and the failure logged (at most every ``WARN_EVERY_S``): an outage of the limiter must not stop
inference in a hospital. Keys are hashed: no key id or client address is stored in Redis.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lepton.errors import ConfigError

log = logging.getLogger("lepton.serve")

WARN_EVERY_S = 30.0

# KEYS[1]: the bucket; ARGV: rate (tokens/s), burst. Returns the seconds to wait as a string (0: a token taken).
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(v[1]) or burst
local stamp = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.17g', wait)
"""


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str) -> Any:
    """A client for ``url`` (redis://, rediss:// or unix://), checked with a PING; ConfigError names the fix."""
    try:
        import redis
    except ImportError:
        raise ConfigError("--redis needs the redis package: pip install 'lepton[redis]'") from None
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=2.0, health_check_interval=30)
        client.ping()
    except ValueError as exc:
        raise ConfigError(f"--redis {redact(url)}: {exc}; use redis://HOST:PORT/DB") from None
    except redis.RedisError as exc:
        raise ConfigError(f"cannot reach Redis at {redact(url)} ({exc}); start it, or serve without --redis "
                          "(rate limits and reloads are then per host)") from None
    return client


class _Outage:
    """Logs a Redis failure at most every ``WARN_EVERY_S``."""

    def __init__(self, what: str):
        self.what, self.last = what, -WARN_EVERY_S

    def report(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self.last >= WARN_EVERY_S:
            self.last = now
            log.error("Redis unavailable for %s (%s); letting requests through until it is back", self.what, exc)


class RedisBuckets:
    """Token buckets (``rate`` per second, bursts of ``burst``) for every identity, in Redis under ``prefix``."""

    def __init__(self, client: Any, rate: float, burst: int, prefix: str = "lepton"):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1 (got {rate}, {burst})")
        self.client, self.rate, self.burst, self.prefix = client, float(rate), int(burst), prefix
        self._take = client.register_script(_TAKE)
        self._outage = _Outage("rate limits")

    def key(self, ident: str) -> str:
        return f"{self.prefix}:ratelimit:{hashlib.blake2b(ident.encode(), digest_size=12).hexdigest()}"

    def take(self, ident: str) -> float:
        """0 when a token was taken (or Redis is unreachable), else the seconds until one is available."""
        import redis

        try:
            return float(self._take(keys=[self.key(ident)], args=[repr(self.rate), self.burst]))
        except redis.RedisError as exc:
            self._outage.report(exc)
            return 0.0

    def close(self) -> None:
        self.client.close()


class RedisReloadSignal:
    """The reload generation as a Redis counter: ``bump`` after an admin reload, ``changed`` in each replica's
    watcher (the same interface as the file-based ``ReloadSignal``)."""

    def __init__(self, client: Any, prefix: str = "lepton"):
        self.client, self.key = client, f"{prefix}:reload-generation"
        self._outage = _Outage("reload signals")
        self.seen = self._read()

    def _read(self) -> int:
        return int(self.client.get(self.key) or 0)

    def bump(self) -> int:
        import redis

        try:
            self.seen = int(self.client.incr(self.key))
        except redis.RedisError as exc:
            self._outage.report(exc)
        return self.seen

    def changed(self) -> bool:
        import redis

        try:
            current = self._read()
        except redis.RedisError as exc:
            self._outage.report(exc)
            return False
        if current == self.seen:
            return False
        self.seen = current
        return True
