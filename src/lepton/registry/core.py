"""The model registry: versions, stages, model cards, lineage and verified artifacts."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session

from lepton.errors import RegistryError
from lepton.registry.access import AccessMixin
from lepton.registry.db import STAGES, ModelRow, StageEvent, VersionRow, make_engine, migrate, undefined_as_null
from lepton.registry.jobs import JobsMixin
from lepton.registry.runs import RunsMixin
from lepton.registry.store import ArtifactStore
from lepton.registry.validation import ValidationMixin

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


def lepton_home() -> Path:
    return Path(os.environ.get("LEPTON_HOME", Path.home() / ".lepton")).expanduser()


@dataclass
class ModelVersion:
    """A registered version as plain data (safe to use after the session closes)."""

    name: str
    version: int
    stage: str
    format: str
    created_at: str
    source_run: str | None
    parent_version: int | None
    artifacts: dict[str, str]
    labels: list[str]
    preprocessing: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]
    data_fingerprint: dict[str, Any]
    threshold: float | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _as_version(row: VersionRow) -> ModelVersion:
    return ModelVersion(
        name=row.model.name, version=row.version, stage=row.stage, format=row.format,
        created_at=row.created_at.isoformat() if row.created_at else "", source_run=row.source_run,
        parent_version=row.parent_version, artifacts=dict(row.artifacts or {}), labels=list(row.labels or []),
        preprocessing=dict(row.preprocessing or {}), config=dict(row.config or {}),
        metrics=dict(row.metrics or {}), data_fingerprint=dict(row.data_fingerprint or {}),
        threshold=row.threshold,
    )


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name``, ``name@3``, ``name@production`` → (name, selector or None)."""
    name, _, selector = ref.partition("@")
    if not _NAME.match(name):
        raise RegistryError(f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (max 200)")
    return name, selector or None


class Registry(RunsMixin, AccessMixin, JobsMixin, ValidationMixin):
    """Versioned models in SQLite (default) or PostgreSQL, artifacts in a content-addressed store.

    >>> reg = Registry.open()                                  # ~/.lepton, or $LEPTON_HOME / $LEPTON_DB_URL
    >>> v = reg.register_run("runs/pneumonia", "pneumonia")    # doctest: +SKIP
    >>> reg.promote("pneumonia", v.version, "production")      # doctest: +SKIP
    """

    def __init__(self, url: str, artifacts: str | Path):
        self.url = url
        self.store = ArtifactStore(artifacts)
        self.engine = make_engine(url)
        try:
            migrate(self.engine)
        except OperationalError as exc:
            raise RegistryError(f"cannot open the registry database {self.safe_url}: {exc.orig}") from exc

    @property
    def safe_url(self) -> str:
        return re.sub(r"//([^:@/]+):[^@/]*@", r"//\1:***@", self.url)

    @classmethod
    def open(cls, location: str | Path | None = None) -> Registry:
        """Open a registry: a folder (SQLite ``registry.db`` and ``artifacts/`` inside), a database URL
        (artifacts under ``$LEPTON_HOME``), or by default ``$LEPTON_DB_URL`` or ``~/.lepton``."""
        location = str(location) if location is not None else os.environ.get("LEPTON_DB_URL")
        if location and "://" in location:
            return cls(location, lepton_home() / "artifacts")
        folder = Path(location).expanduser() if location else lepton_home()
        folder.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{folder / 'registry.db'}", folder / "artifacts")

    # -- writing -------------------------------------------------------------------------------
    def _retrying(self, fn):
        """Run a write transaction, retrying when a concurrent writer wins a race."""
        delay = 0.02
        for attempt in range(40):
            try:
                with Session(self.engine) as session, session.begin():
                    return fn(session)
            except (IntegrityError, OperationalError) as exc:
                transient = ("locked", "could not serialize", "deadlock detected")
                if isinstance(exc, OperationalError) and not any(t in str(exc).lower() for t in transient):
                    raise RegistryError(f"registry database error: {exc.orig}") from exc
                if attempt == 39:
                    raise RegistryError(f"registry write kept conflicting with other writers: {exc.orig}") from exc
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)
            except StatementError as exc:  # the strict JSON writer refused a value (NaN, Infinity): nothing stored
                if isinstance(exc.orig, RegistryError):
                    raise RegistryError(f"refused to store: {exc.orig}") from exc
                raise
        raise AssertionError("unreachable")

    def add_version(self, name: str, fields: dict[str, Any], description: str = "",
                     card: str | None = None) -> ModelVersion:
        """Insert the next version of ``name`` (``fields`` are the version's columns) and its model card in one
        transaction; the card is generated unless given. ``register_*`` and bundle imports build on it. Measured
        figures that are undefined (NaN: an AUC on one class, the spread of one image's mean) are stored as null in
        ``metrics`` and ``data_fingerprint``; a non-finite number anywhere else is refused."""
        from lepton.registry.card import render_card

        parse_ref(name)
        measured = {k: undefined_as_null(fields[k]) for k in ("metrics", "data_fingerprint") if k in fields}
        fields = {**fields, **measured}

        def write(session: Session) -> ModelVersion:
            model = session.scalar(select(ModelRow).where(ModelRow.name == name).with_for_update())
            if model is None:
                model = ModelRow(name=name, description=description)
                session.add(model)
                session.flush()
            latest = session.scalar(select(func.max(VersionRow.version)).where(VersionRow.model_id == model.id))
            row = VersionRow(model_id=model.id, version=(latest or 0) + 1, **fields)
            if fields.get("parent_version") is None and latest:
                row.parent_version = latest
            session.add(row)
            session.flush()
            session.refresh(row)
            text = card if card is not None else render_card(_as_version(row))
            row.artifacts = {**row.artifacts, "card": self.store.put(text.encode("utf-8"))}
            session.flush()
            return _as_version(row)

        return self._retrying(write)

    def set_card(self, ref: str, markdown: str) -> ModelVersion:
        """Replace a version's model card (Markdown)."""
        sha = self.store.put(markdown.encode("utf-8"))

        def write(session: Session) -> ModelVersion:
            row = self._row(session, ref)
            row.artifacts = {**row.artifacts, "card": sha}
            return _as_version(row)

        return self._retrying(write)

    def set_precision(self, ref: str, precision: str, record: dict[str, Any],
                      artifacts: dict[str, str] | None = None) -> ModelVersion:
        """Record the check of a serving precision (``lepton.precision``) in the version's metrics, with the
        artifacts it made (an int8 graph)."""
        def write(session: Session) -> ModelVersion:
            row = self._row(session, ref, lock=True)
            metrics = dict(row.metrics or {})
            metrics["precisions"] = {**metrics.get("precisions", {}), precision: undefined_as_null(record)}
            row.metrics = metrics
            if artifacts:
                row.artifacts = {**row.artifacts, **artifacts}
            session.flush()
            return _as_version(row)

        return self._retrying(write)

    def card(self, ref: str) -> str:
        version = self.get(ref)
        return self.store.get(version.artifacts["card"], "model card").decode("utf-8")

    def promote(self, name: str, version: int, stage: str) -> ModelVersion:
        """Move a version to ``staging`` or ``production``; the previous holder of that stage is archived."""
        if stage not in ("staging", "production"):
            raise RegistryError(f"stage must be staging or production (got {stage!r})")
        self.check_promotion(f"{name}@{version}", stage)  # the registry's rules (a validation report for production)
        return self._set_stage(f"{name}@{version}", stage)

    def archive(self, name: str, version: int) -> ModelVersion:
        return self._set_stage(f"{name}@{version}", "archived")

    def _set_stage(self, ref: str, stage: str) -> ModelVersion:
        def write(session: Session) -> ModelVersion:
            row = self._row(session, ref, lock=True)
            if stage in ("staging", "production"):
                for other in session.scalars(select(VersionRow).where(
                        VersionRow.model_id == row.model_id, VersionRow.stage == stage, VersionRow.id != row.id)):
                    session.add(StageEvent(model_id=row.model_id, version=other.version, from_stage=stage,
                                           to_stage="archived"))
                    other.stage = "archived"
            if row.stage != stage:
                session.add(StageEvent(model_id=row.model_id, version=row.version, from_stage=row.stage,
                                       to_stage=stage))
                row.stage = stage
            return _as_version(row)

        return self._retrying(write)

    def rollback(self, name: str) -> ModelVersion:
        """Return production to the version that held it before the current one."""

        def write(session: Session) -> ModelVersion:
            model = self._model(session, name, lock=True)
            current = session.scalar(select(VersionRow).where(VersionRow.model_id == model.id,
                                                              VersionRow.stage == "production"))
            if current is None:
                raise RegistryError(f"{name} has no production version to roll back")
            history = session.scalars(select(StageEvent).where(
                StageEvent.model_id == model.id, StageEvent.to_stage == "production").order_by(StageEvent.id.desc()))
            target = None
            for event in history:  # the newest earlier production version that still exists
                if event.version == current.version:
                    continue
                target = session.scalar(select(VersionRow).where(VersionRow.model_id == model.id,
                                                                 VersionRow.version == event.version))
                if target is not None:
                    break
            if target is None:
                raise RegistryError(f"{name}@{current.version} is the first production version still in the "
                                    "registry; nothing to roll back to")
            session.add(StageEvent(model_id=model.id, version=current.version, from_stage="production",
                                   to_stage="archived"))
            session.add(StageEvent(model_id=model.id, version=target.version, from_stage=target.stage,
                                   to_stage="production"))
            current.stage, target.stage = "archived", "production"
            return _as_version(target)

        return self._retrying(write)

    def delete(self, name: str, version: int, *, force: bool = False) -> None:
        """Delete a version; the production version only with ``force``. Artifacts stay in the store."""

        def write(session: Session) -> None:
            row = self._row(session, f"{name}@{version}", lock=True)
            if row.stage == "production" and not force:
                raise RegistryError(f"{name}@{version} is in production; promote another version first or "
                                    "pass --force")
            session.delete(row)

        self._retrying(write)

    # -- reading -------------------------------------------------------------------------------
    def _model(self, session: Session, name: str, lock: bool = False) -> ModelRow:
        query = select(ModelRow).where(ModelRow.name == name)
        model = session.scalar(query.with_for_update() if lock else query)
        if model is None:
            raise RegistryError(f"no model named {name!r} in the registry")
        return model

    def _row(self, session: Session, ref: str, lock: bool = False) -> VersionRow:
        name, selector = parse_ref(ref)
        model = self._model(session, name, lock)
        query = select(VersionRow).where(VersionRow.model_id == model.id)
        if selector is None or selector == "latest":
            query = query.order_by(VersionRow.version.desc()).limit(1)
        elif selector in STAGES:
            query = query.where(VersionRow.stage == selector).order_by(VersionRow.version.desc()).limit(1)
        elif selector.isdigit():
            query = query.where(VersionRow.version == int(selector))
        else:
            raise RegistryError(f"{ref}: use NAME, NAME@VERSION, NAME@latest, NAME@staging or NAME@production")
        row = session.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise RegistryError(f"{ref}: no such version")
        return row

    def get(self, ref: str) -> ModelVersion:
        """A version by reference: ``name`` (latest), ``name@3``, ``name@production``."""
        with Session(self.engine) as session:
            return _as_version(self._row(session, ref))

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """All versions (of one model, or of every model), ordered by name and version."""
        with Session(self.engine) as session:
            query = select(VersionRow).join(ModelRow).order_by(ModelRow.name, VersionRow.version)
            if name is not None:
                self._model(session, name)
                query = query.where(ModelRow.name == name)
            return [_as_version(r) for r in session.scalars(query)]

    def diff(self, name: str, a: int, b: int) -> dict[str, Any]:
        """Config, preprocessing, label and metric differences between two versions."""
        va, vb = self.get(f"{name}@{a}"), self.get(f"{name}@{b}")

        def changed(x: dict, y: dict) -> dict[str, list[Any]]:
            flat_x, flat_y = _flatten(x), _flatten(y)
            return {k: [flat_x.get(k), flat_y.get(k)] for k in sorted(set(flat_x) | set(flat_y))
                    if flat_x.get(k) != flat_y.get(k)}

        return {"a": va.ref, "b": vb.ref, "config": changed(va.config, vb.config),
                "preprocessing": changed(va.preprocessing, vb.preprocessing),
                "labels": [va.labels, vb.labels] if va.labels != vb.labels else None,
                "metrics": changed(va.metrics, vb.metrics),
                "data_changed": va.data_fingerprint.get("sha256") != vb.data_fingerprint.get("sha256")}

    def register_slide_model(self, folder: str | Path, name: str, *, description: str = "") -> ModelVersion:
        """Register a ``lepton slides train`` folder (format ``slide-mil``), served as slide jobs."""
        from lepton.registry.slides import register_slide_model

        return register_slide_model(self, folder, name, description=description)

    def register_backbone(self, path: str | Path, name: str, *, description: str = "") -> ModelVersion:
        """Register a ``lepton pretrain`` folder or its ``backbone.pt`` (format ``backbone``)."""
        from lepton.registry.backbones import register_backbone

        return register_backbone(self, path, name, description=description)

    def backbone_file(self, ref: str) -> Path:
        """The verified weight file of a registered backbone, for ``lepton train --pretrained NAME@STAGE``."""
        from lepton.registry.backbones import backbone_file

        return backbone_file(self, ref)

    def export_bundle(self, ref: str, path: str | Path) -> Path:
        from lepton.registry.bundle import export_bundle

        return export_bundle(self, ref, Path(path))

    def import_bundle(self, path: str | Path, name: str | None = None) -> ModelVersion:
        from lepton.registry.bundle import import_bundle

        return import_bundle(self, Path(path), name)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
