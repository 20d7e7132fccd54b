"""The image store (:class:`~provisioner.runtime.engine.ImageStore`): one contract, both runtimes.

Every test here runs against :class:`FakeRuntime` and, marked ``docker``, against the real engine
through :class:`DockerRuntime` — the second run is what proves the fake answers like Docker.
"""

from __future__ import annotations

import io
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import ImageError
from provisioner.runtime import images
from provisioner.runtime.engine import ContainerRuntime, DockerRuntime, FakeRuntime, ImageStore

from ..._helpers import dockerfile_context, write_tar

REPO = "provisioner-store-test"
# This process's prefix of every tag it makes: the engine is shared with other test runs (other
# checkouts, xdist processes), and a teardown removes only its own (it removed every REPO tag,
# other runs' included, while they were using them).
OWN = f"{REPO}:{secrets.token_hex(4)}-"
Store = tuple[ContainerRuntime, str]


@pytest.fixture(params=["fake", pytest.param("docker", marks=pytest.mark.docker)])
def store(request: pytest.FixtureRequest) -> Iterator[tuple[ContainerRuntime, str]]:
    """(runtime, a base image reference present on it); every ``REPO`` tag this process made is removed."""
    if request.param == "fake":
        fake = FakeRuntime(images=("base-for-tests:1",))
        yield fake, "base-for-tests:1"
        return
    rt = DockerRuntime(request.getfixturevalue("docker_engine"))
    base_ref, _ = images.resolve_base(rt, allow_build=False)  # present wherever the worker image is
    try:
        yield rt, base_ref
    finally:
        for image in rt.list_images(REPO):
            for tag in image.tags:
                if tag.startswith(OWN):
                    rt.remove_image(tag)
        rt.close()


def _tag() -> str:
    return f"{OWN}{secrets.token_hex(4)}"


def test_both_runtimes_are_image_stores() -> None:
    assert isinstance(FakeRuntime(), ImageStore) and isinstance(FakeRuntime(), ContainerRuntime)
    assert {name for name in dir(ImageStore) if not name.startswith("_")} <= set(dir(DockerRuntime))


def test_a_build_uses_its_build_args_labels_and_reports_its_steps(store: Store) -> None:
    rt, base = store
    tag = _tag()
    lines: list[str] = []
    built = rt.build(
        # The tag in the LABEL step: no other run's build shares (and prunes) its cached step.
        dockerfile_context(f"ARG BASE=absent:0\nFROM ${{BASE}}\nLABEL from.dockerfile=1 test.tag={tag}\n"),
        tag,
        build_args={"BASE": base},
        labels={"test.given": "yes"},
        on_output=lines.append,
    )
    assert tag in built.tags
    assert built.labels["test.given"] == "yes" and built.labels["from.dockerfile"] == "1"
    assert [line for line in lines if line.startswith("Step ")][:2] == [
        "Step 1/4 : ARG BASE=absent:0", "Step 2/4 : FROM ${BASE}"  # as written; the given labels are step 4
    ]
    found = rt.image(tag)
    assert found is not None and found.id == built.id and rt.image_exists(tag)
    assert any(i.id == built.id for i in rt.list_images(REPO))


def test_a_build_never_pulls_a_missing_base(store: Store) -> None:
    rt, _base = store
    tag = _tag()
    with pytest.raises(ImageError, match=f"building {tag} failed"):
        rt.build(dockerfile_context("FROM provisioner-absent-base:0\n"), tag, build_args={}, labels={})
    assert rt.image(tag) is None


def test_tags_point_and_removal_only_untags_a_shared_image(store: Store) -> None:
    rt, base = store
    first, second = _tag(), _tag()
    built = rt.build(dockerfile_context(f"FROM {base}\nLABEL test.tags={first}\n"), first,
                     build_args={}, labels={})
    rt.tag(first, second)
    again = rt.image(second)
    assert again is not None and again.id == built.id and {first, second} <= set(again.tags)
    assert rt.remove_image(first) is True  # only the tag: the image keeps its other name
    assert rt.image(first) is None and rt.image(second) is not None
    assert rt.remove_image(second) is True
    assert rt.image(built.id) is None and rt.remove_image(second) is False
    with pytest.raises(ImageError):
        rt.tag(second, _tag())


def test_a_reference_that_names_a_registry_port_is_tagged_and_imported_as_named(
    store: Store, tmp_path: Path
) -> None:
    """``localhost:5000/<repo>:<tag>``: the repository is everything before the last ``:`` of the
    last path part (Docker's reference grammar), not before the first ``:``; the engine was asked
    for repository ``localhost`` and tag ``5000/...`` and refused."""
    rt, base = store
    tagged = f"localhost:5000/{_tag()}"
    imported = f"localhost:5000/{_tag()}"
    write_tar(tmp_path / "rootfs.tar", {"etc/hello": b"hello\n"})
    try:
        rt.tag(base, tagged)
        found = rt.image(tagged)
        assert found is not None and tagged in found.tags
        made = rt.import_rootfs(tmp_path / "rootfs.tar", imported, changes=[])
        assert imported in made.tags
    finally:
        rt.remove_image(tagged)
        rt.remove_image(imported)


