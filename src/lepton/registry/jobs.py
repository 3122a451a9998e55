"""The DICOM node's record in the registry database: one row per (node, study pseudonym) — waiting (still arriving),
done, retry (with the time of the next try) or parked (with the reason), with the study's arrival signature and since
when it is unchanged — so a restarted node resumes without processing a study twice and applies the settle rule."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lepton.registry.db import DicomJob, utcnow

#: The longest wait before a retry, however many attempts have doubled it (no date past the calendar's end).
MAX_RETRY_SECONDS = 7 * 86_400


@dataclass(frozen=True)
class Job:
    node: str
    study: str
    status: str
    attempts: int
    next_try: datetime | None
    reason: str | None
    result: dict[str, Any]
    changed_at: datetime | None = None


def _utc(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:  # SQLite returns naive UTC
        from datetime import UTC

        moment = moment.replace(tzinfo=UTC)
    return moment


def _job(row: DicomJob) -> Job:
    return Job(row.node, row.study, row.status, row.attempts or 0, _utc(row.next_try), row.reason,
               dict(row.result or {}), _utc(row.changed_at))


class JobsMixin:
    """Registry methods for DICOM nodes (mixed into ``Registry``)."""

    def job(self, node: str, study: str) -> Job | None:
        with Session(self.engine) as session:
            row = session.scalar(select(DicomJob).where(DicomJob.node == node, DicomJob.study == study))
            return _job(row) if row else None

    def jobs(self, node: str) -> list[Job]:
        with Session(self.engine) as session:
            return [_job(r) for r in session.scalars(select(DicomJob).where(DicomJob.node == node)
                                                     .order_by(DicomJob.id))]

    def observe_study(self, node: str, study: str, signature: str, at: datetime | None = None) -> datetime:
        """Record what a study looks like now (``signature``: its series and instance counts, hashed) and return
        since when it has looked like that: ``at`` (default now) when it changed or is new, else the stored time.
        A study not seen before is recorded as ``waiting``. Kept in the database, so a restarted node or a single
        ``--once`` poll applies the settle rule with what earlier polls saw."""

        def write(session: Session) -> datetime:
            row = session.scalar(select(DicomJob).where(DicomJob.node == node, DicomJob.study == study))
            if row is None:
                row = DicomJob(node=node, study=study, status="waiting", attempts=0, result={})
                session.add(row)
            if row.signature != signature or row.changed_at is None:
                row.signature, row.changed_at = signature, at or utcnow()
                row.updated_at = utcnow()
            session.flush()
            return _utc(row.changed_at)

        return self._retrying(write)

    def record_job(self, node: str, study: str, *, done: bool, reason: str | None = None,
                   result: dict[str, Any] | None = None, max_attempts: int = 5,
                   backoff_seconds: float = 30.0) -> Job:
        """Record a study's outcome: done, or one more failed attempt (retry after ``backoff_seconds`` doubling
        each time; parked with ``reason`` after ``max_attempts``)."""

        def write(session: Session) -> Job:
            row = session.scalar(select(DicomJob).where(DicomJob.node == node, DicomJob.study == study))
            if row is None:
                row = DicomJob(node=node, study=study, status="retry", attempts=0, result={})
                session.add(row)
            if done:
                row.status, row.reason, row.next_try, row.result = "done", None, None, result or {}
                row.attempts = (row.attempts or 0) + 1
            else:
                row.attempts = (row.attempts or 0) + 1
                row.reason = (reason or "failed")[:2000]
                if row.attempts >= max_attempts:
                    row.status, row.next_try = "parked", None
                else:
                    row.status = "retry"
                    wait = min(backoff_seconds * 2.0 ** min(row.attempts - 1, 64), MAX_RETRY_SECONDS)
                    row.next_try = utcnow() + timedelta(seconds=wait)
            row.updated_at = utcnow()
            session.flush()
            return _job(row)

        return self._retrying(write)
