"""The DICOM node: find studies — by polling a PACS over DICOMweb, or in its own inbox, where its Storage SCP
(``lepton.pacs.dimse``) writes what modalities and PACS push by DIMSE C-STORE — run a registered model on their
series, and send the answers back — a classifier's as DICOM Structured Reports, a segmentation model's as DICOM SEG
— that reference the source study and series: by STOW-RS, or by C-STORE to a configured AE.

Each poll is a QIDO-RS search for series of the watched modalities (or a scan of the inbox), grouped by study. With
``settle_seconds`` a study waits until its series and instance counts have stayed the same that long (a modality
sends a study instance by instance); what a study looked like and since when is kept in the database, so a
restarted node, or one ``--once`` poll, applies the rule with what earlier polls saw. A study is processed once:
the registry database records it per node (``dicom_jobs``, the study as a pseudonym only), so a restarted node
skips what it has done; a series that arrives after the study was reported reopens it, and only the new series is
processed. A failure (PACS gone, a series the model cannot read) is retried with exponential backoff
and parked with its reason after ``max_attempts``; a PACS that cannot be searched at all leaves nothing recorded,
so the next poll finds the same studies again. Reasons and logs carry pseudonyms, never UIDs or patient data.
Prometheus metrics: studies seen, processed, failed (retry or parked), skipped, and the processing latency.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lepton.config import check_number
from lepton.errors import DataError
from lepton.hospital.dicomweb import Source, fetch, pseudonym

#: The node's numeric settings: (low, high, whole number), inclusive; `lepton pacs node` states the same bounds.
SETTING_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "max_attempts": (1, 1_000, True), "backoff_seconds": (0, 86_400, False), "settle_seconds": (0, 86_400, False),
    "interval": (0.01, 86_400, False)}

log = logging.getLogger("lepton.pacs")
# highdicom logs at INFO which instance (by UID) it copies patient and study attributes from: kept quiet, so the
# node's output carries no UIDs (its warnings and errors still show).
logging.getLogger("highdicom").setLevel(logging.WARNING)

#: Anything shaped like a DICOM UID (in an error text, a URL path): replaced before a reason is stored or logged.
_UID = re.compile(r"\d+(?:\.\d+){3,}")
#: Modalities of Lepton's own output (never fed back to the model).
OWN_OUTPUT = {"SR", "SEG"}


def scrub(text: str) -> str:
    """An error text with every UID replaced by its pseudonym."""
    return _UID.sub(lambda m: "uid:" + pseudonym(m.group(0)), text)


class NodeMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.seen = Counter("lepton_node_studies_seen", "Studies found in the PACS (each poll)", registry=self.registry)
        self.processed = Counter("lepton_node_studies_processed", "Studies processed and stored back",
                                 registry=self.registry)
        self.failed = Counter("lepton_node_studies_failed", "Failed attempts by outcome", ["outcome"],
                              registry=self.registry)
        self.skipped = Counter("lepton_node_studies_skipped", "Studies skipped (done, parked, waiting to retry)",
                               registry=self.registry)
        self.reopened = Counter("lepton_node_studies_reopened", "Reported studies reopened by a series that arrived "
                                "later", registry=self.registry)
        self.latency = Histogram("lepton_node_study_seconds", "Time to process one study", registry=self.registry,
                                 buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))


@dataclass
class Poll:
    seen: int = 0
    processed: int = 0
    failed: int = 0
    parked: int = 0
    skipped: int = 0
    waiting: int = 0  # still arriving (see ``settle_seconds``)
    reopened: int = 0  # done studies with a new series, processed again for it
    error: str | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)


class DicomNode:
    """One node: where studies come from (a PACS's DICOMweb service, or ``inbox``: the folder a ``StorageSCP``
    fills), where results go (STOW-RS to ``pacs``, or C-STORE to ``results_to``), a registered model, and its
    record in the registry. ``tls`` is the client SSL context for C-STORE over TLS."""

    def __init__(self, pacs: str | None, model: str, registry, *, name: str = "default",
                 modalities: list[str] | None = None, max_attempts: int = 5, backoff_seconds: float = 30.0,
                 cache: Path | None = None, explain: str | None = None, settle_seconds: float = 0.0,
                 inbox: Path | None = None, results_to: str | None = None, ae_title: str = "LEPTON",
                 tls: ssl.SSLContext | None = None):
        from lepton.pacs.dimse import AeAddress, check_ae_title

        self.base = None
        if pacs:
            source = Source.parse(pacs if pacs.startswith("dicomweb+") else "dicomweb+" + pacs)
            if source.filters:
                raise DataError("--pacs is the DICOMweb service's base URL (no filters); use --filter for modalities")
            self.base = source.base
        self.inbox = Path(inbox) if inbox is not None else None
        self.results_to = AeAddress.parse(results_to) if results_to else None
        if self.base is None and self.inbox is None:
            raise DataError("the node needs studies: a PACS's DICOMweb URL (--pacs) or an inbox its Storage SCP fills")
        if self.base is None and self.results_to is None:
            raise DataError("the node needs somewhere to send results: a DICOMweb URL (--pacs, STOW-RS) or an AE "
                            "(--results-to TITLE@HOST:PORT, C-STORE)")
        self.ae_title, self.tls = check_ae_title(ae_title, "the node's AE title"), tls
        self.model_ref, self.registry, self.name = model, registry, name
        self.modalities = [m.upper() for m in (modalities or [])]
        max_attempts, backoff_seconds, settle_seconds = (
            check_number(key, value, *SETTING_BOUNDS[key])
            for key, value in (("max_attempts", max_attempts), ("backoff_seconds", backoff_seconds),
                               ("settle_seconds", settle_seconds)))
        self.max_attempts, self.backoff, self.cache = max_attempts, backoff_seconds, cache
        if explain not in (None, "gradcam", "gradcam++"):
            raise DataError(f"explain must be gradcam or gradcam++ (got {explain!r})")
        self.explain = explain
        self.settle = settle_seconds
        self.metrics = NodeMetrics()
        self._run, self.version = None, None

    def run_model(self):
        """The model the reference names now: a promotion (``NAME@production``) is followed at the next study."""
        version = self.registry.get(self.model_ref).version
        if self._run is None or version != self.version:
            run = self.registry.load_run(f"{self.model_ref.split('@')[0]}@{version}")
            if "dicom_seg" in run.task.encodings and run.preprocessing.spatial_dims != 3:
                raise DataError(f"{self.model_ref} segments 2-D images: the node stores DICOM SEG for volume "
                                "(series) models; classify, or use a 3-D segmentation model")
            if not {"dicom_seg", "dicom_sr"} & run.task.encodings:
                raise DataError(f"{self.model_ref} is a {run.task.name} model: its answers have no DICOM encoding "
                                "(SR or SEG) for the node to store")
            if self._run is not None:
                log.info("node %s: %s is now version %s", self.name, self.model_ref, version)
            self._run, self.version = run, version
        return self._run

    # -- one poll ----------------------------------------------------------------------------------------------
    def studies(self) -> dict[str, list[tuple[str, str, int]]]:
        """QIDO-RS (or the inbox): watched series grouped by study: ``{study: [(series, modality, instances), …]}``."""
        from lepton.hospital.dicomweb import find_series

        found: dict[str, list[tuple[str, str, int]]] = {}
        if self.inbox is not None:
            return self._inbox_studies()
        for modality in self.modalities or [None]:
            filters = f"?Modality={modality}" if modality else ""
            for s in find_series(Source.parse(f"dicomweb+{self.base}{filters}")):
                if s.modality.upper() in OWN_OUTPUT:
                    continue
                found.setdefault(s.study, []).append((s.series, s.modality, s.instances))
        return found

    def _inbox_studies(self) -> dict[str, list[tuple[str, str, int]]]:
        """The inbox's series (``INBOX/<study>/<series>/*.dcm``, as the SCP writes them), one header read each."""
        import pydicom

        found: dict[str, list[tuple[str, str, int]]] = {}
        if not self.inbox.is_dir():
            return found
        for study_dir in sorted(p for p in self.inbox.iterdir() if p.is_dir()):
            for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
                files = sorted(series_dir.glob("*.dcm"))
                if not files:
                    continue
                try:
                    ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=[
                        "StudyInstanceUID", "SeriesInstanceUID", "Modality"])
                    study, series, modality = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.Modality)
                except Exception as exc:  # the SCP checked it; a file changed since is left out, not fatal
                    log.warning("node %s: inbox series %s unreadable (%s)", self.name, series_dir.name,
                                type(exc).__name__)
                    continue
                if modality.upper() in OWN_OUTPUT or (self.modalities and modality.upper() not in self.modalities):
                    continue
                found.setdefault(study, []).append((series, modality, len(files)))
        return found

    def _arrived(self, study: str) -> datetime | None:
        """When the inbox last received an instance of ``study`` (its newest file), or None polling a PACS."""
        if self.inbox is None:
            return None
        times = [f.stat().st_mtime for f in (self.inbox / pseudonym(study)).glob("*/*.dcm")]
        return datetime.fromtimestamp(max(times), UTC) if times else None

    def poll_once(self) -> Poll:
        poll = Poll()
        try:
            studies = self.studies()
        except DataError as exc:  # the PACS cannot be searched: nothing recorded, the next poll tries again
            poll.error = scrub(str(exc))
            log.warning("node %s: %s", self.name, poll.error)
            return poll
        now = datetime.now(UTC)
        for study, series in studies.items():
            poll.seen += 1
            self.metrics.seen.inc()
            key = pseudonym(study)
            job = self.registry.job(self.name, key)
            done = set(job.result.get("series", [])) if job is not None and job.status == "done" else set()
            todo = [s for s in series if pseudonym(s[0]) not in done]
            if job is not None and (job.status == "parked" or (job.status == "retry" and job.next_try
                                                               and job.next_try > now)
                                    or (job.status == "done" and (not todo or "series" not in job.result))):
                poll.skipped += 1
                self.metrics.skipped.inc()
                continue
            if not self._settled(key, series, study):
                poll.waiting += 1
                continue
            if done:
                poll.reopened += 1
                self.metrics.reopened.inc()
                log.info("node %s: study %s reopened: %d new series", self.name, key, len(todo))
            t0 = time.perf_counter()
            try:
                reports = self.process(study, todo)
            except Exception as exc:
                log.debug("node %s: study %s failed", self.name, key, exc_info=True)
                reason = scrub(f"{type(exc).__name__}: {exc}" if not isinstance(exc, DataError) else str(exc))
                job = self.registry.record_job(self.name, key, done=False, reason=reason,
                                               max_attempts=self.max_attempts, backoff_seconds=self.backoff)
                outcome = "parked" if job.status == "parked" else "retry"
                self.metrics.failed.labels(outcome).inc()
                poll.failed += 1
                poll.parked += job.status == "parked"
                log.warning("node %s: study %s attempt %d failed (%s): %s", self.name, key, job.attempts, outcome,
                            reason)
                continue
            before = job.result if done else {}
            self.registry.record_job(self.name, key, done=True, result={
                "reports": before.get("reports", 0) + len(reports),
                "labels": before.get("labels", []) + [r["label"] for r in reports], "model": self.model_ref,
                "version": self.version, "series": sorted(done | {pseudonym(s[0]) for s in todo})})
            self.metrics.processed.inc()
            self.metrics.latency.observe(time.perf_counter() - t0)
            poll.processed += 1
            poll.reports.extend(reports)
            log.info("node %s: study %s: %d report(s) stored", self.name, key, len(reports))
        return poll

    def _settled(self, key: str, series: list[tuple[str, str, int]], study: str) -> bool:
        """Whether a study has stopped changing: the same series and instance counts for ``settle_seconds`` (a
        modality sends a study instance by instance; a half-arrived series must not be reported on). The
        signature and since when it holds are the database's, so restarts and ``--once`` polls agree."""
        if self.settle <= 0:
            return True
        signature = hashlib.sha256(repr(sorted((pseudonym(uid), n) for uid, _, n in series)).encode()).hexdigest()
        since = self.registry.observe_study(self.name, key, signature, at=self._arrived(study))
        return (datetime.now(UTC) - since).total_seconds() >= self.settle

    def process(self, study: str, series: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
        """Fetch each watched series and store the model's answer with STOW-RS: a classifier's or a detector's as one
        SR per answer (a volume model: the series; a 2-D model: each image; a detector's boxes as ROIs,
        ``pacs.sr.answer_sr``), a segmentation model's as a DICOM SEG of the series."""
        import tempfile

        import pydicom

        from lepton.pacs.sr import answer_sr

        run = self.run_model()
        client = Source.parse(f"dicomweb+{self.base}").client() if self.results_to is None else None
        reports = []
        for series_uid, _, _ in series:
            if self.inbox is not None:
                folder = self.inbox / pseudonym(study) / pseudonym(series_uid)
            else:
                folder = fetch(Source.parse(f"dicomweb+{self.base}?StudyInstanceUID={study}"
                                            f"&SeriesInstanceUID={series_uid}"), self.cache)[0]
            files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
            if "dicom_seg" in run.task.encodings:  # the answer as a DICOM SEG of the series, not an SR
                with tempfile.TemporaryDirectory() as tmp:
                    (row,) = run.predict([folder], output=tmp, dicom_seg=True)
                    seg = pydicom.dcmread(row["dicom_seg"])
                self._store(client, seg)
                reports.append({"label": run.task.answer_line(row), "kind": "SEG",
                                "series": pseudonym(series_uid), "report": pseudonym(str(seg.SOPInstanceUID))})
                continue
            inputs = [folder] if run.preprocessing.spatial_dims == 3 else files
            for item in inputs:
                rows = run.predict([item])
                evidence = [pydicom.dcmread(f, stop_before_pixels=True) for f in (files if item == folder
                                                                                   else [item])]
                for row in rows:
                    sr = answer_sr(evidence, row, model=self.model_ref.split("@")[0], version=self.version)
                    self._store(client, sr)
                    reports.append({"label": run.task.answer_line(row), "kind": "SR", "series": pseudonym(series_uid),
                                    "report": pseudonym(str(sr.SOPInstanceUID))})
                if self.explain:
                    sc = self._overlay(run, item, evidence[0])
                    self._store(client, sc)
                    reports.append({"label": run.task.answer_line(rows[0]), "kind": "SC",
                                    "series": pseudonym(series_uid), "report": pseudonym(str(sc.SOPInstanceUID))})
        return reports

    def _overlay(self, run, item: Path, reference):
        """The Grad-CAM overlay of one input (a series or an image) as a Secondary Capture."""
        import tempfile

        from lepton.explain import explain
        from lepton.pacs.sr import overlay_sc

        with tempfile.TemporaryDirectory() as tmp:
            (row,) = explain(run, [item], method=self.explain, output=tmp)
            png = Path(row["overlay"]).read_bytes()
        return overlay_sc(reference, png, model=self.model_ref.split("@")[0], version=self.version,
                          explained=row["class"], method=self.explain, volume=item.is_dir())

    def _store(self, client, dataset) -> None:
        if self.results_to is not None:
            from lepton.pacs.dimse import send

            send([dataset], self.results_to, ae_title=self.ae_title, ssl_context=self.tls)
            return
        try:
            client.store_instances([dataset])
        except Exception as exc:
            raise DataError(f"STOW-RS of a result to {self.base} failed: {scrub(str(exc))[:300]}") from None

    def run(self, interval: float = 10.0, stop: threading.Event | None = None, polls: int | None = None) -> None:
        """Poll every ``interval`` seconds until ``stop`` is set (or ``polls`` polls are done)."""
        interval = check_number("interval", interval, *SETTING_BOUNDS["interval"])
        stop = stop or threading.Event()
        done = 0
        while not stop.is_set():
            poll = self.poll_once()
            log.info("node %s: %d seen, %d processed (%d reopened), %d failed, %d skipped, %d still arriving%s",
                     self.name, poll.seen, poll.processed, poll.reopened, poll.failed, poll.skipped, poll.waiting,
                     f" ({poll.error})" if poll.error else "")
            done += 1
            if polls is not None and done >= polls:
                return
            stop.wait(interval)
