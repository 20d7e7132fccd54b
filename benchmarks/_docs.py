"""What every benchmark's ``--write-docs`` does: replace its own section of docs/benchmarks.md.

A section runs from its ``## `` heading to the next ``## `` heading (or the end); a section not
there yet is appended. The scripts run as ``python benchmarks/bench_x.py``, so this folder is on
``sys.path`` and ``from _docs import replace_section`` finds this module.
"""

from __future__ import annotations

from pathlib import Path


def replace_section(doc_path: Path, heading: str, text: str) -> None:
    """Write ``text`` (starting with ``heading``) in place of the section ``heading`` of ``doc_path``."""
    doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
    if heading in doc:
        head, _, rest = doc.partition(heading)
        tail = rest.split("\n## ", 1)
        doc = head + text.rstrip("\n") + "\n" + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    doc_path.write_text(doc)
