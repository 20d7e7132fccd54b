"""Image inputs: the recipe as package data, the package hash, provisioner's own wheel, the pinned
requirements, the debootstrap call, per-project tags and the provisioner-mismatch check."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import ImageError
from provisioner.runtime import images
from provisioner.runtime import labels as L

from .._helpers import dockerfile_context

REPO = Path(__file__).resolve().parents[2]


def _package(tmp_path: Path) -> images.PackageSource:
    """A small stand-in package (its own folder, metadata and entry points)."""
    root = tmp_path / "site" / "provisioner"
    (root / "sub").mkdir(parents=True)
    (root / "assets" / "worker").mkdir(parents=True)
    (root / "__init__.py").write_text("X = 1\n")
    (root / "sub" / "mod.py").write_text("Y = 2\n")
    (root / "py.typed").write_text("")
    for name in images.RECIPE_FILES:
        (root / "assets" / "worker" / name).write_text(f"{name}\n")
    metadata = "Metadata-Version: 2.4\nName: dspy-provisioner\nVersion: 9.9\nRequires-Dist: click>=8\n"
    entry_points = (
        "[console_scripts]\nprovision = provisioner.cli:main\n\n"
        "[pytest11]\nprovisioner = provisioner.pytest_plugin\n"
    )
    return images.PackageSource(root, "dspy-provisioner", "9.9", metadata, entry_points)


def test_the_recipe_is_package_data_of_the_installed_package() -> None:
    recipe = images.recipe_dir()
    assert recipe == images.package_dir() / "assets" / "worker"
    assert all((recipe / name).is_file() for name in images.RECIPE_FILES)
    package = images.installed_package()
    assert package.name == "dspy-provisioner" and package.root == images.package_dir()
    assert "[pytest11]" in package.entry_points and "provision = provisioner.cli:main" in package.entry_points
    rel = {p.relative_to(package.root).as_posix() for p in package.files()}
    assert {"assets/worker/Dockerfile", "assets/worker/.dockerignore", "py.typed", "runtime/relay.py"} <= rel
    # The old layout (a recipe outside the package, next to a source tree) is gone.
    assert not (REPO / "images" / "worker").exists()


def test_the_package_hash_covers_every_file_the_recipe_and_the_metadata(tmp_path: Path) -> None:
    package = _package(tmp_path)
    first = images.worker_image_hash("sha256:base1", package)
    assert first == images.worker_image_hash("sha256:base1", package)  # stable
    assert first != images.worker_image_hash("sha256:base2", package)
    (package.root / "sub" / "mod.py").write_text("Y = 3\n")
    second = images.worker_image_hash("sha256:base1", package)
    assert second != first  # a source change changes the tag
    (package.root / "assets" / "worker" / "Dockerfile").write_text("changed\n")
    third = images.worker_image_hash("sha256:base1", package)
    assert third != second  # so does a recipe change
    other_version = images.PackageSource(
        package.root, package.name, "9.10", package.metadata.replace("9.9", "9.10"), package.entry_points
    )
    assert images.worker_image_hash("sha256:base1", other_version) != third
    # Byte-code caches are not inputs.
    (package.root / "__pycache__").mkdir()
    (package.root / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert images.worker_image_hash("sha256:base1", package) == third


def test_the_wheel_is_made_from_the_installed_files_and_metadata(tmp_path: Path) -> None:
    package = _package(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    wheel = images.write_project_wheel(package, out)
    assert wheel.name == "dspy_provisioner-9.9-py3-none-any.whl"
    info = "dspy_provisioner-9.9.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {
            "provisioner/__init__.py",
            "provisioner/sub/mod.py",
            "provisioner/py.typed",
            "provisioner/assets/worker/Dockerfile",
            "provisioner/assets/worker/.dockerignore",
        } <= names
        assert zf.read(f"{info}/entry_points.txt").decode() == package.entry_points
        assert zf.read(f"{info}/METADATA").decode() == package.metadata
        for line in zf.read(f"{info}/RECORD").decode().splitlines():
            name, digest, _size = line.split(",")
            if digest:
                data = zf.read(name)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert digest == f"sha256={expected}", name
    again = tmp_path / "again"
    again.mkdir()
    assert images.write_project_wheel(package, again).read_bytes() == wheel.read_bytes()  # reproducible


def test_a_package_without_a_source_tree_still_has_its_metadata(tmp_path: Path) -> None:
    """What used to fail from an installed wheel: no pyproject.toml beside the package is needed."""
    copy = tmp_path / "site-packages" / "provisioner"
    shutil.copytree(images.package_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert not (copy.parent / "pyproject.toml").exists()
    package = images.installed_package(copy)
    assert package.root == copy and package.name == "dspy-provisioner"
    assert package.hash() == images.installed_package().hash()  # same files, same metadata


def test_pinned_requirements_match_this_environment_and_hold_no_host_tools() -> None:
    pinned = images.lock_requirements()
    names = {line.split("==")[0] for line in pinned}
    assert {"dspy", "google-genai", "pydantic", "pydantic-settings", "psutil", "click"} <= names
    # Packages provisioner imports itself are roots, pinned even if nothing else pulled them in.
    assert "regex" in images.WORKER_ROOTS and set(images.WORKER_ROOTS) <= names
    assert "h2" in names  # pulled in through an extra (httpx[http2]): extras are followed
    assert not names & {"docker", "testcontainers", "pytest", "rich"}
    checked_in = images.recipe_dir() / "requirements.txt"
    lines = [ln for ln in checked_in.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == pinned, f"{checked_in} is stale: run `provision images lock`"


def test_wheelhouse_is_cached_by_the_requirements_hash(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PROVISION_CACHE_DIR", str(tmp_path / "cache"))
    req = tmp_path / "requirements.txt"
    req.write_text("click==8.0.0\n")
    folder = images.cache_dir() / "wheelhouse" / images.requirements_hash(req)[:16]
    folder.mkdir(parents=True)
    (folder / ".complete").write_text("{}")
    calls: list[object] = []
    monkeypatch.setattr(images.subprocess, "run", lambda *a, **k: calls.append(a))
    assert images.ensure_wheelhouse(req, progress=lambda _m: None) == folder
    assert calls == []  # a complete wheelhouse is reused without running pip
    req.write_text("click==8.1.0\n")
    assert images.requirements_hash(req)[:16] != folder.name


def test_debootstrap_problem_is_explained(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    assert "not installed" in (images.debootstrap_problem() or "")


def test_debootstrap_uses_its_own_default_mirror_unless_one_is_given(tmp_path: Path) -> None:
    cmd = images.debootstrap_command(tmp_path / "rootfs", None)
    assert cmd[-2:] == [images.DEBIAN_SUITE, str(tmp_path / "rootfs")]  # no MIRROR argument
    assert images.debootstrap_command(tmp_path / "r", "file:///srv/mirror")[-1] == "file:///srv/mirror"


# Where packages and images are fetched from (mirrors, package indexes, registries): the tools' own
# defaults are used and none is written out. (A link to a project's page, e.g. pypi.org/project/x,
# is documentation, not a source.)
MIRROR_HOSTS = re.compile(
    r"deb\.debian\.org|ftp\.\w+\.debian\.org|security\.debian\.org|archive\.ubuntu\.com|"
    r"pypi\.org/simple|pypi\.python\.org|pythonhosted\.org|registry-1\.docker\.io|index\.docker\.io|"
    r"--index-url|--extra-index-url"
)


def test_no_mirror_or_registry_host_is_named_in_the_code_or_the_docs() -> None:
    files = [
        *(REPO / "provisioner").rglob("*.py"),
        *(REPO / "provisioner" / "assets").rglob("*"),
        *(REPO / "docs").glob("*.md"),
        REPO / "README.md",
        REPO / ".ci" / "setup",
    ]
    found = []
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts:
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if MIRROR_HOSTS.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []


def test_project_ids_are_per_folder_and_valid_docker_tags(tmp_path: Path) -> None:
    a, b = tmp_path / "one" / "My Project", tmp_path / "two" / "My Project"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    ida, idb = L.project_id(a), L.project_id(b)
    assert ida != idb and ida.startswith("my-project-") and idb.startswith("my-project-")
    assert L.project_id(a / ".." / "My Project") == ida  # resolved
    for pid in (ida, idb):
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,48}", pid)
        assert re.fullmatch(r"[\w][\w.-]{0,127}", images.project_tag(pid).split(":", 1)[1])


# --- on the engine ----------------------------------------------------------------------------------


def _label_image(docker_engine: Any, base: str, tag: str, labels: dict[str, str]) -> None:
    """A one-layer image FROM ``base`` with extra labels (what a user's custom image looks like).

    The engine is shared with other test runs (other checkouts, xdist processes of this one): each
    test tags with a name of its own, so one run's cleanup never removes a tag another run is
    using (fixed names did: the other run then failed on an image that had just gone), and the
    image carries that name as a label too, in its one build step, so two runs share no image id
    and no cached intermediate step (removing an id two runs shared failed with "unrecognized image
    ID"; a build on a cached step another run's cleanup pruned, with "failed to get digest")."""
    labels = {"test.tag": tag, **labels}
    dockerfile = f"FROM {base}\nLABEL " + " ".join(f'{k}="{v}"' for k, v in labels.items()) + "\n"
    docker_engine.images.build(fileobj=dockerfile_context(dockerfile), custom_context=True, tag=tag,
                               pull=False, rm=True)


@pytest.mark.docker
def test_the_image_records_the_hosts_provisioner_and_a_mismatch_names_both(
    docker_engine: Any, worker_image: str
) -> None:
    from provisioner.runtime.engine import DockerRuntime

    package = images.installed_package()
    labels = docker_engine.images.get(worker_image).labels
    assert labels[L.PACKAGE_HASH] == package.hash()[:16] and labels[L.VERSION] == package.version
    rt = DockerRuntime(docker_engine)
    assert images.ensure_worker_image(rt, image=worker_image) == worker_image  # the host's: accepted
    stale = f"provisioner-worker-test:stale-{secrets.token_hex(4)}"  # this run's own: see _label_image
    _label_image(docker_engine, worker_image, stale, {L.PACKAGE_HASH: "0123456789abcdef", L.VERSION: "0.0.1"})
    try:
        with pytest.raises(ImageError) as err:
            images.ensure_worker_image(rt, image=stale)
        message = str(err.value)
        assert "0.0.1" in message and "0123456789abcdef" in message  # the image's
        assert package.version in message and package.hash()[:16] in message  # the host's
        assert "provision images build" in message
    finally:
        docker_engine.images.remove(stale, force=True)


@pytest.mark.docker
def test_a_missing_custom_image_says_provisioner_does_not_build_it(docker_engine: Any) -> None:
    from provisioner.runtime.engine import DockerRuntime

    with pytest.raises(ImageError, match=r"build or pull 'team/absent-worker:1' yourself"):
        images.ensure_worker_image(DockerRuntime(docker_engine), image="team/absent-worker:1")


def _latest_id(docker_engine: Any) -> str | None:
    import docker.errors

    try:
        return str(docker_engine.images.get(f"{images.WORKER_REPO}:latest").id)
    except docker.errors.ImageNotFound:
        return None


@pytest.mark.docker
def test_each_project_moves_only_its_own_tag(docker_engine: Any, worker_image: str) -> None:
    from provisioner.runtime.engine import DockerRuntime

    rt = DockerRuntime(docker_engine)
    token = secrets.token_hex(4)  # this run's own names: see _label_image
    mine, theirs = f"test-tags-mine-{token}", f"test-tags-theirs-{token}"
    other_image = f"provisioner-worker-test:other-content-{token}"
    _label_image(docker_engine, worker_image, other_image, {"test.other": "1"})
    latest_before = _latest_id(docker_engine)
    try:
        docker_engine.images.get(other_image).tag(images.WORKER_REPO, theirs)  # another project's build
        result = images.build_worker_image(rt, project=mine, progress=lambda _m: None)
        assert result.tag == worker_image and not result.built
        assert result.project_tag == images.project_tag(mine)
        mine_id = docker_engine.images.get(images.project_tag(mine)).id
        assert mine_id == docker_engine.images.get(worker_image).id
        # The other project's tag still points at its own image, and no shared `latest` was moved.
        theirs_id = docker_engine.images.get(images.project_tag(theirs)).id
        assert theirs_id == docker_engine.images.get(other_image).id
        assert _latest_id(docker_engine) == latest_before  # no shared `latest` is moved
        assert images.project_tag(mine) not in images.prune_worker_images(rt, dry_run=True)
    finally:
        for tag in (images.project_tag(mine), images.project_tag(theirs), other_image):
            docker_engine.images.remove(tag, force=False)


def _dockerfile_healthcheck() -> dict[str, str]:
    text = (REPO / "provisioner" / "assets" / "worker" / "Dockerfile").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK ")]
    return dict(re.findall(r"--([a-z-]+)=(\S+)", line))


def test_the_worker_image_s_healthcheck_timeout_is_the_host_s_probe_timeout() -> None:
    """The image's HEALTHCHECK allowed 3 s, the relay's and stand-in's probes (set by the host) 10 s:
    under load the engine marked serving workers unhealthy. One value (recipes.HEALTHCHECK_TIMEOUT_S);
    the probe script's own socket timeout stays below it, so it says why before the engine kills it."""
    from provisioner.runtime.recipes import HEALTHCHECK_TIMEOUT_S, HealthCheck

    assert _dockerfile_healthcheck()["timeout"] == f"{HEALTHCHECK_TIMEOUT_S:g}s"
    assert HealthCheck(("true",)).timeout_s == HEALTHCHECK_TIMEOUT_S
    script = (REPO / "provisioner" / "assets" / "worker" / "healthcheck.py").read_text()
    (own,) = re.findall(r"^TIMEOUT_S = ([0-9.]+)$", script, flags=re.M)
    assert 0 < float(own) < HEALTHCHECK_TIMEOUT_S


@pytest.mark.docker
def test_the_built_worker_image_carries_that_healthcheck_timeout(docker_engine: Any,
                                                                 worker_image: str) -> None:
    from provisioner.runtime.recipes import HEALTHCHECK_TIMEOUT_S

    check = docker_engine.api.inspect_image(worker_image)["Config"]["Healthcheck"]
    assert check["Timeout"] == int(HEALTHCHECK_TIMEOUT_S * 1e9), check


# --- the image flow on the fake runtime (no engine; the docker tests above prove the adapter) -----


@pytest.fixture
def offline_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds without the network: an empty wheelhouse (its download is tested on its own above)."""
    monkeypatch.setenv("PROVISION_CACHE_DIR", str(tmp_path / "cache"))
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    monkeypatch.setattr(images, "ensure_wheelhouse", lambda *_a, **_k: wheelhouse)


def test_the_worker_image_is_built_once_per_content_and_records_the_hosts_provisioner(
    offline_build: None,
) -> None:
    from provisioner.runtime.engine import FakeRuntime

    rt = FakeRuntime(images=(images.PYTHON_BASE,))
    assert images.worker_tag(rt) is not None and not rt.image_exists(images.worker_tag(rt) or "")
    first = images.build_worker_image(rt, project="proj-a", progress=lambda _m: None)
    assert first.built and first.base == images.PYTHON_BASE and rt.builds == [first.tag]
    assert first.tag == images.worker_tag(rt) and first.project_tag == images.project_tag("proj-a")
    made = rt.image(first.tag)
    assert made is not None and images.project_tag("proj-a") in made.tags
    package = images.installed_package()
    assert made.labels[L.PACKAGE_HASH] == package.hash()[:16] and made.labels[L.VERSION] == package.version
    again = images.build_worker_image(rt, project="proj-b", progress=lambda _m: None)
    assert (again.tag, again.built, rt.builds) == (first.tag, False, [first.tag])  # one hash, no build
    assert images.ensure_worker_image(rt) == first.tag


def test_without_a_base_or_a_registry_the_fallback_is_debootstrap(
    offline_build: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provisioner.runtime.engine import FakeRuntime

    monkeypatch.setattr(images, "debootstrap_problem", lambda: "debootstrap is not installed (test)")
    said: list[str] = []
    with pytest.raises(ImageError, match="debootstrap is not installed"):
        images.build_worker_image(FakeRuntime(), progress=said.append)
    assert any("could not pull python:3.11-slim" in m and "falling back" in m for m in said)
    # With a registry that has the base, the pull is the way.
    rt = FakeRuntime(registry={images.PYTHON_BASE: {}})
    assert images.build_worker_image(rt, progress=said.append).base == images.PYTHON_BASE


def test_a_custom_image_is_checked_never_built() -> None:
    from provisioner.runtime.engine import FakeRuntime

    rt = FakeRuntime()
    with pytest.raises(ImageError, match=r"build or pull 'team/worker:1' yourself"):
        images.ensure_worker_image(rt, image="team/worker:1")
    rt.add_image("team/worker:1", {L.PACKAGE_HASH: "0123456789abcdef", L.VERSION: "0.0.1"})
    with pytest.raises(ImageError, match="0123456789abcdef"):
        images.ensure_worker_image(rt, image="team/worker:1")
    rt.add_image("team/plain:1")  # not made from provisioner's image: not checked
    assert images.ensure_worker_image(rt, image="team/plain:1") == "team/plain:1"
    assert rt.builds == []


def test_prune_keeps_the_current_build_project_tags_and_images_in_use(offline_build: None) -> None:
    from provisioner.runtime.engine import FakeRuntime
    from provisioner.runtime.recipes import ContainerRecipe

    rt = FakeRuntime(images=(images.PYTHON_BASE,))
    current = images.build_worker_image(rt, progress=lambda _m: None).tag
    stale, tagged, used = (f"{images.WORKER_REPO}:{n * 12}" for n in "abc")
    for ref in (stale, tagged, used):
        rt.add_image(ref, {"content": ref})
    rt.tag(tagged, images.project_tag("someones-project"))
    rt.create_container(ContainerRecipe("uses-it", "worker", used, (), {}, {}, ()))
    assert images.prune_worker_images(rt, dry_run=True) == [stale]
    assert rt.image_exists(stale)
    assert images.prune_worker_images(rt) == [stale]
    assert not rt.image_exists(stale)
    assert all(rt.image_exists(ref) for ref in (current, tagged, used))


def test_a_remote_engine_gets_the_image_its_source_builds_sent_once(offline_build: None) -> None:
    """An engine with an image source (a remote engine's local one) gets the worker image by save |
    load: built (or found) on the source, sent once, the project's tag set on the remote, progress
    told; a custom image the remote lacks is sent too."""
    from provisioner.runtime.engine import FakeRuntime

    local = FakeRuntime(images=(images.PYTHON_BASE,))
    remote = FakeRuntime(image_source=local)  # no base image at all: it could not build
    said: list[str] = []
    first = images.build_worker_image(remote, project="proj-a", progress=said.append)
    assert first.built and first.sent and local.builds == [first.tag] and remote.builds == []
    assert local.saves == [first.tag]
    made, sent = local.image(first.tag), remote.image(first.tag)
    assert made is not None and sent is not None and sent.id == made.id and sent.labels == made.labels
    assert images.project_tag("proj-a") in sent.tags and images.project_tag("proj-a") not in made.tags
    assert any(m.startswith(f"sending {first.tag}") and "to fake" in m for m in said)
    assert any(m.startswith(f"sent {first.tag}") for m in said)
    again = images.build_worker_image(remote, project="proj-a", progress=said.append)
    assert (again.tag, again.built, again.sent, local.saves) == (first.tag, False, False, [first.tag])
    assert images.ensure_worker_image(remote) == first.tag
    local.add_image("team/worker:1")
    assert images.ensure_worker_image(remote, image="team/worker:1") == "team/worker:1"
    assert local.saves == [first.tag, "team/worker:1"] and remote.image_exists("team/worker:1")


def test_a_send_that_leaves_another_image_is_an_error(offline_build: None) -> None:
    from provisioner.runtime.engine import FakeRuntime

    local = FakeRuntime()
    local.add_image("team/worker:1", {"v": "1"})
    remote = FakeRuntime(image_source=local)
    remote.load = lambda archive: [remote.add_image("team/worker:1", {"v": "other"})]  # type: ignore[method-assign]
    with pytest.raises(ImageError, match="did not leave the same image there"):
        images.transfer_image(local, remote, "team/worker:1")


def test_the_worker_tag_does_not_depend_on_the_readme_pip_copied_at_install_time(tmp_path: Path) -> None:
    """/work/main (editable install made hours before) and a fresh clone of the same commit hashed to
    two tags: METADATA carries the README as it was at install time. The tag follows content only."""
    package = _package(tmp_path)
    headers = package.metadata
    installed_then = headers + "Description-Content-Type: text/markdown\n\n# README\nold text\n"
    installed_now = headers + "Description-Content-Type: text/markdown\n\n# README\nnew text\n"
    old_style = headers.replace("Name:", "Description: line one\n        |line two\nName:")
    forms = {images.metadata_headers(text) for text in (installed_then, installed_now, old_style, headers)}
    assert forms == {headers}
    hashes = {
        images.worker_image_hash(
            "sha256:base", images.PackageSource(package.root, package.name, "9.9", form, package.entry_points)
        )
        for form in forms
    }
    assert len(hashes) == 1
    # What the host's installed_package() hands on carries no description either.
    installed = images.installed_package()
    assert installed.metadata == images.metadata_headers(installed.metadata)
    assert "\n\n" not in installed.metadata.strip() and "Requires-Dist:" in installed.metadata


def test_a_site_packages_listing_that_failed_once_does_not_make_installed_packages_look_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """importlib.metadata keeps a failed listing of site-packages (EMFILE: the process was out of
    descriptors) as an empty one. The hash then came from pyproject.toml instead of the installed
    METADATA (another image tag: a rebuild), and every worker requirement was "not installed"."""
    import importlib.metadata as md

    before, pinned = images.installed_package().hash(), images.lock_requirements()
    real_listdir = os.listdir

    def out_of_descriptors(path: str = ".") -> list[str]:
        if "site-packages" in str(path):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_listdir(path)

    images.forget_metadata_listings()
    with monkeypatch.context() as patch:
        patch.setattr(os, "listdir", out_of_descriptors)
        assert next(iter(md.distributions(name="pytest")), None) is None  # the listing failed, silently
    assert next(iter(md.distributions(name="pytest")), None) is None  # ... and is kept
    assert images.installed_package().hash() == before
    images.forget_metadata_listings()
    with monkeypatch.context() as patch:
        patch.setattr(os, "listdir", out_of_descriptors)
        assert next(iter(md.distributions(name="regex")), None) is None
    assert images.lock_requirements() == pinned


def test_with_no_finder_of_distributions_left_on_sys_meta_path_installed_packages_are_still_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """importlib_metadata (imported by litellm and pygal) deletes the stdlib PathFinder's
    find_distributions and puts its own finder on sys.meta_path; a process that then puts back an
    older sys.meta_path (pytester does after each test) has no finder of distributions left. That
    failed 4-11 tests of one xdist process in 3 of 7 runs of this suite and one CI run."""
    import importlib.machinery
    import importlib.metadata as md
    import sys

    before, pinned = images.installed_package().hash(), images.lock_requirements()
    monkeypatch.delattr(importlib.machinery.PathFinder, "find_distributions", raising=False)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not hasattr(f, "find_distributions")])
    assert next(iter(md.distributions(name="pytest")), None) is None  # the state, as it was
    assert images.installed_package().hash() == before
    assert images.lock_requirements() == pinned
