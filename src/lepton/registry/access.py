"""Access control and traffic routes kept in the registry: API keys, model tenants, A/B weights."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lepton.errors import RegistryError
from lepton.registry.db import ApiKey, RouteRow, VersionRow, utcnow

SCOPES = ("predict", "admin")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_KEY = re.compile(r"^lpt_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
#: The largest route weight. Weights are relative (90/10, 0.9/0.1 and 9/1 split alike); the bound keeps their sum
#: and every share finite, and is stated in the server's OpenAPI document.
MAX_ROUTE_WEIGHT = 1e6
#: The largest version number (the registry's 32-bit integer column).
MAX_VERSION = 2**31 - 1


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    tenant: str
    scope: str


@dataclass(frozen=True)
class Route:
    """Weights per version (summing to 100) and an optional shadow version."""

    weights: dict[int, float]
    shadow: int | None = None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_owner(tenant: str, scope: str) -> None:
    """RegistryError unless ``tenant`` is a valid name and ``scope`` a known scope."""
    if not _TENANT.match(tenant):
        raise RegistryError(f"invalid tenant {tenant!r}: letters, digits, '_', '-', '.' (max 100)")
    if scope not in SCOPES:
        raise RegistryError(f"scope must be one of {', '.join(SCOPES)} (got {scope!r})")


class AccessMixin:
    """Methods of ``Registry`` for keys, tenants and routes (``self`` is a Registry)."""

    def create_key(self, tenant: str, scope: str = "predict") -> str:
        """Create an API key and return it; it is shown once, and only its hash is stored."""
        _check_owner(tenant, scope)
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)

        def write(session: Session) -> None:
            session.add(ApiKey(key_id=key_id, key_hash=_digest(secret), tenant=tenant, scope=scope))

        self._retrying(write)
        return f"lpt_{key_id}_{secret}"

    def add_key(self, key: str, tenant: str, scope: str = "predict") -> str:
        """Store an existing key (``lpt_<id>_<secret>``, as ``create_key`` printed it; e.g. read from a mounted
        secret by a replica with its own registry); only its hash is kept. Returns the key id."""
        match = _KEY.match(key or "")
        if not match:
            raise RegistryError("not a Lepton API key: expected lpt_<id>_<secret> as `lepton keys create` prints")
        _check_owner(tenant, scope)
        key_id, secret = match.group(1), match.group(2)

        def write(session: Session) -> None:
            if session.scalar(select(ApiKey).where(ApiKey.key_id == key_id)) is not None:
                raise RegistryError(f"key id {key_id} exists already")
            session.add(ApiKey(key_id=key_id, key_hash=_digest(secret), tenant=tenant, scope=scope))

        self._retrying(write)
        return key_id

    def verify_key(self, key: str) -> KeyInfo | None:
        """The key's tenant and scope, or None for an unknown, malformed or revoked key."""
        match = _KEY.match(key or "")
        if not match:
            return None
        with Session(self.engine) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_id == match.group(1)))
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.key_hash, _digest(match.group(2))):
                return None
            return KeyInfo(row.key_id, row.tenant, row.scope)

    def revoke_key(self, key_id: str) -> None:
        def write(session: Session) -> None:
            row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
            if row is None:
                raise RegistryError(f"no API key with id {key_id!r}")
            row.revoked_at = utcnow()

        self._retrying(write)

    def list_keys(self) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            return [{"key_id": r.key_id, "tenant": r.tenant, "scope": r.scope,
                     "created_at": r.created_at.isoformat() if r.created_at else None,
                     "revoked": r.revoked_at is not None}
                    for r in session.scalars(select(ApiKey).order_by(ApiKey.id))]

    def set_tenant(self, name: str, tenant: str | None) -> None:
        """Restrict a model to one tenant (None: every tenant may use it)."""
        if tenant is not None and not _TENANT.match(tenant):
            raise RegistryError(f"invalid tenant {tenant!r}")

        def write(session: Session) -> None:
            self._model(session, name, lock=True).tenant = tenant

        self._retrying(write)

    def tenant_of(self, name: str) -> str | None:
        with Session(self.engine) as session:
            return self._model(session, name).tenant

    def set_route(self, name: str, weights: dict[int, float], shadow: int | None = None) -> Route:
        """Split traffic between versions (weights are normalised to shares of 100, rounded to 4 decimals; a
        version whose share rounds to 0 gets no traffic and is left out); ``{}`` clears the route. The route
        returned is the route stored."""
        normalised = route_shares(weights)
        if shadow is not None and not (isinstance(shadow, int) and 1 <= shadow <= MAX_VERSION):
            raise RegistryError(f"shadow must be a version number between 1 and {MAX_VERSION} (got {shadow!r})")

        def write(session: Session) -> Route:
            model = self._model(session, name, lock=True)
            query = select(VersionRow.version).where(VersionRow.model_id == model.id)
            existing = set(session.scalars(query))
            missing = sorted({*weights, *([shadow] if shadow is not None else [])} - existing)
            if missing:
                raise RegistryError(f"{name} has no version(s) {missing}")
            row = session.get(RouteRow, model.id)
            if row is None:
                row = RouteRow(model_id=model.id)
                session.add(row)
            row.weights = {str(v): w for v, w in normalised.items()}
            row.shadow_version = shadow
            return Route(normalised, shadow)

        return self._retrying(write)

    def get_route(self, name: str) -> Route | None:
        with Session(self.engine) as session:
            model = self._model(session, name)
            row = session.get(RouteRow, model.id)
            if row is None or not row.weights:
                return None
            return Route({int(v): float(w) for v, w in row.weights.items()}, row.shadow_version)


def route_shares(weights: dict[int, float]) -> dict[int, float]:
    """Weights as shares of 100 (4 decimals, zero shares left out); RegistryError naming the version unless every
    version is a number from 1 to MAX_VERSION and every weight a finite number from 0 to MAX_ROUTE_WEIGHT, at least
    one above 0. Scaled by the largest weight first, so no sum or product can overflow."""
    for version, weight in weights.items():
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
            raise RegistryError(f"route: version {version!r} is not a version number (1 to {MAX_VERSION})")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) \
                or not 0 <= weight <= MAX_ROUTE_WEIGHT:
            raise RegistryError(f"route: the weight of version {version} must be a finite number from 0 to "
                                f"{MAX_ROUTE_WEIGHT:g} (got {weight!r})")
    if not weights:
        return {}
    top = max(weights.values())
    if top <= 0:
        raise RegistryError("route weights: at least one version needs a weight above 0")
    scaled = {v: w / top for v, w in weights.items()}
    total = sum(scaled.values())  # between 1 and the number of versions
    shares = {v: round(100.0 * w / total, 4) for v, w in sorted(scaled.items())}
    return {v: s for v, s in shares.items() if s > 0}