def test_a_rootfs_import_carries_its_changes(store: Store, tmp_path: Path) -> None:
    rt, _base = store
    tarball = tmp_path / "rootfs.tar"
    write_tar(tarball, {"etc/hello": b"hello\n"})
    tag = _tag()
    made = rt.import_rootfs(tarball, tag, changes=["ENV LANG=C.UTF-8", "LABEL test.imported=yes"])
    assert tag in made.tags and made.labels.get("test.imported") == "yes"


def test_an_unreachable_registry_is_an_image_error(store: Store) -> None:
    rt, _base = store
    with pytest.raises(ImageError, match="could not pull"):
        rt.pull("127.0.0.1:9/provisioner-absent:0")  # nothing listens on port 9: refused at once


def test_the_engine_describes_itself(store: Store) -> None:
    rt, _base = store
    info = rt.engine_info()
    assert info.version and info.api_version
    assert (info.root_dir is None) == isinstance(rt, FakeRuntime)


def test_images_in_use_name_what_containers_run(store: Store, docker_or_none: Any) -> None:
    rt, base = store
    tag = _tag()
    built = rt.build(dockerfile_context(f"FROM {base}\nLABEL test.in-use={tag}\n"), tag,
                     build_args={}, labels={})
    assert built.id not in rt.images_in_use()
    if isinstance(rt, FakeRuntime):
        from provisioner.runtime.recipes import ContainerRecipe

        cid = rt.create_container(ContainerRecipe("c1", "worker", tag, (), {}, {}, ()))
    else:
        cid = docker_or_none.api.create_container(tag, command=["true"])["Id"]
    try:
        assert built.id in rt.images_in_use()
        assert rt.remove_image(tag) is False  # the last name of an image a container uses stays
    finally:
        rt.remove_container(cid)


@pytest.fixture
def docker_or_none(request: pytest.FixtureRequest) -> Any:
    """docker-py's client in the docker run of a test (to make a container outside the runtime)."""
    return request.getfixturevalue("docker_engine") if "docker" in request.node.callspec.id else None


def _tiny_image(rt: ContainerRuntime, tmp_path: Path, label: str) -> str:
    """A one-file image made by import (a few hundred bytes: a save of it moves no base layers)."""
    tarball = tmp_path / "tiny.tar"
    write_tar(tarball, {"etc/tiny": label.encode()})
    tag = _tag()
    rt.import_rootfs(tarball, tag, changes=[f"LABEL test.tiny={label}"])
    return tag


def test_a_saved_image_loads_back_with_its_id_tags_and_labels(store: Store, tmp_path: Path) -> None:
    rt, _base = store
    label = secrets.token_hex(4)
    tag = _tiny_image(rt, tmp_path, label)
    before = rt.image(tag)
    assert before is not None
    chunks = list(rt.save(tag))
    assert len(chunks) >= 1 and all(isinstance(c, bytes) for c in chunks)
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tar:
        assert "manifest.json" in tar.getnames()  # docker save's format
    assert rt.remove_image(tag) is True and rt.image(tag) is None
    loaded = rt.load(iter(chunks))
    assert [(i.id, tag in i.tags, i.labels.get("test.tiny")) for i in loaded] == [(before.id, True, label)]
    assert rt.image(tag) == before


def test_saving_a_missing_image_and_loading_garbage_are_image_errors(store: Store) -> None:
    rt, _base = store
    with pytest.raises(ImageError, match="provisioner-store-test:absent"):
        list(rt.save(f"{REPO}:absent"))
    with pytest.raises(ImageError, match="refused the image archive"):
        rt.load(iter([b"not a tar archive" * 100]))


@pytest.mark.docker
def test_the_fake_loads_what_docker_saves(docker_engine: Any, tmp_path: Path) -> None:
    """The fake reads Docker's own archive (its manifest and config): same id, tag and labels."""
    rt = DockerRuntime(docker_engine)
    tag = _tiny_image(rt, tmp_path, "from-docker")
    try:
        made = rt.image(tag)
        fake = FakeRuntime()
        assert fake.load(rt.save(tag)) == [made]
        assert fake.image(tag) == made and fake.image(tag).labels["test.tiny"] == "from-docker"  # type: ignore[union-attr]
    finally:
        rt.remove_image(tag)
        rt.close()


def test_a_local_engine_has_no_image_source(store: Store) -> None:
    rt, _base = store
    assert rt.image_source() is None
