"""``provision doctor``: every check of an installation, each isolated, as a list of :class:`Check`."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import (
    DockerUnavailableError,
    ImageError,
    ProvisionerError,
)
from provisioner.layers import resolve_layers
from provisioner.runtime.engine import ContainerRuntime, EngineInfo
from provisioner.runtime.runs import list_runs, project_of, runtime_or_docker, settings_or_load
from provisioner.settings import Settings


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _isolated(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """Run one check; an unexpected error becomes a failed check naming it (doctor never crashes)."""
    try:
        return check()
    except Exception as exc:
        return [Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}")]


def doctor(settings: Settings | None = None, *, runtime: ContainerRuntime | None = None) -> list[Check]:
    """Every check, each isolated: installation, engine, worker image, base image, API key, disk
    space, stale runs. Returns one or more :class:`Check` per area (status ``ok``/``warn``/``fail``);
    a problem — including an unexpected error inside a check — is a failed check with advice, never
    an exception. Without a reachable engine the engine-bound checks are skipped as failed.
    """
    try:
        settings = settings_or_load(settings)
    except ProvisionerError as exc:
        return [Check("settings", "fail", str(exc))]
    checks: list[Check] = []
    checks += _isolated("provisioner installation", _check_installation)
    rt: ContainerRuntime | None = None
    try:
        rt = runtime_or_docker(runtime, settings)
        rt.ping()
    except Exception as exc:
        if rt is not None and runtime is None:  # opened here but does not answer: closed here
            rt.close()
        rt = None
        problem = str(exc) if isinstance(exc, DockerUnavailableError) else f"{type(exc).__name__}: {exc}"
        checks.append(Check("docker engine", "fail", problem))
    try:
        return _checks(settings, rt, checks)
    finally:
        if rt is not None and runtime is None:  # opened here: closed here, also on an error
            rt.close()


def _checks(settings: Settings, rt: ContainerRuntime | None, checks: list[Check]) -> list[Check]:
    infos: list[EngineInfo] = []
    if rt is not None:
        engine = rt
        checks += _isolated("docker engine", lambda: _check_engine(engine, infos))
        checks += _isolated("worker image", lambda: _check_worker_image(settings, engine))
        checks += _isolated("base image", lambda: _check_base_image(settings, engine))
    # Where the engine keeps images and containers; unknown without an engine: the host's root.
    docker_root = infos[0].root_dir if infos else "/"
    checks += _isolated("Gemini API key", lambda: _check_api_key(settings))
    checks += _isolated("disk", lambda: _check_disk(settings, docker_root))
    if rt is not None:
        engine_ = rt
        checks += _isolated("stale runs", lambda: _check_stale(settings, engine_))
    return checks


def _check_installation() -> list[Check]:
    from provisioner.runtime import images

    package = images.installed_package()
    images.recipe_dir()
    return [
        Check(
            "provisioner installation",
            "ok",
            f"{package.name} {package.version} at {package.root} (package hash {package.hash()[:16]})",
        )
    ]


def _check_engine(rt: ContainerRuntime, found: list[EngineInfo]) -> list[Check]:
    info = rt.engine_info()
    found.append(info)
    return [
        Check("docker engine", "ok", f"{info.name} {info.version} (API {info.api_version}) at {rt.engine}"),
        Check("publish address", "ok", f"workers are published on {rt.publish_host}"),
    ]


def _check_worker_image(settings: Settings, rt: ContainerRuntime) -> list[Check]:
    """The worker image on the engine; for a remote engine with an image source (the local engine),
    whether the first ``up`` will send it or build it there first (docs/containers.md)."""
    from provisioner.runtime import images

    source = rt.image_source()
    custom = settings.container.image
    if custom:
        if not rt.image_exists(custom) and source is not None and source.image_exists(custom):
            return [Check("worker image", "warn",
                          f"{custom} (settings container.image) is on the local engine, not on {rt.engine}: "
                          "the first `provision up` / container test sends it (docker save | load)")]
        if not rt.image_exists(custom):
            return [
                Check(
                    "worker image",
                    "fail",
                    f"{custom} (settings container.image) is not present; provisioner does not build "
                    f"custom images: build or pull it yourself (`docker build -t {custom} …` or "
                    f"`docker pull {custom}`), or unset container.image to use provisioner's own image",
                )
            ]
        try:
            images.check_image_provisioner(rt, custom)
        except ImageError as exc:
            return [Check("worker image", "fail", str(exc))]
        return [Check("worker image", "ok", f"{custom} (settings container.image) is present")]
    tag = images.worker_tag(source or rt, settings.container.base)
    if tag and rt.image_exists(tag):
        return [Check("worker image", "ok", f"{tag} is present (this installation's provisioner)")]
    if source is not None:
        if tag and source.image_exists(tag):
            where = f"is on the local engine, not on {rt.engine}: the first `provision up` / container test"
            return [Check("worker image", "warn", f"{tag} {where} sends it (docker save | load)")]
        first = "`provision images build` (or the first `provision up` / container test)"
        return [Check("worker image", "warn", f"{tag or 'the worker image'} is not built yet: {first} "
                      f"builds it on the local engine and sends it to {rt.engine}")]
    return [
        Check(
            "worker image",
            "warn",
            f"{tag or 'the worker image'} is not built yet; `provision images build` "
            "(or the first `provision up` / container test) builds it",
        )
    ]


def _check_base_image(settings: Settings, rt: ContainerRuntime) -> list[Check]:
    """The base image where the worker image is built: the engine, or its image source."""
    from provisioner.runtime import images

    if settings.container.image:
        return [Check("base image", "ok", "not needed: container.image is a custom image")]
    source = rt.image_source()
    builder = source or rt
    on = " (on the local engine, where the worker image is built)" if source is not None else ""
    try:
        base_ref, _ = images.resolve_base(builder, settings.container.base, allow_build=False)
        return [Check("base image", "ok", f"{base_ref} is present{on}")]
    except ImageError:
        problem = images.debootstrap_problem()
        if problem and settings.container.base == "debootstrap":
            return [Check("base image", "fail", problem)]
        if problem:
            return [
                Check(
                    "base image",
                    "warn",
                    f"{images.PYTHON_BASE} is not present{on} (a pull needs a registry) and the offline "
                    f"base cannot be built: {problem}",
                )
            ]
        buildable = "buildable offline with debootstrap (root, debootstrap found)"
        return [Check("base image", "ok", buildable + on)]


def _check_api_key(settings: Settings) -> list[Check]:
    # The modes layers run with (an lm_modes entry the user did not set does not beat a layer's own).
    real_layers = [n for n, layer in resolve_layers(settings).items() if layer.lm_mode == "real"]
    if settings.lm.api_key is not None:
        return [Check("Gemini API key", "ok", "GEMINI_TEST_API_KEY is set (real mode uses the real API)")]
    if not real_layers:
        return [Check("Gemini API key", "ok", "GEMINI_TEST_API_KEY is not set; no layer runs in real mode "
                      "(`pytest --lm real` would use the local Gemini stand-in)")]
    return [
        Check(
            "Gemini API key",
            "warn",
            f"GEMINI_TEST_API_KEY is not set: real-mode layers ({', '.join(real_layers) or '-'}) "
            "use the local Gemini stand-in",
        )
    ]


def _check_disk(settings: Settings, docker_root: str | None) -> list[Check]:
    """Free space where the engine keeps its data (``docker_root``; None: the engine has no disk,
    as the fake's) and at the state dir."""
    checks = []
    places = [("disk (docker)", docker_root)] if docker_root is not None else []
    for label, path in (*places, ("disk (state dir)", str(Path(settings.state_dir).resolve()))):
        probe_path = Path(path)
        while not probe_path.exists() and probe_path != probe_path.parent:
            probe_path = probe_path.parent
        try:
            free = shutil.disk_usage(probe_path).free / 1e9
        except OSError as exc:
            checks.append(Check(label, "warn", f"cannot read free space of {path}: {exc}"))
            continue
        checks.append(Check(label, "ok" if free >= 2 else "fail", f"{free:.1f} GB free at {path}"))
    return checks


def _check_stale(settings: Settings, rt: ContainerRuntime) -> list[Check]:
    stale = [r.run_id for r in list_runs(rt, project_of(settings), settings.state_dir) if r.stale]
    if stale:
        return [Check("stale runs", "warn", f"{', '.join(stale)}: `provision reap` removes them")]
    return []
