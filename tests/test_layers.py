from __future__ import annotations

from pathlib import Path

import pytest

from provisioner import ConfigError, UnknownLayerError, get_layer, load_settings, resolve_layers

from ._helpers import clear_settings

pytest_plugins = ["pytester"]


@pytest.fixture
def settings_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    clear_settings(monkeypatch)

    def make(toml: str = ""):  # type: ignore[no-untyped-def]
        (tmp_path / "pyproject.toml").write_text("[tool.provisioner]\n" + toml)
        return load_settings(project_dir=tmp_path)

    return make


def test_builtin_layers_are_the_plans(settings_in) -> None:  # type: ignore[no-untyped-def]
    layers = resolve_layers(settings_in())
    unit, integ, e2e = layers["unit"], layers["integration"], layers["e2e"]
    assert (unit.adapter, unit.python, unit.pooling_enabled, unit.lm_mode, unit.isolation) == (
        "mock", False, False, "mock", "full")
    assert (integ.adapter, integ.python, integ.pooling_enabled, integ.lm_mode, integ.isolation) == (
        "bridge", True, False, "cached", "namespace")
    assert (e2e.adapter, e2e.python, e2e.pooling_enabled, e2e.lm_mode, e2e.isolation) == (
        "bridge", True, True, "real", "session")
    assert not unit.needs_docker and e2e.needs_docker
    assert e2e.egress_allowed and not integ.egress_allowed


def test_user_overrides_and_custom_layers(settings_in) -> None:  # type: ignore[no-untyped-def]
    s = settings_in(
        "[tool.provisioner.lm_modes]\ne2e = 'cached'\n"
        "[tool.provisioner.layers.e2e]\nworkers = 4\n"
        "[tool.provisioner.layers.smoke]\nadapter = 'bridge'\npython = true\nlm_mode = 'mock'\n"
    )
    assert get_layer(s, "e2e").workers == 4
    assert get_layer(s, "e2e").lm_mode == "cached"
    smoke = get_layer(s, "smoke")
    assert smoke.lm_mode == "mock" and not smoke.builtin and smoke.needs_docker
    assert list(resolve_layers(s)) == ["unit", "integration", "e2e", "smoke"]


