"""The labelling folder: which cases were labelled, with what, in which round (``labels.csv``, ``rounds.json``)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lepton.errors import DataError
from lepton.utils import atomic_write_json, atomic_write_text

FIELDS = ("case", "sha256", "label", "round")


@dataclass
class Labels:
    """The labels of one labelling folder, by pixel hash."""

    folder: Path
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # sha256 -> row
    rounds: list[dict] = field(default_factory=list)

    @property
    def next_round(self) -> int:
        return max((r["round"] for r in self.rounds), default=0) + 1

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(sorted(self.rows.values(), key=lambda r: (int(r["round"]), r["case"])))
        atomic_write_text(self.folder / "labels.csv", buf.getvalue())
        atomic_write_json(self.folder / "rounds.json", {"rounds": self.rounds})

    def add_round(self, rows: list[dict[str, str]], source: str, round_no: int) -> dict:
        """Record ``rows`` (case, sha256, label) as round ``round_no`` and save."""
        for row in rows:
            self.rows[row["sha256"]] = {**row, "round": str(round_no)}
        now = datetime.now(UTC).isoformat(timespec="seconds")
        record = next((r for r in self.rounds if r["round"] == round_no), None)
        if record is None:
            record = {"round": round_no, "cases": 0, "sources": [], "imported": now}
            self.rounds.append(record)
        record["cases"] += len(rows)
        record["sources"].append(source)
        record["imported"] = now
        self.save()
        return record


def open_labels(folder: str | Path | None) -> Labels:
    """The labelling folder's records (empty when it does not exist yet or is None)."""
    if folder is None:
        return Labels(Path("."))
    folder = Path(folder)
    labels = Labels(folder)
    table, rounds = folder / "labels.csv", folder / "rounds.json"
    try:
        if table.is_file():
            with open(table, newline="", encoding="utf-8") as fh:
                labels.rows = {r["sha256"]: r for r in csv.DictReader(fh)}
        if rounds.is_file():
            labels.rounds = json.loads(rounds.read_text())["rounds"]
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise DataError(f"{folder}: unreadable labelling records ({exc}); restore labels.csv and rounds.json or "
                        "start a new --labels folder") from exc
    return labels
