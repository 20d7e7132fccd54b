"""Recipes: what a layer turns into, before anything is created."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from provisioner.bridge.protocol import CONTROL_TOKEN_ENV
from provisioner.errors import ConfigError, NoContainersError
from provisioner.layers import get_layer
from provisioner.lmconfig import API_KEY_ENV, LM_CONFIG_ENV, STANDIN_KEY, LMConfig, LMMode
from provisioner.runtime import labels as L
from provisioner.runtime.recipes import (
    CASSETTE_MOUNT,
    NETGUARD_SCRIPT,
    RELAY_SCRIPT,
    RUN_DIR_MOUNT,
    STANDIN_ALIAS,
    STANDIN_HEALTH_PROBE,
    ContainerRecipe,
    Owner,
    PlanOptions,
    RunPlan,
    RunTarget,
    guard_recipe,
    plan_run,
    prepare_shared_dir,
    replacement_recipe,
    worker_user,
)
from provisioner.settings import Settings

SECRET = "AIza-test-secret-value-123"


def _plan(
    settings: Settings,
    layer: str,
    tmp_path: Path,
    *,
    mode: LMMode | None = None,
    key: bool = False,
    instance: str | None = None,
    **options: Any,
) -> RunPlan:
    layer_obj = get_layer(settings, layer)
    lm = layer_obj.lm_config(settings.lm, mode)
    if key:
        lm = lm.model_copy(update={"api_key": SecretStr(SECRET)})
    owner = Owner(pid=4242, host="hostA", created=0)
    target = RunTarget("r1", owner, instance=instance, lm_dir=tmp_path / "lm")
    return plan_run(settings, layer_obj, lm, target, "img:1", PlanOptions(**options))


def test_every_resource_carries_the_run_labels(settings: Settings, tmp_path: Path) -> None:
    plan = _plan(settings, "integration", tmp_path, instance="sess-9")
    wanted = {
        L.MANAGED: "true",
        L.RUN: "r1",
        L.LAYER: "integration",
        L.INSTANCE: "sess-9",
        L.OWNER_HOST: "hostA",
        L.OWNER_PID: "4242",
    }
    for labels in [n.labels for n in plan.networks] + [c.labels for c in plan.containers()]:
        assert {k: labels[k] for k in wanted} == wanted
    # integration records cassette misses from Gemini (cached_inner = real) and no key is set: the
    # run's stand-in answers them, as it does for a real-mode layer.
    assert [c.labels[L.ROLE] for c in plan.containers()] == ["standin", "relay", "worker", "worker"]


def test_mock_and_cached_workers_sit_on_an_internal_network_behind_a_loopback_relay(
    settings: Settings, tmp_path: Path
) -> None:
    for mode in ("mock", "cached"):
        plan = _plan(settings, "integration", tmp_path, mode=mode)
        run_net, edge_net = plan.networks
        assert run_net.internal and not edge_net.internal and not plan.egress
        for worker in plan.workers:
            assert [a.network for a in worker.networks] == [run_net.name]  # nothing else: no way out
            assert worker.ports == ()
            assert worker.networks[0].aliases == (f"w{worker.slot}",)
        assert [a.network for a in plan.relay.networks] == [run_net.name, edge_net.name]
        kwargs = plan.relay.to_run_kwargs()
        assert kwargs["ports"] == {"9000/tcp": ("127.0.0.1", None), "9001/tcp": ("127.0.0.1", None)}
        assert plan.relay.command[-2:] == ("9000=w0:8765", "9001=w1:8765")


def test_real_mode_with_a_key_gets_egress_and_the_key_only_in_the_secret_environment(
    settings: Settings, tmp_path: Path
) -> None:
    plan = _plan(settings, "e2e", tmp_path, key=True)
    assert plan.egress and not plan.networks[0].internal and plan.standin is None
    worker = plan.workers[0]
    assert json.loads(worker.environment[LM_CONFIG_ENV])["endpoint_kind"] == "gemini"
    assert worker.secret_environment == {API_KEY_ENV: SECRET, CONTROL_TOKEN_ENV: plan.control_token}
    everything_public = json.dumps(plan.public_dict()) + json.dumps(worker.labels) + " ".join(worker.command)
    assert SECRET not in everything_public
    assert SECRET not in json.dumps(worker.environment)
    assert worker.to_run_kwargs()["environment"][API_KEY_ENV] == SECRET  # the engine does get it
    assert SECRET not in repr(worker)


@pytest.mark.parametrize("layer", ["integration", "e2e"])
def test_every_worker_gets_the_run_control_token_as_a_secret_only(
    settings: Settings, tmp_path: Path, layer: str
) -> None:
    plan = _plan(settings, layer, tmp_path)
    token = plan.control_token
    assert token and len(token) >= 40 and token != _plan(settings, layer, tmp_path).control_token
    replacement = replacement_recipe(plan.workers[0], 1)
    for worker in (*plan.workers, replacement):
        assert worker.secret_environment[CONTROL_TOKEN_ENV] == token
        assert worker.to_run_kwargs()["environment"][CONTROL_TOKEN_ENV] == token
    for recipe in (plan.relay, *([plan.standin] if plan.standin else [])):
        assert CONTROL_TOKEN_ENV not in recipe.to_run_kwargs()["environment"]
    public = json.dumps(plan.public_dict()) + repr(plan) + repr(plan.workers)
    assert token not in public and CONTROL_TOKEN_ENV in json.dumps(plan.public_dict())  # the name only
    assert _plan(settings, layer, tmp_path, control_token="given").control_token == "given"


def test_the_plan_carries_the_run_limits_for_the_shared_dir(settings: Settings, tmp_path: Path) -> None:
    plan = _plan(settings, "e2e", tmp_path)
    lm = get_layer(settings, "e2e").lm_config(settings.lm)
    assert plan.lm_run_dir == str((tmp_path / "lm").resolve())
    assert plan.run_limits == {"rate_limit_rpm": lm.rate_limit_rpm, "cost_limit_usd": lm.cost_limit_usd,
                               "rate_limit_wait_s": lm.rate_limit_wait_s}
    assert _plan(settings, "integration", tmp_path, mode="mock").run_limits is None


@pytest.mark.parametrize(("mode", "lm"), [
    ("mock", {}),
    ("cached", {"record_mode": "none"}),  # replay only
    ("cached", {"cached_inner": "mock"}),  # records from the mock
])
def test_the_api_key_never_reaches_workers_that_do_not_call_gemini(
    settings: Settings, tmp_path: Path, mode: str, lm: dict[str, str]
) -> None:
    settings = settings.model_copy(update={"lm": settings.lm.model_copy(update=lm)})
    plan = _plan(settings, "integration", tmp_path, mode=mode, key=True)
    assert not plan.egress and plan.standin is None
    for worker in plan.workers:
        assert API_KEY_ENV not in worker.to_run_kwargs()["environment"]


def test_cached_workers_recording_from_gemini_are_wired_as_real_mode_workers(
    settings: Settings, tmp_path: Path
) -> None:
    """The new user's trial: `PROVISION_LM__CACHED_INNER=real` with GEMINI_TEST_API_KEY set, and every
    worker said the key was not set. Cached workers that record misses from Gemini get what real-mode
    workers get: the key and a route out, or (no key) the run's stand-in and its dummy key."""
    keyed = _plan(settings, "integration", tmp_path, mode="cached", key=True)
    assert keyed.egress and keyed.standin is None
    for worker in keyed.workers:
        assert worker.secret_environment[API_KEY_ENV] == SECRET
    keyless = _plan(settings, "integration", tmp_path, mode="cached")
    assert not keyless.egress and keyless.standin is not None and keyless.uses_standin
    for worker in keyless.workers:
        assert worker.secret_environment[API_KEY_ENV] == STANDIN_KEY
        handed = LMConfig.model_validate_json(worker.environment[LM_CONFIG_ENV])
        assert handed.endpoint_kind == "standin" and handed.base_url == "http://gemini-standin:8080/"


