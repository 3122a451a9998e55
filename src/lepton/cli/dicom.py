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
    model: Annotated[str, typer.Option(help="A registered classifier: NAME@production, NAME@3, …")],
    pacs: Annotated[str | None, typer.Option(help="The PACS's DICOMweb base URL, e.g. http://orthanc:8042/dicom-web "
                                                  "(studies polled from it; results stored to it by STOW-RS).")] = None,
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
    settle: Annotated[float | None, typer.Option(
        help="Seconds a study's series and instance counts must stay unchanged before it is processed (studies "
             "arrive instance by instance; 0 = at once). Kept in the registry, so restarts and --once polls apply "
             "it. Default 30, or 0 with --once.", click_type=_finite(0, 86_400))] = None,
    listen: Annotated[int | None, typer.Option(
        help="Run a DIMSE Storage SCP on this port: modalities and PACS C-STORE studies (CT, MR, CR, DX, US) into "
             "--inbox, which the node processes instead of polling --pacs.", min=0, max=65535)] = None,
    host: Annotated[str, typer.Option(help="The address the Storage SCP listens on.")] = "0.0.0.0",
    inbox: Annotated[Path | None, typer.Option(help="Where received studies are kept (with --listen).")] = None,
    ae_title: Annotated[str, typer.Option(help="This node's AE title (called and calling).")] = "LEPTON",
    allow_ae: Annotated[list[str] | None, typer.Option(
        help="Calling AE titles the SCP accepts (repeatable; default: any).")] = None,
    results_to: Annotated[str | None, typer.Option(
        help="Send results by C-STORE to this AE, TITLE@HOST:PORT, instead of STOW-RS to --pacs.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="DICOM over TLS: this node's certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="DICOM over TLS: its private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(
        help="DICOM over TLS: the CA that signs peers' certificates (the SCP then requires client certificates).")]
    = None,
) -> None:
    """Run MODEL on new studies — polled from a PACS over DICOMweb, or C-STOREd to this node's Storage SCP
    (--listen) — and send each answer back as a DICOM Structured Report (or SEG): STOW-RS to --pacs, or C-STORE to
    --results-to. Restartable: the registry records every study (as a pseudonym), so none is processed twice; a
    series arriving later reopens its study; failures are retried with backoff, then parked with the reason."""
    from lepton.pacs.node import DicomNode

    modalities: list[str] = []
    for item in filter_ or []:
        key, _, value = item.partition("=")
        if key.strip().lower() != "modality" or not value.strip():
            raise typer.BadParameter(f"--filter {item!r}: use modality=CT,DX")
        modalities += [m.strip() for m in value.split(",") if m.strip()]
    if settle is None:
        settle = 0.0 if once else 30.0
    if max_attempts < 1 or interval <= 0 or backoff < 0 or settle < 0:
        raise typer.BadParameter("--max-attempts must be >= 1, --interval > 0, --backoff and --settle >= 0")
    if listen is not None and inbox is None:
        raise typer.BadParameter("--listen needs --inbox: the folder the SCP writes into and the node reads")
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    from lepton.pacs.dimse import tls_context

    server_tls = tls_context(tls_cert, tls_key, tls_ca, server=True) if tls_cert else None
    client_tls = tls_context(tls_cert, tls_key, tls_ca, server=False) if tls_cert else None
    node = DicomNode(pacs, model, _registry(registry), name=name, modalities=modalities, max_attempts=max_attempts,
                     backoff_seconds=backoff, explain=explain, settle_seconds=settle, inbox=inbox,
                     results_to=results_to, ae_title=ae_title, tls=client_tls)
    node.run_model()  # a model that cannot be loaded stops here, before the first poll
    scp = None
    if listen is not None and not once:
        from lepton.pacs.dimse import StorageSCP

        scp = StorageSCP(inbox, ae_title=ae_title, host=host, port=listen, allowed=allow_ae,
                         ssl_context=server_tls).start()
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1", registry=node.metrics.registry)
    if once:
        poll = node.poll_once()
        console.print(f"{poll.seen} studies seen, {poll.processed} processed, {poll.failed} failed "
                      f"({poll.parked} parked), {poll.skipped} skipped, {poll.waiting} still arriving"
                      + (f"; {poll.error}" if poll.error else ""))
        raise typer.Exit(1 if poll.error or poll.failed else 0)
    where = f"AE {ae_title} on {host}:{scp.port} into {inbox}" if scp else node.base
    console.print(f"watching {where} every {interval:g} s with {model} (Ctrl-C stops)")
    import contextlib
    import signal

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM (Kubernetes, systemd) stop the node even when it was started with SIGINT ignored (a
    # background job or a supervisor that ignores it inherits that to its children)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the loop between studies' records
            node.run(interval)
    finally:
        if scp is not None:
            scp.stop()


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
    from lepton.hospital.deid import load_key
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
    from lepton.hospital.deid import deidentify, load_key

    report = deidentify(source, out, key=load_key(key_file))
    console.print(f"{report.written} written to {out}; {len(report.refused)} refused")
    for rel, reason in report.refused:
        console.print(f"  refused {rel}: {reason}")
    actions = ", ".join(f"{code} {n}" for code, n in sorted(report.actions.items()))
    console.print(f"actions (PS3.15 codes): {actions}")
    if report.written == 0:
        raise typer.Exit(1)


