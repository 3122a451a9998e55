"""Registry settings and validation reports: a version's TRIPOD+AI / CLAIM report (``lepton.validation.report``)
stored beside its artifacts and summarised in its card, and the rule that promotion to production requires one."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from lepton.errors import RegistryError
from lepton.registry.db import Base, undefined_as_null, utcnow

#: The settings a registry keeps, with their type and meaning.
SETTINGS: dict[str, tuple[type, str]] = {
    "require_validation_report": (bool, "promotion to production requires an attached validation report"),
}
_SECTION = re.compile(r"\n## Validation report\n.*?(?=\n## |\Z)", re.S)


class SettingRow(Base):
    __tablename__ = "registry_settings"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class ValidationMixin:
    """Settings and validation reports (mixed into ``Registry``)."""

    def settings(self) -> dict[str, Any]:
        """Every setting with its value (the default where never set)."""
        with Session(self.engine) as session:
            stored = {r.key: r.value for r in session.scalars(select(SettingRow))}
        return {key: stored.get(key, kind()) for key, (kind, _) in SETTINGS.items()}

    def set_setting(self, key: str, value: Any) -> dict[str, Any]:
        """Set a registry setting (``require_validation_report``: true/false); returns the settings."""
        if key not in SETTINGS:
            raise RegistryError(f"unknown registry setting {key!r}; settings: {', '.join(SETTINGS)}")
        kind = SETTINGS[key][0]
        if kind is bool and isinstance(value, str):
            text = value.strip().lower()
            if text not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                raise RegistryError(f"{key} takes true or false (got {value!r})")
            value = text in ("true", "1", "on", "yes")
        if not isinstance(value, kind):
            raise RegistryError(f"{key} takes a {kind.__name__} (got {value!r})")

        def write(session: Session) -> None:
            row = session.get(SettingRow, key)
            if row is None:
                session.add(SettingRow(key=key, value=value))
            else:
                row.value = value

        self._retrying(write)
        return self.settings()

    def attach_report(self, ref: str, markdown: str, html: str | None = None,
                      summary: dict[str, Any] | None = None) -> Any:
        """Store a validation report (Markdown, and HTML) with a version, record its summary in the version's metrics
        (``validation_report``) and add a section to its model card that points to it (replacing an earlier one)."""
        version = self.get(ref)
        md_sha = self.store.put(markdown.encode("utf-8"))
        extra = {"validation_report": md_sha}
        if html is not None:
            extra["validation_report_html"] = self.store.put(html.encode("utf-8"))
        record = {"sha256": md_sha, **undefined_as_null(summary or {})}
        card = self.card(version.ref)
        lines = ["", "## Validation report",
                 f"- Attached: `{md_sha[:16]}…` (`lepton models report {version.ref}`); laid out by TRIPOD+AI and "
                 "CLAIM items."]
        for key, value in (summary or {}).get("highlights", {}).items():
            lines.append(f"- {key}: {value}")
        card = _SECTION.sub("", card).rstrip("\n") + "\n" + "\n".join(lines) + "\n"
        card_sha = self.store.put(card.encode("utf-8"))

        def write(session: Session) -> None:
            row = self._row(session, version.ref, lock=True)
            row.artifacts = {**row.artifacts, **extra, "card": card_sha}
            row.metrics = {**(row.metrics or {}), "validation_report": record}

        self._retrying(write)
        return self.get(version.ref)

    def report(self, ref: str, fmt: str = "md") -> str:
        """A version's attached validation report (``md`` or ``html``)."""
        version = self.get(ref)
        key = "validation_report" if fmt == "md" else "validation_report_html"
        if key not in version.artifacts:
            raise RegistryError(f"{version.ref} has no validation report"
                                + (" in HTML" if fmt != "md" else "") + "; make one with `lepton validate report`")
        return self.store.get(version.artifacts[key], f"{version.ref} validation report").decode("utf-8")

    def check_promotion(self, ref: str, stage: str) -> None:
        """Refuse a promotion the registry's rules forbid: production without a validation report when
        ``require_validation_report`` is on."""
        if stage != "production" or not self.settings()["require_validation_report"]:
            return
        version = self.get(ref)
        if "validation_report" not in version.artifacts:
            raise RegistryError(
                f"{version.ref} has no validation report, and this registry requires one for production "
                f"(require_validation_report is on): run `lepton validate report RUN --register {version.ref}` "
                "first, or turn the rule off with `lepton models settings require_validation_report false`")
