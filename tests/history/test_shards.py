"""A suite split into shards for real (pytest-split's --splits N --group i: N pytest processes, N
report files), then the workflow's own merge step (the `report` job's script, run verbatim):

* the example project's suite: the merged run's tests are the unsharded run's, one cost total;
* a paid suite (real mode, the real google-genai client against `provision standin gemini`, billed
  as Gemini), each shard on two xdist workers: the N shards together stay within the run's
  lm.cost_limit_usd (each enforces 1/N).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.runtime.polling import poll_until

from .._helpers import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "qa_project"
WORKFLOW = ROOT / ".github" / "workflows" / "test.yml"
STANDIN_KEY = "shards-standin-key-0123456789"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PROVISION_", "GITHUB_"))
           and k not in ("TEST_MODE", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "GEMINI_TEST_API_KEY",
                         "LM_CACHE_DIR")}
    env.update(extra)
    return env


def start_pytest(project: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", *args], cwd=project, env=clean_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], ok: tuple[int, ...] = (0,)) -> str:
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in ok, out
    return out


def run_shards(project: Path, artifacts: Path, name: str, shards: int, *args: str,
               ok: tuple[int, ...] = (0,), **env: str) -> list[dict[str, Any]]:
    """N shards side by side (as N CI runners would), each writing ``artifacts/shard<i>/<name>``."""
    procs = [start_pytest(project, *args, "--splits", str(shards), "--group", str(i),
                          "--splitting-algorithm", "least_duration", "--provision-report",
                          str(artifacts / f"reports-shard{i}" / name), PROVISION_SHARD=f"shard{i}", **env)
             for i in range(1, shards + 1)]
    try:
        outputs = [finish(proc, ok) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = [json.loads((artifacts / f"reports-shard{i}" / name).read_text()) for i in range(1, shards + 1)]
    for report, output in zip(reports, outputs, strict=True):
        report["output"] = output  # pytest's terminal output (not part of the report file)
    return reports


def workflow_merge_step(workdir: Path, artifacts_from: Path) -> dict[str, Any]:
    """The `report` job's merge step of .github/workflows/test.yml, its script run verbatim in
    ``workdir`` (artifacts downloaded to its `path`, provisioner in ./.venv) — what CI runs."""
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["report"]
    download = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/download-artifact@"))
    step = next(s for s in job["steps"] if "provision history merge" in s.get("run", ""))
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(artifacts_from, workdir / download["with"]["path"])
    (workdir / ".venv").symlink_to(Path(sys.executable).parent.parent)
    summary = workdir / "step-summary.md"
    env = clean_env(GITHUB_STEP_SUMMARY=str(summary))
    done = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    history = subprocess.run([str(workdir / ".venv" / "bin" / "provision"), "history", "list", "--json"],
                             cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=True)
    return {"summary": summary.read_text(), "history": json.loads(history.stdout),
            "merged": {p.name: json.loads(p.read_text())
                       for p in (workdir / "reports" / "merged").glob("*.json")},
            "page": workdir / "reports" / "html" / "index.html"}


def outcomes(report: dict[str, Any]) -> dict[str, str]:
    return {t["node_id"]: t["outcome"] for t in report["tests"]}


def test_example_suite_in_three_shards_merges_into_the_unsharded_run(tmp_path: Path) -> None:
    project = tmp_path / "qa_project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".provision", "*.json"))
    shutil.copy(EXAMPLE / ".test_durations", project / ".test_durations")  # pytest-split's input
    finish(start_pytest(project, "--layer", "unit", "--provision-report", str(tmp_path / "full.json")))
    full = json.loads((tmp_path / "full.json").read_text())
    shards = run_shards(project, tmp_path / "artifacts", "example-unit.json", 3, "--layer", "unit")
    assert all(s["tests"] for s in shards), "a shard ran no test: the split did not spread the suite"
    assert len({s["run"]["run_id"] for s in shards}) == 3  # each shard is its own run

    result = workflow_merge_step(tmp_path / "ci", tmp_path / "artifacts")
    merged = result["merged"]["example-unit.json"]
    assert outcomes(merged) == outcomes(full)  # every test once, with its outcome
    run = merged["run"]
    assert (run["tests"], run["passed"]) == (full["run"]["tests"], full["run"]["passed"])
    assert run["lm_calls"] == full["run"]["lm_calls"] == sum(s["run"]["lm_calls"] for s in shards)
    assert run["cost_usd"] == pytest.approx(sum(s["run"]["cost_usd"] for s in shards))
    assert run["list_cost_usd"] == pytest.approx(sum(s["run"]["list_cost_usd"] for s in shards))
    assert run["shard"].startswith("3 shards: ") and {"shard1", "shard2", "shard3"} == set(
        run["shard"].removeprefix("3 shards: ").split(", "))
    assert [r["run_id"] for r in result["history"]] == [run["run_id"]]  # the merged run only
    assert "1 run merged from 3 shard reports" in result["summary"]
    assert f"**Total: {full['run']['tests']} tests ({full['run']['passed']} passed" in result["summary"]
    assert result["page"].is_file()


# -- the run's cost limit across shards -------------------------------------------------------------

PAID_TESTS = 24
MAX_TOKENS = 8
OUTPUT_PER_MTOK = 100.0  # a made-up price, input free: a call's worst case is MAX_TOKENS output tokens

PAID_PYPROJECT = """
[tool.pytest.ini_options]
addopts = "-p no:cacheprovider"

