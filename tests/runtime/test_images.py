"""Image inputs: content hash, provisioner's own wheel, the pinned requirements."""

from __future__ import annotations

import base64
import hashlib
import shutil
import zipfile
from pathlib import Path

from provisioner.runtime import images


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "provisioner" / "sub").mkdir(parents=True)
    (root / "images" / "worker").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[project]\nname = "provisioner"\nversion = "9.9"\ndependencies = ["click>=8"]\n'
        '[project.scripts]\nprovision = "provisioner.cli:main"\n'
        '[project.entry-points.pytest11]\nprovisioner = "provisioner.pytest_plugin"\n'
    )
    (root / "provisioner" / "__init__.py").write_text("X = 1\n")
    (root / "provisioner" / "sub" / "mod.py").write_text("Y = 2\n")
    (root / "provisioner" / "py.typed").write_text("")
    for name in ("Dockerfile", ".dockerignore", "requirements.txt", "healthcheck.py"):
        (root / "images" / "worker" / name).write_text(f"{name}\n")
    return root


def test_the_tag_hash_covers_base_image_files_and_source(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    first = images.worker_image_hash("sha256:base1", root)
    assert first == images.worker_image_hash("sha256:base1", root)  # stable
    assert first != images.worker_image_hash("sha256:base2", root)
    (root / "provisioner" / "sub" / "mod.py").write_text("Y = 3\n")
    second = images.worker_image_hash("sha256:base1", root)
    assert second != first
    (root / "images" / "worker" / "Dockerfile").write_text("changed\n")
    assert images.worker_image_hash("sha256:base1", root) != second
    # Byte-code caches are not inputs.
    before = images.worker_image_hash("sha256:base1", root)
    (root / "provisioner" / "__pycache__").mkdir()
    (root / "provisioner" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert images.worker_image_hash("sha256:base1", root) == before


def test_the_project_wheel_is_complete_and_installable_metadata(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    wheel = images.write_project_wheel(root, out)
    assert wheel.name == "provisioner-9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {"provisioner/__init__.py", "provisioner/sub/mod.py", "provisioner/py.typed"} <= names
        entry_points = zf.read("provisioner-9.9.dist-info/entry_points.txt").decode()
        assert "[console_scripts]\nprovision = provisioner.cli:main" in entry_points
        assert "[pytest11]" in entry_points
        assert "Requires-Dist: click>=8" in zf.read("provisioner-9.9.dist-info/METADATA").decode()
        for line in zf.read("provisioner-9.9.dist-info/RECORD").decode().splitlines():
            name, digest, _size = line.split(",")
            if digest:
                data = zf.read(name)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert digest == f"sha256={expected}", name
    again = tmp_path / "again"
    again.mkdir()
    assert images.write_project_wheel(root, again).read_bytes() == wheel.read_bytes()  # reproducible


def test_pinned_requirements_match_this_environment_and_hold_no_host_tools() -> None:
    pinned = images.lock_requirements()
    names = {line.split("==")[0] for line in pinned}
    assert {"dspy", "google-genai", "pydantic", "pydantic-settings", "psutil", "click"} <= names
    assert "h2" in names  # pulled in through an extra (httpx[http2]): extras are followed
    assert not names & {"docker", "testcontainers", "pytest", "rich"}
    checked_in = images.project_root() / "images" / "worker" / "requirements.txt"
    lines = [ln for ln in checked_in.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == pinned, "images/worker/requirements.txt is stale: run `provision images lock`"


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
