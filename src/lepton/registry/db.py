"""Registry schema (SQLAlchemy) and engine set-up for SQLite and PostgreSQL; Alembic migrates it."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates

from lepton.errors import RegistryError

STAGES = ("none", "staging", "production", "archived")
#: Route shares are percentages: they must add up to 100 within this (each is rounded to 4 decimals).
ROUTE_SUM_TOLERANCE = 0.01


def check_finite(value: Any, where: str) -> Any:
    """``value`` unchanged if every number in it (nested lists and dicts included) is finite; RegistryError naming
    the place otherwise. Nothing non-finite is stored: JSON has no NaN or Infinity (PostgreSQL refuses them, SQLite
    would keep a token no strict reader accepts)."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise RegistryError(f"{path} is {item}: the registry stores finite numbers only")
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}") for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return value


def undefined_as_null(value: Any) -> Any:
    """A copy of ``value`` with every non-finite float (an AUC on one class, a distance to an empty mask) as None:
    how measured figures that are undefined are stored."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: undefined_as_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [undefined_as_null(v) for v in value]
    return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    tenant: Mapped[str | None] = mapped_column(String(100), nullable=True)  # None: every tenant may use it
    versions: Mapped[list[VersionRow]] = relationship(back_populates="model", order_by="VersionRow.version")


class VersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    stage: Mapped[str] = mapped_column(String(20), default="none", nullable=False)
    format: Mapped[str] = mapped_column(String(20), default="pytorch", nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    source_run: Mapped[str | None] = mapped_column(Text, nullable=True)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)
    preprocessing: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    data_fingerprint: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    model: Mapped[ModelRow] = relationship(back_populates="versions")

    @validates("artifacts", "labels", "preprocessing", "config", "metrics", "data_fingerprint")
    def _finite(self, key: str, value: Any) -> Any:
        return check_finite(value, key)

    @validates("threshold")
    def _threshold(self, key: str, value: float | None) -> float | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or not 0 <= value <= 1):
            raise RegistryError(f"threshold must be a probability from 0 to 1 (got {value!r})")
        return value


class StageEvent(Base):
    """Every stage change, in order: rollback reads the production history from here."""

    __tablename__ = "stage_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    from_stage: Mapped[str] = mapped_column(String(20), nullable=False)
    to_stage: Mapped[str] = mapped_column(String(20), nullable=False)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key: only a SHA-256 of its secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True, nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    tenant: Mapped[str] = mapped_column(String(100), nullable=False)
    scope: Mapped[str] = mapped_column(String(20), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RouteRow(Base):
    """Traffic weights per version (A/B, canary) and an optional shadow version."""

    __tablename__ = "routes"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    weights: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    shadow_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    @validates("weights")
    def _weights(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        """What the server's router reads back: version numbers as keys, shares above 0 adding up to 100 (or no
        route at all)."""
        check_finite(value, "route weights")
        bad = [k for k, w in value.items() if not (isinstance(k, str) and k.isdigit() and int(k) >= 1)
               or isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= 100]
        if bad or (value and abs(sum(value.values()) - 100) > ROUTE_SUM_TOLERANCE):
            raise RegistryError(f"route weights {value} are not shares of 100 by version: refused")
        return value


class DicomJob(Base):
    """A study a DICOM node has seen: done, waiting for a retry, or parked with the reason. The study is kept only
    as a pseudonym (a hash of its Study Instance UID), never the UID or anything about the patient."""

    __tablename__ = "dicom_jobs"
    __table_args__ = (UniqueConstraint("node", "study"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(100), nullable=False)
    study: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)  # waiting | done | retry | parked
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # the study's series and instance counts as last seen (a hash of pseudonyms), and since when unchanged
    signature: Mapped[str | None] = mapped_column(String(64), nullable=True)
    changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    @validates("result")
    def _finite(self, key: str, value: Any) -> Any:
        return check_finite(value, "job result")


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///…`` or ``postgresql://…``, set up for concurrent writers. JSON is written strictly:
    a NaN or Infinity that got past the column checks fails the write instead of being stored."""

    def strict(value: Any) -> str:
        return json.dumps(check_finite(value, "a JSON value"), allow_nan=False)

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60}, json_serializer=strict)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below control transactions
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # writers queue up instead of failing mid-transaction

        return engine
    return create_engine(url, pool_pre_ping=True, json_serializer=strict)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision with Alembic (creates it on an empty database)."""
    import logging

    alembic_log = logging.getLogger("alembic")
    if alembic_log.level == logging.NOTSET:  # quiet unless someone (``lepton --debug``) chose a level
        alembic_log.setLevel(logging.WARNING)  # before the import: alembic logs its plugin set-up on import
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # one migrator at a time across processes
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