[tool.provisioner]
layer = "unit"
lm.base_url = "{url}"
lm.max_tokens = {max_tokens}
lm.rate_limit_rpm = 600
lm.cost_limit_usd = {limit}

[tool.provisioner.lm.prices."gemini-2.5-flash-lite"]
input_per_mtok = 0.0
output_per_mtok = {price}
"""


def paid_project(root: Path, url: str, limit: float) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(PAID_PYPROJECT.format(url=url, max_tokens=MAX_TOKENS, limit=limit,
                                                               price=OUTPUT_PER_MTOK))
    body = "import pytest\n"
    for i in range(PAID_TESTS):
        body += (f"\n\n@pytest.mark.unit\ndef test_question_{i:02d}(lm):\n"
                 f"    assert lm('What is {i} + {i}?')[0]\n")
    (root / "test_paid.py").write_text(body)
    return root


@pytest.fixture
def standin_cli(tmp_path: Path) -> Iterator[str]:
    """`provision standin gemini` as a process of its own, accepting only STANDIN_KEY."""
    ready = tmp_path / "standin.port"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "provision"), "standin", "gemini",
                             "--ready-file", str(ready)], env=clean_env(GEMINI_TEST_API_KEY=STANDIN_KEY),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=die_with_parent(os.getpid()))
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"provision standin gemini exited: {proc.stderr and proc.stderr.read()}")
            return ready.is_file() and ready.read_text().strip().isdigit()

        assert poll_until(listening, 60, 0.05), "the stand-in did not start listening within 60 s"
        yield f"http://127.0.0.1:{ready.read_text().strip()}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # four pytest runs of 24 real-mode calls each, and the merge
def test_three_shards_together_stay_within_the_runs_cost_limit(tmp_path: Path, standin_cli: str) -> None:
    shards = 3
    # What the suite costs when nothing stops it (one unsharded run with a limit it cannot reach).
    calibrate = paid_project(tmp_path / "calibrate", standin_cli, limit=100.0)
    finish(start_pytest(calibrate, "--lm", "real", "--provision-report", "full.json",
                        GEMINI_TEST_API_KEY=STANDIN_KEY))
    full = json.loads((calibrate / "full.json").read_text())
    costs = [t["list_cost_usd"] for t in full["tests"]]
    assert full["run"]["lm_calls"] == PAID_TESTS and min(costs) > 0, full["run"]
    wanted = full["run"]["list_cost_usd"]
    worst = MAX_TOKENS * OUTPUT_PER_MTOK / 1e6  # the reservation of every call
    # The run's limit: room for a few calls in each shard's share, far below what the suite wants.
    limit = round(shards * (worst + 2 * max(costs)), 6)
    assert wanted > limit, f"the suite (${wanted}) must want more than the limit (${limit}) for this test"

    project = paid_project(tmp_path / "paid", standin_cli, limit=limit)
    # Each shard on two xdist workers: both processes of a shard enforce its share.
    reports = run_shards(project, tmp_path / "artifacts", "paid-unit.json", shards, "--lm", "real", "-n", "2",
                         ok=(0, 1), GEMINI_TEST_API_KEY=STANDIN_KEY)
    spent = [r["run"]["list_cost_usd"] for r in reports]
    for report, share in zip(reports, spent, strict=True):
        refused = [t for t in report["tests"] if t["outcome"] == "failed"]
        passed = [t for t in report["tests"] if t["outcome"] == "passed"]
        # Each shard was bound by its share: calls passed, then the share ran out.
        assert refused and passed, report["run"]
        assert {t["xdist_worker"] for t in report["tests"]} <= {"gw0", "gw1"}  # ran on the xdist workers
        assert report["output"].count("would pass the run's cost limit lm.cost_limit_usd") >= len(refused)
        assert f"this shard's share: the run's lm.cost_limit_usd and lm.rate_limit_rpm divided by " \
               f"lm.shards={shards}" in report["output"]
        assert share <= limit / shards + 1e-12, (share, limit / shards)
        assert report["layers"]["unit"]["cost_limit_usd"] == pytest.approx(limit / shards)
    # Given the whole limit each (no split), every shard would have run all its calls: together
    # `wanted` > limit. Split, the shards together never pass the run's limit.
    assert sum(spent) <= limit + 1e-12

    result = workflow_merge_step(tmp_path / "ci", tmp_path / "artifacts")
    merged = result["merged"]["paid-unit.json"]["run"]
    assert merged["list_cost_usd"] == pytest.approx(sum(spent)) and merged["list_cost_usd"] <= limit + 1e-12
    assert merged["cost_usd"] == pytest.approx(sum(r["run"]["cost_usd"] for r in reports))
    assert merged["cost_usd"] > 0  # billed as Gemini: the base_url stand-in is not provisioner's own
    assert set(outcomes(result["merged"]["paid-unit.json"])) == set(outcomes(full))
