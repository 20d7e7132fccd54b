"""provision doctor: every check, each isolated, on the in-memory engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.runtime.doctor import doctor
from provisioner.runtime.engine import FakeRuntime
from provisioner.settings import Settings

from .conftest import FakeWorkers


def test_doctor_reports_the_engine_key_and_disk(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers]
) -> None:
    rt, _ = fake
    checks = {c.name: c for c in doctor(settings, runtime=rt)}
    assert checks["docker engine"].status == "ok"
    assert checks["docker engine"].detail == "fake 0 (API 0) at fake"
    assert checks["publish address"].detail == "workers are published on 127.0.0.1"
    assert checks["worker image"].status == "warn" and "not built yet" in checks["worker image"].detail
    assert "disk (docker)" not in checks  # an engine without a disk of its own
    assert checks["Gemini API key"].status == "warn" and "stand-in" in checks["Gemini API key"].detail
    assert (
        checks["disk (state dir)"].status in ("ok", "fail") and "GB free" in checks["disk (state dir)"].detail
    )
    assert checks["provisioner installation"].status == "ok"
    assert "dspy-provisioner" in checks["provisioner installation"].detail
    rt.available = False
    without_engine = {c.name: c.status for c in doctor(settings, runtime=rt)}
    assert without_engine["docker engine"] == "fail" and "stale runs" not in without_engine
    assert without_engine["Gemini API key"] == "warn"  # the checks that need no engine still run


def test_doctor_turns_an_unexpected_error_into_a_failed_check(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], monkeypatch: pytest.MonkeyPatch
) -> None:
    from provisioner.errors import ImageError
    from provisioner.runtime import images

    def broken(*_a: object, **_k: object) -> None:
        raise ImageError("the worker image is built from provisioner's source tree, which was not found")

    monkeypatch.setattr(images, "installed_package", broken)
    monkeypatch.setattr("provisioner.runtime.doctor.list_runs", lambda *_a, **_k: 1 / 0)
    checks = {c.name: c for c in doctor(settings, runtime=fake[0])}
    assert checks["provisioner installation"].status == "fail"
    assert "ImageError" in checks["provisioner installation"].detail
    assert checks["stale runs"].status == "fail" and "ZeroDivisionError" in checks["stale runs"].detail
    assert checks["Gemini API key"].status == "warn"  # the other checks still ran


def test_doctor_on_a_remote_engine_says_the_image_comes_from_the_local_engine(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A remote engine (one with an image source) lacks the image: doctor says whether the first
    `up` sends it from the local engine or builds it there first, and checks the base where the
    build happens."""
    from provisioner.runtime import images

    monkeypatch.setenv("PROVISION_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(images, "ensure_wheelhouse", lambda *_a, **_k: tmp_path)
    local = FakeRuntime(images=(images.PYTHON_BASE,))
    remote = FakeRuntime(image_source=local)
    remote.engine = "tcp://10.0.0.5:2376 (DOCKER_HOST)"
    checks = {c.name: c.detail for c in doctor(settings, runtime=remote)}
    assert checks["base image"] == f"{images.PYTHON_BASE} is present (on the local engine, where the worker image is built)"  # noqa: E501
    assert "builds it on the local engine and sends it to tcp://10.0.0.5:2376" in checks["worker image"]
    tag = images.build_worker_image(local, progress=lambda _m: None).tag
    checks = {c.name: c.detail for c in doctor(settings, runtime=remote)}
    assert checks["worker image"] == (
        f"{tag} is on the local engine, not on tcp://10.0.0.5:2376 (DOCKER_HOST): "
        "the first `provision up` / container test sends it (docker save | load)"
    )
    images.ensure_worker_image(remote)
    assert {c.name: c for c in doctor(settings, runtime=remote)}["worker image"].status == "ok"
