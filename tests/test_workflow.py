"""The GitHub Actions workflow is real: schema-valid, audited by zizmor, and shaped as the plan says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "test.yml"
BIN = Path(sys.executable).parent
SHA_PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def _load(path: Path = WORKFLOW) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def _tool(name: str) -> str:
    exe = BIN / name
    if not exe.exists():
        pytest.fail(f"{name} is not installed in {BIN}; install the project's test extras")
    return str(exe)


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True, text=True, timeout=120,
    )


def _zizmor(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [_tool("zizmor"), "--offline", "--format", "json", "--no-exit-codes", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _steps_run(job: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def _uses(job: dict[str, Any]) -> list[str]:
    return [step["uses"] for step in job["steps"] if "uses" in step]


def test_workflow_matches_github_schema() -> None:
    proc = _check_jsonschema(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  unit:\n    steps:\n      - run: true\n")  # no runs-on
    assert _check_jsonschema(broken).returncode != 0


def test_zizmor_offline_has_no_findings() -> None:
    findings = _zizmor(WORKFLOW)
    summary = [(f["ident"], f["determinations"]["severity"]) for f in findings]
    assert findings == [], summary


def test_zizmor_flags_an_unsafe_workflow(tmp_path: Path) -> None:
    # The audit must be able to fail: an unpinned action with persisted credentials and a template
    # injection are what the real workflow avoids.
    unsafe = tmp_path / "unsafe.yml"
    unsafe.write_text(
        "on: pull_request_target\n"
        "jobs:\n"
        "  t:\n"
        "    runs-on: ubuntu-24.04\n"
        "    steps:\n"
        "      - uses: actions/checkout@v4\n"
        "        with:\n"
        "          ref: ${{ github.event.pull_request.head.sha }}\n"
        "      - run: echo \"${{ github.event.pull_request.title }}\"\n"
    )
    severities = {f["determinations"]["severity"] for f in _zizmor(unsafe)}
    assert "High" in severities


def test_three_layer_jobs_with_the_right_triggers() -> None:
    data = _load()
    assert set(data["on"]) == {"push", "pull_request"}
    assert set(data["jobs"]) == {"unit", "integration", "e2e"}
    for name in ("unit", "integration"):
        assert "if" not in data["jobs"][name], f"{name} must run on every push and pull request"
    e2e_if = data["jobs"]["e2e"]["if"]
    assert "github.event_name == 'push'" in e2e_if
    assert "github.ref == 'refs/heads/main'" in e2e_if


def test_each_job_sets_up_docker_if_missing_and_runs_its_layer() -> None:
    setup = (ROOT / ".ci" / "setup").read_text()
    # .ci/setup installs a Docker engine only when none is there.
    assert "command -v dockerd" in setup and "docker.io" in setup
    for name, job in _load()["jobs"].items():
        commands = _steps_run(job)
        assert "bash .ci/setup" in commands, name
        ran_layer = re.search(rf"pytest\b[^\n]*--layer {name}\b", commands)
        assert ran_layer, f"{name} job must run pytest --layer {name}"


def test_integration_caches_lm_responses_keyed_on_test_files() -> None:
    job = _load()["jobs"]["integration"]
    caches = [s for s in job["steps"] if s.get("uses", "").startswith("actions/cache@")]
    assert len(caches) == 1
    cache = caches[0]["with"]
    assert cache["path"] == "test/fixtures/lm_responses"
    assert "hashFiles('tests/**/*.py'" in cache["key"]
    cache_dirs = [s.get("env", {}).get("LM_CACHE_DIR") for s in job["steps"] if "pytest" in s.get("run", "")]
    assert "${{ github.workspace }}/test/fixtures/lm_responses" in cache_dirs


def test_secret_only_in_e2e_and_least_privilege() -> None:
    data = _load()
    assert data["permissions"] == {"contents": "read"}
    text = WORKFLOW.read_text()
    assert text.count("secrets.GEMINI_TEST_API_KEY") == 1
    e2e_env = [s.get("env", {}) for s in data["jobs"]["e2e"]["steps"]]
    assert any(env.get("GEMINI_TEST_API_KEY") == "${{ secrets.GEMINI_TEST_API_KEY }}" for env in e2e_env)
    for name in ("unit", "integration"):
        assert "secrets." not in yaml.safe_dump(data["jobs"][name])


def test_actions_pinned_by_commit_and_no_persisted_credentials() -> None:
    for name, job in _load()["jobs"].items():
        for uses in _uses(job):
            assert SHA_PINNED.match(uses), f"{name}: {uses} is not pinned to a commit SHA"
        checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout@"))
        assert checkout["with"]["persist-credentials"] is False