def test_a_built_in_layer_s_lm_mode_set_in_its_layer_table_is_used(  # type: ignore[no-untyped-def]
    settings_in, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new user's ``[tool.provisioner.layers.e2e] lm_mode = "mock"`` was silently ignored: the
    default ``lm_modes`` (which name every built-in layer) won. The user's layer table now beats the
    defaults; an ``lm_modes`` entry the user set (file or environment) still beats the layer."""
    toml = ("[tool.provisioner.layers.e2e]\nlm_mode = 'mock'\n"
            "[tool.provisioner.layers.integration]\nworkers = 3\n")
    s = settings_in(toml)
    assert get_layer(s, "e2e").lm_mode == "mock"
    assert get_layer(s, "integration").lm_mode == "cached"  # a table without lm_mode keeps the default
    assert get_layer(s, "unit").lm_mode == "mock"
    monkeypatch.setenv("PROVISION_LM_MODES__E2E", "cached")
    assert get_layer(settings_in(toml), "e2e").lm_mode == "cached"


def test_layer_lm_config_applies_its_mode_unless_lm_overrides(settings_in) -> None:  # type: ignore[no-untyped-def]
    s = settings_in(
        "[tool.provisioner.lm]\nrate_limit_rpm = 7\n[tool.provisioner.lm_modes]\nintegration = 'real'\n"
    )
    layer = get_layer(s, "integration")
    lm = layer.lm_config(s.lm)
    assert (lm.mode, lm.layer, lm.rate_limit_rpm) == ("real", "integration", 7)  # lm_modes beats the layer
    assert layer.lm_config(s.lm, "mock").mode == "mock"  # --lm beats the layer
    assert s.lm.layer is None  # the base is not changed


def test_unknown_layer_lists_known(settings_in) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownLayerError) as info:
        get_layer(settings_in(), "nightly")
    assert "nightly" in str(info.value) and "integration" in str(info.value)


def test_inconsistent_custom_layer_is_an_error(settings_in) -> None:  # type: ignore[no-untyped-def]
    s = settings_in("[tool.provisioner.layers.odd]\nadapter = 'bridge'\npython = false\n")
    with pytest.raises(ConfigError, match="odd"):
        get_layer(s, "odd")


def test_isolation_process_needs_bridge_workers(settings_in) -> None:  # type: ignore[no-untyped-def]
    s = settings_in(
        "[tool.provisioner.layers.proc]\nadapter = 'bridge'\npython = true\nisolation = 'process'\n"
        "[tool.provisioner.layers.inproc]\nadapter = 'mock'\npython = false\nisolation = 'process'\n"
    )
    assert get_layer(s, "proc").isolation == "process"
    with pytest.raises(ConfigError, match=r"inproc.*isolation 'process'.*adapter = 'bridge'"):
        get_layer(s, "inproc")


def test_messages_and_the_readme_name_where_a_layer_runs_the_same_way(  # type: ignore[no-untyped-def]
    settings_in, tmp_path: Path
) -> None:
    """A user's trial: `provision run --layer unit -- false` said "runs in-process (adapter 'mock')"
    while the README's layer table says "in-process (`LocalBridge`)"."""
    from click.testing import CliRunner

    from provisioner.cli import main

    settings = settings_in()
    unit, e2e = get_layer(settings, "unit"), get_layer(settings, "e2e")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for layer in (unit, e2e):  # the README's Markdown: names in backticks
        cell = layer.runs_in_words.replace("'", "`").replace("LocalBridge", "`LocalBridge`")
        assert f"| {layer.name} | {cell} |" in readme, cell
    result = CliRunner().invoke(main, ["run", "--layer", "unit", "--", "false"],
                                env={"PROVISION_STATE_DIR": str(tmp_path / ".provision")})
    assert f"layer 'unit' runs {unit.runs_in_words}" in result.output, result.output


# --- a layer's description follows its effective fields (a new user's trial: e2e overridden to the
# mock LM still said "real Gemini LM with rate and cost limits" in `provision layers` and the markers)


def test_the_builtin_descriptions_are_made_from_their_fields(settings_in) -> None:  # type: ignore[no-untyped-def]
    layers = resolve_layers(settings_in())
    assert layers["unit"].description == "in-process, mock LM, no containers"
    assert layers["integration"].description == (
        "one bridge worker container shared by the tests, a namespace each (`provision up`: 2),"
        " cached (record/replay) LM")
    assert layers["e2e"].description == ("a warm pool of bridge worker containers, "
                                         "real Gemini LM with rate and cost limits")


@pytest.mark.parametrize("toml, env, words", [
    ("[tool.provisioner.layers.e2e]\nlm_mode = 'mock'\n", {},
     "a warm pool of bridge worker containers, mock LM"),
    ("[tool.provisioner.lm_modes]\ne2e = 'cached'\n", {}, "cached (record/replay) LM"),
    ("", {"PROVISION_LM_MODES__E2E": "mock"}, "mock LM"),
    ("[tool.provisioner.layers.e2e]\npooling_enabled = false\n", {},
     "one bridge worker container shared by the tests, a session each (`provision up`: 2), real Gemini"),
    ("[tool.provisioner.layers.e2e]\nisolation = 'process'\n", {}, "a forked process per test"),
], ids=["layer-table", "lm_modes", "environment", "pooling", "isolation"])
def test_an_overridden_builtin_layer_says_what_it_now_is(  # type: ignore[no-untyped-def]
        settings_in, monkeypatch: pytest.MonkeyPatch, toml: str, env: dict[str, str], words: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    e2e = get_layer(settings_in(toml), "e2e")
    assert words in e2e.description
    if e2e.lm_mode != "real":
        assert "Gemini" not in e2e.description


@pytest.mark.parametrize("toml", [
    "", "max_pool_size = 1\n", "[tool.provisioner.layers.integration]\nworkers = 4\n",
    "[tool.provisioner.layers.integration]\npooling_enabled = true\nworkers = 3\n",
    "[tool.provisioner.layers.integration]\nisolation = 'session'\n",
], ids=["default", "max-pool-1", "workers-4", "pooled", "session"])
def test_a_container_layer_s_description_says_what_pytest_the_api_and_up_start(  # type: ignore[no-untyped-def]
        settings_in, toml: str) -> None:
    """A new user's trial: integration said "a bridge worker container per test session", but a
    pytest run (and an API environment: the same pool) starts one worker that every test shares,
    and `provision up` starts `workers`. The words come from the rule the runtime starts workers by
    (runtime.workers.worker_starts)."""
    from provisioner.runtime.workers import worker_starts

    layer = get_layer(settings_in(toml), "integration")
    starts = worker_starts(layer)
    assert starts is not None
    assert "per test session" not in layer.description
    if layer.pooling_enabled:
        assert layer.description.startswith("a warm pool of bridge worker containers")
        return
    assert starts.pytest_first == starts.pytest_up_to == 1
    assert layer.description.startswith("one bridge worker container shared by the tests, a ")
    up = f"(`provision up`: {starts.up})"
    assert (up in layer.description) == (starts.up != 1), layer.description


def test_a_description_the_user_wrote_is_kept(settings_in) -> None:  # type: ignore[no-untyped-def]
    s = settings_in("[tool.provisioner.layers.e2e]\nlm_mode = 'mock'\ndescription = 'ours'\n"
                    "[tool.provisioner.layers.smoke]\nadapter = 'bridge'\npython = true\nlm_mode = 'mock'\n")
    assert get_layer(s, "e2e").description == "ours"
    assert get_layer(s, "e2e").with_lm_mode("cached").description == "ours"
    assert get_layer(s, "smoke").description == (
        "one bridge worker container shared by the tests, a namespace each (`provision up`: 2), mock LM")


def test_the_lm_option_makes_the_running_layer_say_its_mode(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`--lm` (pytest, provision up/run): the resolved layer's mode and description are --lm's."""
    from provisioner.run import RunOptions, resolve_run

    clear_settings(monkeypatch)
    (tmp_path / "pyproject.toml").write_text("[tool.provisioner]\n")
    run = resolve_run(RunOptions(layer="e2e", lm_mode="mock"), tmp_path)
    assert run.layer.lm_mode == run.lm_config.mode == "mock"
    assert run.layer.description == "a warm pool of bridge worker containers, mock LM"


def test_provision_layers_and_the_markers_say_the_effective_lm(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from provisioner.cli import main
    from provisioner.testing.selection import marker_description

    clear_settings(monkeypatch)
    (tmp_path / "pyproject.toml").write_text("[tool.provisioner.layers.e2e]\nlm_mode = 'mock'\n")
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["layers"], terminal_width=200)
    assert out.exit_code == 0, out.output
    e2e_line = next(line for line in out.output.splitlines() if line.startswith("e2e"))
    assert "mock LM" in e2e_line and "Gemini" not in e2e_line, e2e_line
    as_json = CliRunner().invoke(main, ["layers", "--json"])
    assert '"description": "a warm pool of bridge worker containers, mock LM"' in as_json.output
    marker = marker_description(get_layer(load_settings(project_dir=tmp_path), "e2e"))
    assert marker == "e2e: run only in the 'e2e' layer (a warm pool of bridge worker containers, mock LM)"


def test_pytest_markers_describe_the_active_layer_with_its_lm_option(pytester: pytest.Pytester,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings(monkeypatch)
    pytester.makefile(".toml", pyproject="[project]\nname = 'markers'\n")
    result = pytester.runpytest_subprocess("--layer", "e2e", "--lm", "mock", "--markers")
    result.stdout.fnmatch_lines(["*e2e: run only in the 'e2e' layer (a warm pool of bridge worker containers,"
                                 " mock LM)*"])