def test_a_base_url_the_workers_cannot_use_is_a_config_error_naming_it(
    settings: Settings, tmp_path: Path
) -> None:
    """A stand-in the user started on 127.0.0.1 is out of the worker containers' reach; a base_url
    without a key gets no key to send."""
    url = "http://127.0.0.1:8123/"
    local = settings.model_copy(update={"lm": settings.lm.model_copy(update={"base_url": url})})
    with pytest.raises(ConfigError, match=rf"lm.base_url={url} is set but GEMINI_TEST_API_KEY is not"):
        _plan(local, "integration", tmp_path, mode="cached")
    with pytest.raises(ConfigError, match=r"loopback, which the worker containers of layer 'e2e' cannot"):
        _plan(local, "e2e", tmp_path, key=True)
    replaying = local.model_copy(update={"lm": local.lm.model_copy(update={"record_mode": "none"})})
    assert _plan(replaying, "integration", tmp_path, mode="cached").standin is None  # calls no Gemini


def test_real_mode_without_a_key_uses_the_standin_on_an_internal_network(
    settings: Settings, tmp_path: Path
) -> None:
    plan = _plan(settings, "e2e", tmp_path)
    assert plan.uses_standin and plan.standin is not None and not plan.egress
    assert plan.networks[0].internal
    assert plan.standin.networks[0].aliases == (STANDIN_ALIAS,)
    assert plan.standin.command[-7:-4] == ("provision", "standin", "gemini")  # behind the egress gate
    lm = json.loads(plan.workers[0].environment[LM_CONFIG_ENV])
    assert lm["base_url"] == f"http://{STANDIN_ALIAS}:8080/" and lm["mode"] == "real"
    assert lm["endpoint_kind"] == "standin"  # the controller says what it wired in
    assert plan.workers[0].secret_environment[API_KEY_ENV]  # a dummy the stand-in accepts
    assert [c.role for c in plan.containers()] == ["standin", "relay", "worker", "worker"]


