"""A batch job's state on disk, built so that a kill at any instant loses at most unflushed work and never duplicates
or drops a row.

Beside the output ``results.parquet`` the job keeps ``results.parquet.parts/``:

- ``job.json``: what the job is (model, sources, options); a restart with other settings is refused, not mixed in.
- ``part-000000.parquet``, ``part-000001.parquet``, …: complete rows of whole inputs (every frame of an input goes in
  the same part), each written to a temporary name, fsynced and renamed, so a part is either all there or absent;
  a torn temporary file is deleted at the next start.

A restart reads the ``path`` column of the parts (a few bytes a row) into a sorted array of 64-bit key hashes and
skips those inputs. ``finish`` merges the parts, in order, into the output (one row group a part) through a temporary
file renamed over the output, then removes the parts: a kill during the merge leaves the parts, and the merge is
redone. An output with no parts folder beside it is a finished job: the same command again reports it done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lepton.errors import ConfigError

PART = re.compile(r"^part-(\d{6,})\.parquet$")


def key_hash(path: str) -> int:
    """An input key's 64-bit hash (BLAKE2b): what the done set holds."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PartStore:
    """The parts folder of one output: numbered, atomically written Parquet parts and the job's identity."""

    def __init__(self, output: str | Path, job: dict[str, Any], schema, *, overwrite: bool = False) -> None:
        import pyarrow  # noqa: F401  (fail early with a clear message when it is missing)

        self.output = Path(output)
        self.kind = "csv" if self.output.suffix.lower() == ".csv" else "parquet"
        self.parts = self.output.with_name(self.output.name + ".parts")
        self.schema = schema
        self.job = job
        shutil.rmtree(self._trash(), ignore_errors=True)  # parts a finished job was removing when it was killed
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.output.unlink(missing_ok=True)
        self.finished = self.output.exists() and not self.parts.exists()
        if self.finished:
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        marker = self.parts / "job.json"
        if marker.exists():
            found = json.loads(marker.read_text())
            if found != job:
                diff = sorted(k for k in set(found) | set(job) if found.get(k) != job.get(k))
                raise ConfigError(f"{self.parts} holds a job with other settings ({', '.join(diff)}); finish it with "
                                  "the same command, or start again with --overwrite")
        else:
            from lepton.utils import atomic_write_json

            atomic_write_json(marker, job)
        for stale in self.parts.glob(".*.tmp"):  # a part torn by a kill mid-write: it never became a part
            stale.unlink(missing_ok=True)
        numbers = [int(m.group(1)) for p in self.parts.iterdir() if (m := PART.match(p.name))]
        self.next_part = max(numbers, default=-1) + 1

    def _trash(self) -> Path:
        return self.output.with_name(f".{self.output.name}.parts-merged")

    def part_paths(self) -> list[Path]:
        return sorted((p for p in self.parts.iterdir() if PART.match(p.name)), key=lambda p: int(PART.match(
            p.name).group(1)))

    def done(self) -> np.ndarray:
        """The sorted 64-bit hashes of the inputs already written (every part's ``path`` column)."""
        import pyarrow.parquet as pq

        if self.finished:
            return self.finished_keys()
        hashes: list[np.ndarray] = []
        for part in self.part_paths():
            paths = pq.read_table(part, columns=["path"]).column("path").to_pylist()
            hashes.append(np.fromiter((key_hash(p) for p in paths), np.uint64, len(paths)))
        return np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)

    def finished_keys(self) -> np.ndarray:
        """A finished output's keys (its ``path`` column, read in batches)."""
        out: list[np.ndarray] = []
        for batch in self.read_output(["path"]):
            paths = batch.column(0).to_pylist()
            out.append(np.fromiter((key_hash(p) for p in paths), np.uint64, len(paths)))
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.uint64)

    def read_output(self, columns: list[str]):
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(self.output).iter_batches(columns=columns)
        else:
            import pyarrow.csv as pcsv

            opts = pcsv.ConvertOptions(include_columns=columns, column_types={c: "string" for c in columns})
            yield from pcsv.open_csv(self.output, convert_options=opts)

    def write(self, rows: list[dict[str, Any]] | Any) -> Path | None:
        """One part: ``rows`` (dicts, or an Arrow table) of whole inputs, written atomically; None when empty."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self.schema)
        if table.num_rows == 0:
            return None
        table = table.select(self.schema.names).cast(self.schema)
        target = self.parts / f"part-{self.next_part:06d}.parquet"
        tmp = self.parts / f".{target.name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(self.parts)
        self.next_part += 1
        return target

    def finish(self) -> int:
        """Merge the parts, in order, into the output (atomically) and remove them; the number of rows."""
        import pyarrow.parquet as pq

        if self.finished:
            return self.count_rows()
        tmp = self.output.with_name(f".{self.output.name}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        rows = 0
        parts = self.part_paths()
        if self.kind == "parquet":
            with pq.ParquetWriter(tmp, self.schema, compression="zstd") as writer:
                for part in parts:
                    table = pq.read_table(part).cast(self.schema)
                    writer.write_table(table)
                    rows += table.num_rows
        else:
            import pyarrow.csv as pcsv

            with pcsv.CSVWriter(tmp, self.schema) as writer:
                for part in parts:
                    table = pq.read_table(part).cast(self.schema)
                    writer.write_table(table)
                    rows += table.num_rows
            if not parts:
                tmp.write_text(",".join(f'"{n}"' for n in self.schema.names) + "\n")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.output)
        _fsync_dir(self.output.parent)
        trash = self._trash()
        os.replace(self.parts, trash)  # one rename: the job reads as finished from here on, whatever is left
        shutil.rmtree(trash, ignore_errors=True)
        self.finished = True
        return rows

    def count_rows(self) -> int:
        return sum(b.num_rows for b in self.read_output(["path"]))
