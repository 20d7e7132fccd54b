"""A run's files: the env file and the current-run pointer."""

from __future__ import annotations

from pathlib import Path

from provisioner.runtime.state import (
    CURRENT_RUN,
    current_run_id,
    render_env,
)
from provisioner.settings import Settings


def test_env_file_quotes_values() -> None:
    assert render_env({"A": "x y", "B": "1"}) == "export A='x y'\nexport B=1\n"


def test_a_torn_current_file_means_no_current_run(settings: Settings) -> None:
    current = Path(settings.state_dir) / CURRENT_RUN
    current.parent.mkdir(parents=True, exist_ok=True)
    for text in (b"", b"\xff\xfe", b"../../etc\n", b"ab12"):
        current.write_bytes(text)
        assert current_run_id(settings) == ("ab12" if text == b"ab12" else None)