def test_cached_workers_mount_cassettes_and_the_shared_run_dir(settings: Settings, tmp_path: Path) -> None:
    plan = _plan(settings, "integration", tmp_path)
    worker = plan.workers[0]
    mounts = {m.target: m for m in worker.mounts}
    assert set(mounts) == {CASSETTE_MOUNT, RUN_DIR_MOUNT}
    assert mounts[CASSETTE_MOUNT].source == str(Path(settings.lm.cache_dir).resolve())
    assert mounts[RUN_DIR_MOUNT].source == str((tmp_path / "lm").resolve())
    assert not mounts[CASSETTE_MOUNT].read_only
    lm = json.loads(worker.environment[LM_CONFIG_ENV])
    assert lm["cache_dir"] == CASSETTE_MOUNT and lm["run_dir"] == RUN_DIR_MOUNT and lm["run_id"] == "r1"
    # A worker's messages name the host folder as the user knows it, not the mount point.
    host = Path(settings.lm.cache_dir).resolve()
    root = settings.project_dir.resolve()
    assert lm["cache_dir_shown"] == (str(host.relative_to(root)) if host.is_relative_to(root) else str(host))
    replay_only = settings.model_copy(update={"lm": settings.lm.model_copy(update={"record_mode": "none"})})
    plan = _plan(replay_only, "integration", tmp_path)
    assert {m.target: m.read_only for m in plan.workers[0].mounts}[CASSETTE_MOUNT] is True


def test_mock_workers_mount_nothing(settings: Settings, tmp_path: Path) -> None:
    plan = _plan(settings, "integration", tmp_path, mode="mock")
    assert all(w.mounts == () for w in plan.workers)
    assert json.loads(plan.workers[0].environment[LM_CONFIG_ENV])["run_dir"] is None


