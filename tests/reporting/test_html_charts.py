"""The report page's charts stay readable with many runs (a new user's 31-run page: overlapping x
labels, y ticks like ``1.8e-06``, overlapping per-month y labels, every title repeated as a caption).
The options are asserted in the generated SVG at 3 and 40 runs; tests/history/test_report_page.py
loads a page in headless Chromium."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from provisioner.history.store import RUN_FIELDS, History
from provisioner.reporting.dashboard import gather
from provisioner.reporting.html import X_LABEL_ROTATION, X_LABELS_SHOWN, Y_TICKS_MAX, render, usd_tick


def _page(tmp_path: Path, runs: int) -> str:
    with History(tmp_path / "history.sqlite") as db:
        for i in range(runs):
            month = 1 + i * 11 // max(runs - 1, 1)
            started = f"2026-{month:02d}-{1 + i % 27:02d}T{i % 24:02d}:{i % 60:02d}:00+00:00"
            row: dict[str, Any] = {name: 0 for name in RUN_FIELDS}
            row.update(run_id=f"r{i:03d}", started_at=started, finished_at=started,
                       duration_s=5.0 + i % 7 * 9, project="p", revision=None, branch=None, host="h",
                       ci_job=None, shard=None,
                       layers=["unit"], tests=20, passed=17 + i % 4, failed=3 - i % 4,
                       cost_usd=1.2e-6 + (i % 5) * 4e-7, list_cost_usd=1.2e-6, retained=[])
            db.record(row, [])  # type: ignore[arg-type]
        return render(gather(db))


def _charts(page: str) -> dict[str, str]:
    """Each chart's SVG by its title."""
    out = {}
    for svg in re.findall(r"<svg.*?</svg>", page, re.DOTALL):
        title = re.search(r'<text[^>]*class="title[^"]*"[^>]*>([^<]+)</text>', svg)
        assert title, svg[:300]
        out[title.group(1)] = svg
    return out


def _axis_labels(svg: str, axis: str) -> list[tuple[str, str]]:
    """(text, transform) of the labels of the chart's x or y axis (pygal: ``<g class="axis x">``)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg)
    out = []
    for group in root.iter():
        if group.tag.endswith("}g") and (group.get("class") or "").startswith(f"axis {axis}"):
            out += [(t.text or "", t.get("transform") or "") for t in group.iter() if t.tag.endswith("}text")]
    return out


@pytest.mark.parametrize("runs", [3, 40])
def test_charts_thin_and_rotate_labels_and_write_dollars(tmp_path: Path, runs: int) -> None:
    page = _page(tmp_path, runs)
    charts = _charts(page)
    assert set(charts) == {"pass rate %", "suite duration s", "cost per run", "cost per month"}
    assert "<figcaption" not in page  # the title is in the chart; no caption repeats it
    for title, svg in charts.items():
        assert page.count(f">{title}</text>") == 1, title
        xs = _axis_labels(svg, "x")
        assert 1 <= len(xs) <= X_LABELS_SHOWN, (title, xs)
        assert all(transform.startswith(f"rotate({X_LABEL_ROTATION} ") for _, transform in xs), (title, xs)
        ys = [text for text, _ in _axis_labels(svg, "y")]
        assert 2 <= len(ys) <= Y_TICKS_MAX + 2, (title, ys)  # a scale of at most ~5 steps
        if title.startswith("cost"):
            assert all(re.fullmatch(r"\$\d+(\.\d+)?", y) for y in ys), (title, ys)
        assert not [y for y in ys if "e-" in y or "e+" in y], (title, ys)


def test_usd_tick_writes_small_amounts_in_full() -> None:
    assert usd_tick(1.8e-06) == "$0.0000018"
    assert usd_tick(2e-06) == "$0.000002"
    assert usd_tick(0.00042) == "$0.00042"
    assert usd_tick(0.25) == "$0.25"
    assert usd_tick(12.0) == "$12"
    assert usd_tick(1234.5) == "$1234"
    assert usd_tick(0) == "$0"
    assert usd_tick(-1.5e-5) == "-$0.000015"
