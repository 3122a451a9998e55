"""State that the worker processes of one ``lepton serve --workers N`` share through files in a private
directory: per-key token buckets, so a key's rate limit holds across workers whichever worker a connection
lands on, and a reload generation, so an admin reload answered by one worker reaches all of them.

Both use plain files and ``flock``: a few system calls per request, no extra process to run. Linux's
``time.monotonic`` (CLOCK_MONOTONIC) is one clock for every process on the machine, so bucket time stamps
written by one worker are valid in another.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from pathlib import Path

_SLOT = struct.Struct("<Qdd")  # key hash (0 = free), tokens, time stamp of the last update
SLOTS = 16384  # 384 KiB
PROBES = 32  # slots looked at per key before the least recently used of them is taken over


def spend_token(tokens: float, elapsed: float, rate: float, burst: float) -> tuple[float, float]:
    """One token-bucket step: refill ``tokens`` for ``elapsed`` seconds at ``rate`` up to ``burst``, then take
    a token. Returns (tokens left, 0) when one was taken, else (tokens, seconds until one is available)."""
    tokens = min(burst, tokens + elapsed * rate)
    if tokens >= 1:
        return tokens - 1, 0.0
    return tokens, (1 - tokens) / rate


class SharedBuckets:
    """Token buckets (``rate`` tokens per second up to ``burst``) keyed by an identity string, in a shared
    memory-mapped file. A slot whose bucket has had time to fill up again is as good as free and is reused,
    so the table never needs cleaning; with more than ``PROBES`` live keys hashed to one neighbourhood the
    least recently used is taken over (its owner starts again from a full bucket)."""

    def __init__(self, path: str | Path, rate: float, burst: int):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate, self.burst = float(rate), int(burst)
        self._refill = self.burst / self.rate  # seconds after which any bucket is full again
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = SLOTS * _SLOT.size
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)  # zero-filled: every slot free
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._map = mmap.mmap(self._fd, size)

    def take(self, ident: str) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        key = int.from_bytes(hashlib.blake2b(ident.encode(), digest_size=8).digest(), "little") or 1
        start = key % SLOTS
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            now = time.monotonic()
            chosen, tokens, elapsed = None, float(self.burst), 0.0
            oldest, oldest_stamp = start, float("inf")
            for i in range(PROBES):
                offset = ((start + i) % SLOTS) * _SLOT.size
                owner, have, stamp = _SLOT.unpack_from(self._map, offset)
                if owner == key:
                    chosen, tokens, elapsed = offset, have, now - stamp
                    break
                if chosen is None and (owner == 0 or now - stamp >= self._refill):
                    chosen = offset  # free, or a bucket that is full again: reusable (keep looking for ours)
                if stamp < oldest_stamp:
                    oldest, oldest_stamp = offset, stamp
            if chosen is None:
                chosen = oldest
            tokens, wait = spend_token(tokens, elapsed, self.rate, self.burst)
            _SLOT.pack_into(self._map, chosen, key, tokens, now)
            return wait
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class ReloadSignal:
    """A generation number in a shared file: ``bump`` after an admin reload, ``changed`` in every worker's
    watcher to learn that another worker was asked to reload."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.seen = self._read()

    def _read(self) -> int:
        try:
            return int(self.path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def bump(self) -> int:
        """Advance the generation (atomically: other workers never read a half-written number)."""
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            generation = self._read() + 1
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(str(generation))
            os.replace(tmp, self.path)
        self.seen = generation
        return generation

    def changed(self) -> bool:
        """Whether the generation moved since this worker last looked (or bumped it itself)."""
        current = self._read()
        if current == self.seen:
            return False
        self.seen = current
        return True