def test_workers_are_unprivileged_and_limited_by_settings(settings: Settings, tmp_path: Path) -> None:
    tuned = settings.model_copy(
        update={
            "container": settings.container.model_copy(
                update={"memory": "768m", "cpus": 0.5, "pids_limit": 99}
            )
        }
    )
    worker = _plan(tuned, "integration", tmp_path, user="1000:1000").workers[0]
    kwargs = worker.to_run_kwargs()
    assert kwargs["cap_drop"] == ["ALL"]
    assert kwargs["security_opt"] == ["no-new-privileges:true"]
    assert kwargs["read_only"] is True and "/tmp" in kwargs["tmpfs"]
    assert kwargs["user"] == "1000:1000"
    assert (kwargs["mem_limit"], kwargs["nano_cpus"], kwargs["pids_limit"]) == ("768m", 500_000_000, 99)
    assert "privileged" not in kwargs
    assert not any("docker.sock" in src for src in kwargs["volumes"])


def test_worker_user_is_never_root() -> None:
    assert worker_user(0, 0) == "10001:0"
    assert worker_user(1000, 1000) == "1000:1000"


def test_layer_overrides_beat_container_settings(settings: Settings, tmp_path: Path) -> None:
    from provisioner.settings import LayerSpec

    custom = settings.model_copy(update={"layers": {"e2e": LayerSpec(memory="2g", cpus=2.0)}})
    worker = _plan(custom, "e2e", tmp_path).workers[0]
    assert (worker.memory, worker.cpus) == ("2g", 2.0)


