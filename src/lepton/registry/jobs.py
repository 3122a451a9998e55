"""The DICOM node's record in the registry database: one row per (node, study pseudonym) — done, retry (with the
time of the next try) or parked (with the reason) — so a restarted node resumes without processing a study twice."""

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


def _job(row: DicomJob) -> Job:
    next_try = row.next_try
    if next_try is not None and next_try.tzinfo is None:  # SQLite returns naive UTC
        from datetime import UTC

        next_try = next_try.replace(tzinfo=UTC)
    return Job(row.node, row.study, row.status, row.attempts or 0, next_try, row.reason, dict(row.result or {}))


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
