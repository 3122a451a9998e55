"""The README stays a five-minute read and its links lead somewhere (the documentation site itself is checked by
`mkdocs build --strict` in `make test`: every page, link and anchor under docs/)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250

_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where links are links."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(lines)


def links(text: str) -> list[str]:
    return _LINK.findall(_prose(text))


def slug(heading: str) -> str:
    """The anchor a Markdown heading gets, as MkDocs' table of contents (Python-Markdown's slugify) makes it."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text; backticks go below
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose_keep_code(markdown.read_text()), flags=re.M)
    return {slug(h) for h in headings}


def _prose_keep_code(text: str) -> str:
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return "\n".join(lines)


def test_readme_is_short():
    count = len(README.read_text().splitlines())
    assert count <= MAX_README_LINES, (
        f"README.md has {count} lines, over {MAX_README_LINES}: move the detail to a page under docs/ "
        "(listed in mkdocs.yml) and link to it"
    )


def test_readme_relative_links_resolve():
    text = README.read_text()
    targets = [t for t in links(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, flags=re.I)]
    assert targets, "the README links to no page under docs/"
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        file = (README.parent / path).resolve() if path else README
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: {file.relative_to(ROOT)} has no heading with that anchor")
    assert not broken, "README.md links that lead nowhere:\n" + "\n".join(broken)


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first_block = text.split("```", 2)[1]
    assert "make demo" in first_block and "make test" in first_block, "the README's first code block is set-up"


def test_the_link_checker_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Volumes (CT and MRI)\n\n```\n# not a heading\n```\n")
    assert anchors(page) == {"title", "volumes-ct-and-mri"}
    assert slug("PneumoniaMNIST: `benchmarks/pneumonia_mnist.py`") == "pneumoniamnist-benchmarkspneumonia_mnistpy"
    assert links("[a](docs/a.md) ![b](docs/b.png) `[c](not-a-link.md)`\n```\n[d](fenced.md)\n```") == [
        "docs/a.md",
        "docs/b.png",
    ]


def test_api_reference_covers_the_public_api():
    import lepton

    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    documented = set(re.findall(r"^::: ([\w.]+)", page, flags=re.M))
    missing = [name for name in lepton._EXPORTS if not any(target.endswith(f".{name}") for target in documented)]
    assert not missing, f"docs/reference/api.md has no `::: module.NAME` entry for lepton.{', lepton.'.join(missing)}"


def test_the_package_description_says_what_lepton_is():
    """The one line package indexes and `pip show` print: the whole of Lepton, not its first task."""
    import tomllib

    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    assert "\n" not in description and len(description) <= 200
    for words in ("classification", "segmentation", "2-D", "3-D", "trained", "evaluated", "explained", "served",
                  "hospital"):
        assert words in description, words
