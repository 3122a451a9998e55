"""Griffe extension for the API reference: doctest examples in docstrings shown as Python console code.

Lepton's docstrings carry short ``>>>`` examples in free text (checked by no parser, marked ``# doctest: +SKIP``).
Markdown would read ``>>>`` as nested block quotes; this wraps each run of ``>>>``/``...`` lines and their output in
a ``pycon`` code block and drops the doctest flags, leaving the source untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_FLAGS = re.compile(r"\s*#\s*doctest:\s*[^\n]*$")


def fence_doctests(text: str) -> str:
    out: list[str] = []
    in_fence = in_example = False
    for line in text.splitlines():
        stripped = line.strip()
        if in_example and not stripped:
            out.append("```")
            in_example = False
        if stripped.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not in_example and stripped.startswith(">>>"):
            if out and out[-1].strip():
                out.append("")
            out.append("```pycon")
            in_example = True
        out.append(_FLAGS.sub("", line) if in_example else line)
    if in_example:
        out.append("```")
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