def test_unit_layer_has_no_containers(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(NoContainersError, match="in-process"):
        _plan(settings, "unit", tmp_path)


def test_fewer_than_one_worker_is_a_configuration_error(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="layer 'e2e': workers must be at least 1, got 0"):
        _plan(settings, "e2e", tmp_path, workers=0)


def test_replacement_keeps_the_slot_alias_under_a_new_name(settings: Settings, tmp_path: Path) -> None:
    worker = _plan(settings, "integration", tmp_path).workers[1]
    again = replacement_recipe(worker, 2)
    assert again.name == "prov-r1-w1-2" and again.networks == worker.networks
    assert again.environment["PROVISION_WORKER_ID"] == "prov-r1-w1-2"
    assert replacement_recipe(again, 3).name == "prov-r1-w1-3"


def test_to_testcontainer_builds_the_worker_with_the_public_builder_api(
    settings: Settings, tmp_path: Path
) -> None:
    plan = _plan(settings, "e2e", tmp_path, key=True)
    worker = plan.workers[0]
    container = worker.to_testcontainer()
    assert container.image.endswith("img:1")
    assert container.env[API_KEY_ENV] == SECRET and container.env["PROVISION_WORKER_ID"] == worker.name
    assert container.tmpfs == worker.tmpfs and container.ports == {}
    # What the builder methods recorded (read back for the test only; the recipe sets none of it).
    assert container._name == worker.name and container._command == list(worker.command)
    assert container._network.name == plan.run_network and container._network_aliases == ["w0"]
    assert container._kwargs["cap_drop"] == ["ALL"] and container._kwargs["labels"][L.RUN] == "r1"
    assert container._kwargs["read_only"] is True and container._kwargs["user"] == worker.user


def test_a_recipe_that_publishes_ports_is_not_exported_to_testcontainers(
    settings: Settings, tmp_path: Path
) -> None:
    plan = _plan(settings, "e2e", tmp_path)
    with pytest.raises(ValueError, match=r"127\.0\.0\.1 only"):
        plan.relay.to_testcontainer()


def test_prepare_shared_dir_makes_group_writable_dirs_only_for_root(tmp_path: Path) -> None:
    target = tmp_path / "shared" / "lm"
    prepare_shared_dir(target, euid=1000)
    assert not target.stat().st_mode & stat.S_IWGRP
    (target / "ledger.json").write_text("{}")
    prepare_shared_dir(target, euid=0)
    mode = target.stat().st_mode
    assert mode & stat.S_IWGRP and mode & stat.S_ISGID and not mode & stat.S_IWOTH
    assert (target / "ledger.json").stat().st_mode & stat.S_IWGRP


def test_prepare_shared_dir_never_makes_a_read_only_cassette_dir_writable(tmp_path: Path) -> None:
    cassettes = tmp_path / "cassettes"
    (cassettes / "ab").mkdir(parents=True)
    (cassettes / "ab" / "entry.json").write_text("{}")
    for path in (cassettes / "ab" / "entry.json", cassettes / "ab", cassettes):
        path.chmod(path.stat().st_mode & ~0o222)  # frozen: chmod -R a-w
    before = {p: stat.S_IMODE(p.stat().st_mode) for p in (cassettes, *cassettes.rglob("*"))}
    try:
        prepare_shared_dir(cassettes, euid=0)
        assert {p: stat.S_IMODE(p.stat().st_mode) for p in before} == before
    finally:
        for path in before:
            path.chmod(0o755)


GATE = ("python3", "-P", NETGUARD_SCRIPT, "wait")


@pytest.mark.parametrize(
    ("layer", "mode"), [("integration", "mock"), ("integration", "cached"), ("e2e", None)]
)
def test_every_container_on_an_internal_run_network_waits_for_the_egress_guard(
    settings: Settings, tmp_path: Path, layer: str, mode: str | None
) -> None:
    plan = _plan(settings, layer, tmp_path, mode=mode)
    assert plan.networks[0].internal and not plan.egress
    on_run_network_only = [c for c in plan.containers() if len(c.networks) == 1]
    assert on_run_network_only == [*([plan.standin] if plan.standin else []), *plan.workers]
    for recipe in on_run_network_only:
        assert recipe.guarded and recipe.command[:4] == GATE, recipe.name
        rest = recipe.command[recipe.command.index("--") + 1 :]
        assert rest[:2] in (("provision", "worker"), ("provision", "standin"))  # then the command, unchanged
        if recipe.role == "worker":  # its imports overlap the guard
            assert recipe.command[4:6] == ("--preload", "provisioner.bridge.worker,dspy")
        assert recipe.public_dict()["guarded"] is True
    # The relay keeps its route out (edge network): it is what publishes the ports on 127.0.0.1.
    assert not plan.relay.guarded and plan.relay.command[:3] == ("python3", "-I", RELAY_SCRIPT)
    assert all(replacement_recipe(w, 3).guarded for w in plan.workers)


def test_real_mode_workers_with_egress_are_not_guarded(settings: Settings, tmp_path: Path) -> None:
    plan = _plan(settings, "e2e", tmp_path, key=True)
    assert plan.egress and not any(c.guarded for c in plan.containers())
    assert plan.workers[0].command[:2] == ("provision", "worker")
    with pytest.raises(ValueError, match="not guarded"):
        guard_recipe(plan.workers[0], "container:abc")


def test_the_guard_is_root_with_net_admin_only_in_its_targets_namespace(
    settings: Settings, tmp_path: Path
) -> None:
    plan = _plan(settings, "integration", tmp_path, mode="mock", key=True)
    target = plan.workers[1]
    guard = guard_recipe(target, "container:0123abcd", gateways=("172.30.0.1",))
    assert guard.name == f"{target.name}-guard" and guard.role == "guard" and guard.image == target.image
    assert guard.command == ("python3", "-I", NETGUARD_SCRIPT, "block", "--gateway", "172.30.0.1")
    assert guard.user == "0:0" and guard.cap_drop == ("ALL",) and guard.cap_add == ("NET_ADMIN",)
    assert guard.security_opt == ("no-new-privileges:true",) and guard.read_only
    assert guard.labels[L.ROLE] == L.ROLE_GUARD and guard.labels[L.RUN] == "r1" and L.SLOT not in guard.labels
    assert guard.secret_environment == {} and guard.mounts == () and guard.ports == ()
    kwargs = guard.to_run_kwargs()
    assert kwargs["network_mode"] == "container:0123abcd" and "network" not in kwargs
    assert kwargs["cap_add"] == ["NET_ADMIN"] and kwargs["healthcheck"] == {"test": ["NONE"]}
    assert API_KEY_ENV not in kwargs["environment"]


def test_relay_and_standin_have_health_checks_of_what_they_serve(settings: Settings, tmp_path: Path) -> None:
    plan = _plan(settings, "e2e", tmp_path, workers=2)
    assert plan.relay.healthcheck is not None and plan.standin is not None and plan.standin.healthcheck
    assert plan.relay.healthcheck.test == ("python3", "-I", RELAY_SCRIPT, "--check", "9000", "9001")
    relay_hc = plan.relay.to_run_kwargs()["healthcheck"]
    assert relay_hc["test"][0] == "CMD" and relay_hc["interval"] == 5 * 10**9 and relay_hc["retries"] == 3
    assert plan.standin.healthcheck.test == ("python3", "-I", "-c", STANDIN_HEALTH_PROBE, "8080")
    assert plan.relay.healthcheck.compose_dict()["interval"] == "5s"
    # Workers keep the image's HEALTHCHECK (a bridge ping on 8765).
    assert plan.workers[0].healthcheck is None and "healthcheck" not in plan.workers[0].to_run_kwargs()


def _run_standin_probe(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-c", STANDIN_HEALTH_PROBE, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_standin_health_probe_passes_only_for_a_listening_standin() -> None:
    import http.server
    import socket
    import threading

    from provisioner.lm.standin import GeminiStandin

    with GeminiStandin() as standin:
        done = _run_standin_probe(standin.port)
        assert done.returncode == 0, done.stderr
    # Another HTTP server on the port is not the stand-in; nothing listening is unhealthy too.
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        done = _run_standin_probe(other.server_address[1])
        assert done.returncode == 1 and "not the stand-in" in done.stderr
    finally:
        other.shutdown()
        other.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    done = _run_standin_probe(free)
    assert done.returncode == 1 and "unhealthy" in done.stderr


def test_a_recipe_without_a_healthcheck_keeps_the_images(settings: Settings, tmp_path: Path) -> None:
    recipe = ContainerRecipe("n", "worker", "img", ("x",), {}, {}, ())
    assert recipe.healthcheck is None and "healthcheck" not in recipe.to_run_kwargs()


def test_the_per_session_share_reaches_the_workers_only_when_set(settings: Settings, tmp_path: Path) -> None:
    key = "PROVISION_WORKER__MAX_INFLIGHT_PER_SESSION"
    assert key not in _plan(settings, "e2e", tmp_path).workers[0].environment  # the worker's default
    settings.worker.max_inflight_per_session = 3
    assert _plan(settings, "e2e", tmp_path).workers[0].environment[key] == "3"


def test_a_process_isolation_layer_runs_fork_mode_workers(settings: Settings, tmp_path: Path) -> None:
    from provisioner.layers import Layer

    plan = _plan(settings, "integration", tmp_path)
    assert all("--fork" not in w.command for w in plan.workers)
    layer = get_layer(settings, "e2e").model_copy(update={"isolation": "process"})
    assert isinstance(layer, Layer)
    target = RunTarget("r1", Owner.this_process(), lm_dir=tmp_path / "lm")
    forked = plan_run(settings, layer, layer.lm_config(settings.lm, "mock"), target, "img:1")
    for worker in forked.workers:
        command = list(worker.command)
        assert command[command.index("worker"):][-1] == "--fork", command
