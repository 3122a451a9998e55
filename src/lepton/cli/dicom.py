"""``lepton dicom-node``, ``lepton pacs`` and ``lepton dicom``: the hospital's DICOM path."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lepton.cli.common import (
    RegistryOpt,
    _finite,
    _registry,
    app,
    console,
)

dicom_app = typer.Typer(help="DICOM for hospital integration: de-identification.", no_args_is_help=True)
app.add_typer(dicom_app, name="dicom")
pacs_app = typer.Typer(help="Data from a PACS over DICOMweb.", no_args_is_help=True)
app.add_typer(pacs_app, name="pacs")


@app.command("dicom-node")
def dicom_node(
    pacs: Annotated[str, typer.Option(help="The PACS's DICOMweb base URL, e.g. http://orthanc:8042/dicom-web.")],
    model: Annotated[str, typer.Option(help="A registered classifier: NAME@production, NAME@3, …")],
    registry: RegistryOpt = None,
    filter_: Annotated[list[str] | None, typer.Option(
        "--filter", help="Which series to run on: modality=CT,DX (repeatable). Default: every series except "
                         "Lepton's own reports.")] = None,
    name: Annotated[str, typer.Option(help="This node's name in the registry's record (one record per name).")] =
    "default",
    interval: Annotated[float, typer.Option(
        help="Seconds between polls of the PACS.", click_type=_finite(0.01, 86_400))] = 10.0,
    max_attempts: Annotated[int, typer.Option(
        help="Attempts per study before it is parked with its reason.", min=1, max=1000)] = 5,
    backoff: Annotated[float, typer.Option(
        help="Seconds before the first retry (doubling each time).", click_type=_finite(0, 86_400))] = 30.0,
    metrics_port: Annotated[int, typer.Option(
        help="Prometheus /metrics on 127.0.0.1:PORT (0 = off).", min=0, max=65535)] = 0,
    once: Annotated[bool, typer.Option("--once", help="Poll once and exit (for cron or a test).")] = False,
    explain: Annotated[str | None, typer.Option(help="Also store a Grad-CAM overlay as a Secondary Capture: "
                                                     "gradcam or gradcam++.")] = None,
    settle: Annotated[float, typer.Option(help="Seconds a study's series and instance counts must stay unchanged "
                                               "before it is processed (studies arrive instance by instance; 0 = "
                                               "at once). --once processes what is there: run it when studies are "
                                               "complete.", click_type=_finite(0, 86_400))] = 30.0,
) -> None:
    """Watch a PACS over DICOMweb: run MODEL on new studies and store each answer back as a DICOM Structured
    Report (STOW-RS). Restartable: the registry records every study (as a pseudonym), so none is processed twice;
    failures are retried with backoff, then parked with the reason."""
    from lepton.pacs.node import DicomNode

    modalities: list[str] = []
    for item in filter_ or []:
        key, _, value = item.partition("=")
        if key.strip().lower() != "modality" or not value.strip():
            raise typer.BadParameter(f"--filter {item!r}: use modality=CT,DX")
        modalities += [m.strip() for m in value.split(",") if m.strip()]
    if max_attempts < 1 or interval <= 0 or backoff < 0 or settle < 0:
        raise typer.BadParameter("--max-attempts must be >= 1, --interval > 0, --backoff and --settle >= 0")
    node = DicomNode(pacs, model, _registry(registry), name=name, modalities=modalities, max_attempts=max_attempts,
                     backoff_seconds=backoff, explain=explain, settle_seconds=0.0 if once else settle)
    node.run_model()  # a model that cannot be loaded stops here, before the first poll
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1", registry=node.metrics.registry)
    if once:
        poll = node.poll_once()
        console.print(f"{poll.seen} studies seen, {poll.processed} processed, {poll.failed} failed "
                      f"({poll.parked} parked), {poll.skipped} skipped, {poll.waiting} still arriving"
                      + (f"; {poll.error}" if poll.error else ""))
        raise typer.Exit(1 if poll.error or poll.failed else 0)
    console.print(f"watching {node.base} every {interval:g} s with {model} (Ctrl-C stops)")
    import contextlib
    import signal

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM (Kubernetes, systemd) stop the node even when it was started with SIGINT ignored (a
    # background job or a supervisor that ignores it inherits that to its children)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the loop between studies' records
        node.run(interval)


@pacs_app.command("export")
def pacs_export(
    source: Annotated[str, typer.Argument(help="dicomweb+http://HOST/dicom-web?PatientID=…&Modality=CT&StudyDate=… "
                                               "(QIDO filters).")],
    out: Annotated[Path, typer.Argument(help="Where the de-identified series go, one folder each.")],
    key_file: Annotated[Path, typer.Option(help="Secret key for remapping UIDs (made if absent; keep it in the "
                                                "hospital: later exports with it join up).")],
) -> None:
    """Build a training set from the PACS: fetch the series SOURCE selects, de-identify them (PS3.15 Basic
    Profile) into OUT. Nothing identifying is printed."""
    from lepton.data.deid import load_key
    from lepton.pacs.export import export

    result = export(source, out, key=load_key(key_file))
    console.print(f"{len(result.series)} series, {result.written} files de-identified into {out}; "
                  f"{len(result.refused)} refused")
    for rel, why in result.refused:
        console.print(f"  refused {rel}: {why}")


@dicom_app.command("deidentify")
def dicom_deidentify(
    source: Annotated[Path, typer.Argument(help="A DICOM file or a folder of them (searched recursively).")],
    out: Annotated[Path, typer.Argument(help="Where the de-identified copies go (outside SOURCE).")],
    key_file: Annotated[Path | None, typer.Option(
        help="Secret key for remapping UIDs (made with 0600 permissions if absent). The same key gives the same "
             "new UIDs in every run, so later exports still join up; keep it inside the hospital. Without it UIDs "
             "are consistent within this run only.")] = None,
) -> None:
    """De-identify DICOM with the PS3.15 Basic Application Level Confidentiality Profile: listed attributes
    removed, emptied or replaced, private attributes removed, UIDs remapped consistently; images with burned-in
    annotation refused. Files are written as NEW_SOP_INSTANCE_UID.dcm."""
    from lepton.data.deid import deidentify, load_key

    report = deidentify(source, out, key=load_key(key_file))
    console.print(f"{report.written} written to {out}; {len(report.refused)} refused")
    for rel, reason in report.refused:
        console.print(f"  refused {rel}: {reason}")
    actions = ", ".join(f"{code} {n}" for code, n in sorted(report.actions.items()))
    console.print(f"actions (PS3.15 codes): {actions}")
    if report.written == 0:
        raise typer.Exit(1)


