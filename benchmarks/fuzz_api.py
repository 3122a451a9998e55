"""API fuzzing beyond one seed: schemathesis against a live `lepton serve` on loopback, every operation, every
phase (examples, coverage, fuzzing, stateful) and every check, at several seeds and a larger example budget than
the fast CI test (tests/test_serve_openapi.py, one seed, 25 examples per operation).

Nothing is widened beyond what the protocols themselves fix: the only statuses allowed for schema-valid requests
besides schemathesis' defaults are listed in ``ALLOWED`` with their reasons, and printed. Each seed runs twice:
with the path parameters fixed to the served model (requests reach the model), and free (unknown names and
versions, so the 404s are exercised too). It prints the machine, the test cases run and the failures by check
for every run, and the totals; it exits 1 when any run failed.

    .venv/bin/python benchmarks/fuzz_api.py                       # 5 seeds x 200 examples per operation
    .venv/bin/python benchmarks/fuzz_api.py --seeds 1 --max-examples 20 --modes served   # a quick look

It builds its own small model (synthetic images, a few seconds of training) and registry in a temporary folder;
nothing leaves the machine. It skips (exit 0) when schemathesis is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from machine import cpu_summary

#: Statuses allowed for schema-valid requests beyond schemathesis' defaults, each with the reason a JSON Schema
#: cannot rule it out. (path regex, statuses, reason)
ALLOWED = [
    ("/(predict|view)$", ["422"],
     "an upload's bytes are a file: a schema can say `format: binary`, not that the bytes decode to an image "
     "(PNG, DICOM, …) or that nested `array` rows have one length; nor that view's `window` string holds a known "
     "preset or a finite CENTER,WIDTH with a width above 0"),
    ("/infer$", ["400", "413"],
     "the Open Inference Protocol's request schema is the same for every model: it cannot tie `data`'s length to "
     "`shape` or fix this model's input shape, and the protocol answers such tensors 400 (413 over the server's "
     "limits)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_registry(root: Path) -> dict:
    """A registry with cxr v1 (production) and v2 for tenant 'clinic', 'shared' for everyone, and an admin key."""
    from lepton.data.tools.synthetic import write_synthetic_npz
    from lepton.registry import Registry
    from lepton.train import train

    npz = write_synthetic_npz(root / "synth.npz", n=120, size=32, seed=1)
    run = train(npz, preset="default", name="tiny", output_dir=str(root / "runs"), epochs=2, batch_size=32,
                lr=2e-3, quiet=True, seed=0)
    reg = Registry.open(root / "reg")
    reg.register_run(run.path, "cxr")
    reg.register_run(run.path, "cxr")
    reg.promote("cxr", 1, "production")
    reg.set_tenant("cxr", "clinic")
    reg.register_run(run.path, "shared")
    return {"registry": str(root / "reg"), "admin": reg.create_key("ops", "admin")}


def start_server(registry: str, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "lepton.cli", "serve", "--model", "cxr@production", "--model", "shared",
           "--registry", registry, "--port", str(port), "--rate-limit", "0"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready in 180 s")


def config_text(mode: str, max_examples: int) -> str:
    lines = ["# written by benchmarks/fuzz_api.py", f"generation.max-examples = {max_examples}",
             "request-timeout = 60.0", ""]
    if mode == "served":
        lines += ["[parameters]", '"path.name" = "cxr"', '"path.version" = "1"', ""]
    for regex, statuses, reason in ALLOWED:
        listed = ", ".join(f'"{s}"' for s in ["2xx", "3xx", "401", "403", "404", "409", "429", *statuses])
        lines += [f"# {reason}", "[[operations]]", f'include-path-regex = "{regex}"',
                  f"checks.positive_data_acceptance.expected-statuses = [{listed}]"]
        if "413" in statuses:  # refused for its size before its values are read (a value out of range inside)
            rejected = ", ".join(f'"{r}"' for r in ["400", "401", "403", "404", "405", "406", "409", "413", "415",
                                                     "422", "428", "429", "5xx"])
            lines += [f"checks.negative_data_rejection.expected-statuses = [{rejected}]"]
        lines += [""]
    return "\n".join(lines)


def fuzz(url: str, key: str, seed: int, mode: str, max_examples: int, work: Path, timeout: float) -> dict:
    """One schemathesis run; its JSON report, the wall time and the tail of its output."""
    exe = Path(sys.executable).parent / "schemathesis"
    out = work / f"{mode}-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "schemathesis.toml").write_text(config_text(mode, max_examples))
    cmd = [str(exe), "--config-file", str(out / "schemathesis.toml"), "run", f"{url}/openapi.json",
           "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful", "--seed", str(seed),
           "--workers", "1", "--no-color", "--generation-database", "none", "-H", f"Authorization: Bearer {key}",
           "--report", "json,junit", "--report-json-path", str(out / "report.json"),
           "--report-junit-path", str(out / "junit.xml")]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=out)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        text = f"timed out after {timeout} s: {(exc.stdout or b'')[-3000:]!r}"
    (out / "output.txt").write_text(text)
    tail = _junit_failures(out / "junit.xml") or text[-3000:]
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return {"report": report, "seconds": time.monotonic() - start, "tail": tail}


def _junit_failures(path: Path, lines: int = 14, width: int = 300) -> str:
    """The failures in a JUnit report, each cut to its first lines (generated bodies can be long)."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return ""
    shown = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for failure in [*case.iter("failure"), *case.iter("error")]:
            text = "\n".join(line[:width] for line in (failure.text or "").splitlines()[:lines])
            shown.append(f"--- {case.get('name')}\n{text}")
    return "\n".join(shown)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N (default 5)")
    parser.add_argument("--max-examples", type=int, default=200, help="examples per operation and phase")
    parser.add_argument("--modes", default="served,any", help="served (path fixed to the model), any, or both")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds one schemathesis run may take")
    parser.add_argument("--keep", type=Path, default=None, help="keep the reports in this folder")
    args = parser.parse_args()
    if shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None:
        print("skipped: schemathesis is not installed (pip install -e '.[dev]')")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    modes = [m for m in args.modes.split(",") if m]
    print(f"machine: {cpu_summary()}")
    print(f"schemathesis {_version()}: seeds 1..{args.seeds}, {args.max_examples} examples per operation, "
          f"modes {', '.join(modes)}; phases examples, coverage, fuzzing, stateful; all checks")
    print("statuses allowed beyond schemathesis' defaults (2xx, 3xx, 401, 403, 404, 409, 429):")
    for regex, statuses, reason in ALLOWED:
        print(f"  {regex} {', '.join(statuses)}: {reason}")
    work = Path(tempfile.mkdtemp(prefix="lepton-fuzz-"))
    proc = None
    try:
        setup = build_registry(work)
        proc, url = start_server(setup["registry"], work / "server.log")
        totals: Counter = Counter()
        cases = errors = 0
        print("| seed | mode | test cases | failures (by check) | errors | seconds |")
        print("|---|---|---|---|---|---|")
        for seed in range(1, args.seeds + 1):
            for mode in modes:
                result = fuzz(url, setup["admin"], seed, mode, args.max_examples, work / "reports", args.timeout)
                report = result["report"]
                generated = report.get("test_cases", {}).get("generated", 0)
                by_check = Counter()
                for failure in report.get("failures", []):
                    by_check[failure["type"]] += failure["count"]
                errored = sum(e["count"] for e in report.get("errors", [])) + (0 if report else 1)
                totals.update(by_check)
                cases, errors = cases + generated, errors + errored
                shown = ", ".join(f"{k}: {v}" for k, v in sorted(by_check.items())) or "0"
                print(f"| {seed} | {mode} | {generated} | {shown} | {errored} | {result['seconds']:.0f} |",
                      flush=True)
                if by_check or errored:
                    print(result["tail"], flush=True)
                if proc.poll() is not None:
                    print(f"the server exited: {(work / 'server.log').read_text()[-2000:]}")
                    return 1
        logged = sum(1 for line in (work / "server.log").read_text().splitlines()
                     if line.startswith("ERROR lepton.serve: request "))
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(totals.items())) or "none"
        print(f"total: {cases} test cases over {args.seeds} seeds x {len(modes)} modes; failures by check: {shown}; "
              f"run errors: {errors}")
        print(f"server errors: {totals['ServerError'] + logged} (5xx answers {totals['ServerError']}, requests the "
              f"server logged as failed {logged}); undocumented statuses: {totals['UndefinedStatusCode']}; "
              f"schema-valid requests rejected beyond ALLOWED: {totals['RejectedPositiveData']}")
        return 1 if totals or errors or logged else 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep is not None:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _version() -> str:
    from importlib.metadata import version

    return version("schemathesis")


if __name__ == "__main__":
    sys.exit(main())
