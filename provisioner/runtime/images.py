"""The worker image: base image, host-made wheelhouse, content-hashed tag, skip when unchanged.

Nothing is downloaded inside ``docker build`` (no registry, and pip inside a build fails on TLS here):

1. **base** — ``python:3.11-slim`` when it is present (or pullable); otherwise a Debian bookworm
   base made locally with ``debootstrap --variant=minbase`` and ``docker import`` (needs root and
   debootstrap). It is tagged ``provisioner-base:bookworm-<hash of its recipe>`` and reused.
2. **wheelhouse** — ``pip download`` on the host of ``images/worker/requirements.txt`` (fully pinned)
   for CPython 3.11 manylinux, cached under ``~/.cache/provisioner/wheelhouse/<hash>``.
3. **provisioner's wheel** — ``pip wheel --no-deps`` of a copy of the working tree, cached by hash.
4. **build** — a minimal context (Dockerfile, requirements, healthcheck, wheels/, dist/) and
   ``pip install --no-index``. The tag is ``provisioner-worker:<hash>`` where the hash covers the
   base image id, the Dockerfile and friends, the requirements and provisioner's source, so
   an unchanged build is one hash and one ``image exists`` call.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from provisioner.errors import ImageError
from provisioner.runtime import labels as L
from provisioner.runtime.engine import DockerRuntime

WORKER_REPO = "provisioner-worker"
LATEST_TAG = f"{WORKER_REPO}:latest"
BASE_REPO = "provisioner-base"
PYTHON_BASE = "python:3.11-slim"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR_ENV = "PROVISION_DEBIAN_MIRROR"
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# What is removed from the debootstrap tree before import: caches and docs nobody reads in a worker.
DEBOOTSTRAP_PRUNE = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
WHEEL_PLATFORMS = (
    "manylinux_2_36_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)
WHEEL_PYTHON = "3.11"
# Bump when the way images are assembled changes in a way the inputs below do not capture.
RECIPE_VERSION = "1"
WORKER_ROOTS = ("dspy", "google-genai", "pydantic", "pydantic-settings", "psutil", "click")

BaseChoice = Literal["auto", "python", "debootstrap"]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    tag: str
    built: bool
    seconds: float
    base: str


# --- locations ------------------------------------------------------------------------------------


def project_root() -> Path:
    """The source tree provisioner is installed from (the image is built from it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "images" / "worker" / "Dockerfile").is_file():
        raise ImageError(
            f"the worker image is built from provisioner's source tree, which was not found at {root} "
            "(install provisioner from a checkout, e.g. `pip install -e .`)"
        )
    return root


def cache_dir() -> Path:
    base = os.environ.get("PROVISION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "provisioner"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One image build at a time per machine (pytest-xdist workers all ask for the image at once)."""
    with open(cache_dir() / "build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- hashing --------------------------------------------------------------------------------------


def _source_files(root: Path) -> list[Path]:
    files = [root / "pyproject.toml"]
    if (root / "README.md").is_file():
        files.append(root / "README.md")
    for path in sorted((root / "provisioner").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            files.append(path)
    return files


def _image_files(root: Path) -> list[Path]:
    folder = root / "images" / "worker"
    return [folder / name for name in ("Dockerfile", ".dockerignore", "requirements.txt", "healthcheck.py")]


def _hash_files(digest: Any, root: Path, files: list[Path]) -> None:
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")


def source_hash(root: Path | None = None) -> str:
    """Hash of provisioner's own source (what goes into its wheel)."""
    root = root or project_root()
    digest = hashlib.sha256(b"provisioner-source\0")
    _hash_files(digest, root, _source_files(root))
    return digest.hexdigest()


def requirements_hash(requirements: Path) -> str:
    digest = hashlib.sha256(b"wheelhouse\0" + RECIPE_VERSION.encode() + b"\0")
    digest.update(WHEEL_PYTHON.encode() + b"\0" + ",".join(WHEEL_PLATFORMS).encode() + b"\0")
    digest.update(requirements.read_bytes())
    return digest.hexdigest()


def worker_image_hash(base_id: str, root: Path | None = None) -> str:
    """The content hash naming the worker image: base image id + image files + provisioner source."""
    root = root or project_root()
    digest = hashlib.sha256(b"worker-image\0" + RECIPE_VERSION.encode() + b"\0" + base_id.encode() + b"\0")
    _hash_files(digest, root, _image_files(root))
    digest.update(source_hash(root).encode())
    return digest.hexdigest()


def debootstrap_base_tag() -> str:
    digest = hashlib.sha256(b"debootstrap\0" + RECIPE_VERSION.encode() + b"\0")
    digest.update(
        f"{DEBIAN_SUITE}\0minbase\0{','.join(DEBOOTSTRAP_PACKAGES)}\0{','.join(DEBOOTSTRAP_PRUNE)}".encode()
    )
    return f"{BASE_REPO}:{DEBIAN_SUITE}-{digest.hexdigest()[:12]}"


# --- base image -----------------------------------------------------------------------------------


def _image_id(runtime: DockerRuntime, ref: str) -> str | None:
    import docker.errors

    try:
        return str(runtime.client.images.get(ref).id)
    except docker.errors.ImageNotFound:
        return None


def _try_pull(runtime: DockerRuntime, ref: str, progress: Progress) -> str | None:
    progress(f"pulling {ref} ...")
    repo, _, tag = ref.partition(":")
    try:
        runtime.client.images.pull(repo, tag=tag or "latest")
    except Exception as exc:  # offline: registry unreachable, DNS failure, timeout
        progress(f"could not pull {ref} ({type(exc).__name__}); falling back to a debootstrap base")
        return None
    return _image_id(runtime, ref)


def resolve_base(
    runtime: DockerRuntime,
    choice: BaseChoice = "auto",
    *,
    allow_build: bool = True,
    progress: Progress = print,
) -> tuple[str, str]:
    """(reference, image id) of the base image, building the debootstrap base if needed.

    ``auto`` prefers what is already here (``python:3.11-slim``, then our debootstrap base) so the
    unchanged-build path never touches the network; only then does it try a pull, then debootstrap.
    """
    deb_tag = debootstrap_base_tag()
    if choice in ("auto", "python"):
        found = _image_id(runtime, PYTHON_BASE)
        if found:
            return PYTHON_BASE, found
    if choice in ("auto", "debootstrap"):
        found = _image_id(runtime, deb_tag)
        if found:
            return deb_tag, found
    if not allow_build:
        raise ImageError(f"no base image present ({PYTHON_BASE} or {deb_tag}); run `provision images build`")
    if choice in ("auto", "python"):
        pulled = _try_pull(runtime, PYTHON_BASE, progress)
        if pulled:
            return PYTHON_BASE, pulled
        if choice == "python":
            raise ImageError(f"{PYTHON_BASE} is neither present nor pullable; try --base debootstrap")
    return deb_tag, build_debootstrap_base(runtime, deb_tag, progress=progress)


def debootstrap_problem() -> str | None:
    """Why a debootstrap base cannot be built here, or None when it can."""
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed (apt-get install debootstrap; bash .ci/setup does it)"
    if os.geteuid() != 0:
        return "debootstrap needs root (run `provision images build` as root or with sudo)"
    return None


def build_debootstrap_base(runtime: DockerRuntime, tag: str, *, progress: Progress = print) -> str:
    """``debootstrap --variant=minbase bookworm`` + prune + ``docker import``; returns the image id."""
    problem = debootstrap_problem()
    if problem:
        raise ImageError(f"cannot build the offline base image: {problem}")
    mirror = os.environ.get(DEBIAN_MIRROR_ENV, DEFAULT_DEBIAN_MIRROR)
    work = Path(tempfile.mkdtemp(prefix="provision-base-", dir=cache_dir()))
    rootfs = work / "rootfs"
    try:
        progress(
            f"debootstrap {DEBIAN_SUITE} (minbase + {', '.join(DEBOOTSTRAP_PACKAGES)}) from {mirror} ..."
        )
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(DEBOOTSTRAP_PACKAGES)}",
            DEBIAN_SUITE,
            str(rootfs),
            mirror,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise ImageError(f"debootstrap failed (exit {done.returncode}):\n{tail}")
        for rel in DEBOOTSTRAP_PRUNE:
            target = rootfs / rel
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        progress("importing the base into Docker ...")
        tarball = work / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], check=True)
        repo, _, version = tag.partition(":")
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["/bin/bash"]',
            f"LABEL {L.MANAGED}=base",
        ]
        runtime.client.api.import_image_from_file(str(tarball), repository=repo, tag=version, changes=changes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    found = _image_id(runtime, tag)
    if not found:
        raise ImageError(f"docker import did not produce {tag}")
    return found


# --- wheelhouse and project wheel -----------------------------------------------------------------


def ensure_wheelhouse(requirements: Path, *, progress: Progress = print) -> Path:
    """Wheels for every pinned requirement (CPython 3.11, manylinux), cached by the requirements' hash."""
    folder = cache_dir() / "wheelhouse" / requirements_hash(requirements)[:16]
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    progress(f"downloading the worker wheelhouse into {folder} ...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--no-deps",
        "--python-version",
        WHEEL_PYTHON,
        "--implementation",
        "cp",
        "--abi",
        f"cp{WHEEL_PYTHON.replace('.', '')}",
        "-d",
        str(folder),
        "-r",
        str(requirements),
    ]
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        errors = [line for line in (done.stderr or "").splitlines() if "WARNING" not in line]
        raise ImageError("pip download of the worker wheelhouse failed:\n" + "\n".join(errors[-15:]))
    marker.write_text(json.dumps({"created": time.time()}))
    return folder


def ensure_project_wheel(root: Path, *, progress: Progress = print) -> Path:
    """provisioner's own wheel, made from the working tree and cached by the source hash.

    provisioner is pure Python, so the wheel (PEP 427: the package files plus ``.dist-info`` with
    METADATA, WHEEL, entry_points.txt and RECORD) is written directly, in milliseconds and offline,
    instead of spinning up an isolated ``pip wheel`` build environment for every code change.
    """
    folder = cache_dir() / "project-wheels" / source_hash(root)[:16]
    existing = sorted(folder.glob("provisioner-*.whl"))
    if existing:
        return existing[0]
    progress("packing provisioner's wheel from the working tree ...")
    folder.mkdir(parents=True, exist_ok=True)
    final = write_project_wheel(root, folder)
    return final


def write_project_wheel(root: Path, out_dir: Path) -> Path:
    """Write ``provisioner-<version>-py3-none-any.whl`` for the tree at ``root`` into ``out_dir``."""
    import base64
    import tomllib
    import zipfile

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist_info = f"{name}-{version}.dist-info"
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: {project.get('description', '')}",
        f"Requires-Python: {project.get('requires-python', '>=3.11')}",
    ]
    metadata += [f"Requires-Dist: {dep}" for dep in project.get("dependencies", [])]
    entry_lines = []
    scripts = project.get("scripts", {})
    if scripts:
        entry_lines.append("[console_scripts]")
        entry_lines += [f"{key} = {value}" for key, value in scripts.items()]
    for group, entries in project.get("entry-points", {}).items():
        entry_lines.append(f"[{group}]")
        entry_lines += [f"{key} = {value}" for key, value in entries.items()]
    generated = {
        f"{dist_info}/METADATA": "\n".join(metadata) + "\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: provisioner\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": "\n".join(entry_lines) + "\n",
        f"{dist_info}/top_level.txt": "provisioner\n",
    }
    target = out_dir / f"{name}-{version}-py3-none-any.whl"
    tmp = target.with_suffix(".tmp")
    records: list[str] = []

    def add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
        info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{arcname},sha256={digest},{len(data)}")

    with zipfile.ZipFile(tmp, "w") as zf:
        for path in _source_files(root):
            rel = path.relative_to(root)
            if rel.parts[0] == "provisioner":
                add(zf, rel.as_posix(), path.read_bytes())
        for arcname, text in generated.items():
            add(zf, arcname, text.encode())
        records.append(f"{dist_info}/RECORD,,")
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        zf.writestr(info, "\n".join(records) + "\n")
    tmp.replace(target)
    return target


# --- the worker image -----------------------------------------------------------------------------


def worker_tag(runtime: DockerRuntime, base: BaseChoice = "auto", root: Path | None = None) -> str | None:
    """The tag an up-to-date worker image has, or None when no base image is present yet."""
    try:
        _ref, base_id = resolve_base(runtime, base, allow_build=False)
    except ImageError:
        return None
    return f"{WORKER_REPO}:{worker_image_hash(base_id, root)[:12]}"


def build_worker_image(
    runtime: DockerRuntime | None = None,
    *,
    base: BaseChoice = "auto",
    force: bool = False,
    progress: Progress | None = None,
    show_progress: bool = False,
) -> BuildResult:
    """Build the worker image unless one with the same content hash exists; return its tag.

    ``progress`` receives one-line status messages; ``show_progress`` renders a rich status line
    with the current build step instead (for the CLI).
    """
    start = time.perf_counter()
    own = runtime is None
    runtime = runtime or DockerRuntime()
    try:
        root = project_root()
        with _progress_sink(progress, show_progress) as say:
            tag = worker_tag(runtime, base, root)
            if tag and not force and runtime.image_exists(tag):
                _tag_latest(runtime, tag)
                return BuildResult(tag, False, time.perf_counter() - start, _base_ref(runtime, base))
            with _build_lock():
                base_ref, base_id = resolve_base(runtime, base, progress=say)
                tag = f"{WORKER_REPO}:{worker_image_hash(base_id, root)[:12]}"
                if not force and runtime.image_exists(tag):  # built by someone else while we waited
                    return BuildResult(tag, False, time.perf_counter() - start, base_ref)
                requirements = root / "images" / "worker" / "requirements.txt"
                wheelhouse = ensure_wheelhouse(requirements, progress=say)
                wheel = ensure_project_wheel(root, progress=say)
                _docker_build(runtime, root, base_ref, tag, wheelhouse, wheel, say)
                _tag_latest(runtime, tag)
                return BuildResult(tag, True, time.perf_counter() - start, base_ref)
    finally:
        if own:
            runtime.close()


def ensure_worker_image(
    runtime: DockerRuntime | None = None,
    *,
    image: str | None = None,
    base: BaseChoice = "auto",
    progress: Progress | None = None,
) -> str:
    """The image workers run: ``image`` when given (must exist), else the content-hashed build."""
    if image:
        rt = runtime or DockerRuntime()
        try:
            if not rt.image_exists(image):
                raise ImageError(f"worker image {image!r} (settings container.image) is not present")
        finally:
            if runtime is None:
                rt.close()
        return image
    return build_worker_image(runtime, base=base, progress=progress).tag


def _tag_latest(runtime: DockerRuntime, tag: str) -> None:
    """Point ``provisioner-worker:latest`` (what the compose files use) at ``tag``."""
    image = runtime.client.images.get(tag)
    if LATEST_TAG not in (image.tags or []):
        image.tag(WORKER_REPO, "latest")


def _base_ref(runtime: DockerRuntime, base: BaseChoice) -> str:
    try:
        return resolve_base(runtime, base, allow_build=False)[0]
    except ImageError:
        return "?"


def _docker_build(
    runtime: DockerRuntime, root: Path, base_ref: str, tag: str, wheelhouse: Path, wheel: Path, say: Progress
) -> None:
    import docker.errors

    folder = root / "images" / "worker"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name in ("Dockerfile", "requirements.txt", "healthcheck.py", ".dockerignore"):
            tar.add(folder / name, arcname=name)
        tar.add(root / "provisioner" / "runtime" / "relay.py", arcname="relay.py")
        for whl in sorted(wheelhouse.glob("*.whl")):
            tar.add(whl, arcname=f"wheels/{whl.name}")
        tar.add(wheel, arcname=f"dist/{wheel.name}")
    context.seek(0)
    say(f"building {tag} on {base_ref} ...")
    labels = {L.MANAGED: "image", L.IMAGE_HASH: tag.split(":", 1)[1]}
    try:
        stream = runtime.client.api.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            buildargs={"BASE": base_ref},
            labels=labels,
            rm=True,
            forcerm=True,
            decode=True,
            pull=False,
        )
        last: list[str] = []
        for chunk in stream:
            if "error" in chunk:
                raise ImageError(f"building {tag} failed: {chunk['error'].strip()}\n" + "".join(last[-15:]))
            text = chunk.get("stream") or ""
            if text:
                last.append(text)
                if text.startswith("Step "):
                    say(text.strip())
    except docker.errors.APIError as exc:
        raise ImageError(f"building {tag} failed: {exc}") from None
    if not runtime.image_exists(tag):
        raise ImageError(f"the build reported success but {tag} is missing")


@contextlib.contextmanager
def _progress_sink(progress: Progress | None, show: bool) -> Iterator[Progress]:
    if progress is not None or not show:
        yield progress or (lambda _msg: None)
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("checking the worker image ...") as status:
        started = time.perf_counter()

        def say(message: str) -> None:
            console.log(message) if not message.startswith("Step ") else None
            status.update(f"[{time.perf_counter() - started:5.1f}s] {message[:90]}")

        yield say


def prune_worker_images(runtime: DockerRuntime | None = None, *, dry_run: bool = False) -> list[str]:
    """Remove ``provisioner-worker`` images except the current build, ``latest`` and any image a
    container (running or not) still uses. Returns the removed tags."""
    import docker.errors

    rt = runtime or DockerRuntime()
    try:
        current = worker_tag(rt)
        keep_ids = {c["ImageID"] for c in rt.client.api.containers(all=True)}
        removed = []
        for image in rt.client.images.list(name=WORKER_REPO):
            tags = [t for t in image.tags if t not in (current, LATEST_TAG)]
            if len(tags) != len(image.tags) or image.id in keep_ids:
                continue
            for tag in tags:
                if not dry_run:
                    with contextlib.suppress(docker.errors.APIError):
                        rt.client.images.remove(tag)
                removed.append(tag)
        return removed
    finally:
        if runtime is None:
            rt.close()


# --- requirements lock ----------------------------------------------------------------------------


def lock_requirements(roots: tuple[str, ...] = WORKER_ROOTS) -> list[str]:
    """``name==version`` for the dependency closure of ``roots`` as installed in this environment."""
    import importlib.metadata as md
    import re

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env: dict[str, str] = dict(default_environment())  # type: ignore[arg-type]
    seen: dict[str, str] = {}
    done: set[tuple[str, str]] = set()  # (distribution, extra) pairs already expanded
    stack: list[tuple[str, str]] = [(name, "") for name in roots]
    while stack:
        raw_name, extra = stack.pop()
        name = re.sub(r"[-_.]+", "-", raw_name).lower()
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise ImageError(f"worker requirement {name!r} is not installed in this environment") from None
        seen[name] = dist.version
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({**env, "extra": extra}):
                stack.append((req.name, ""))
                stack.extend((req.name, wanted) for wanted in sorted(req.extras))
    return [f"{name}=={seen[name]}" for name in sorted(seen)]


def write_requirements(path: Path | None = None) -> Path:
    path = path or project_root() / "images" / "worker" / "requirements.txt"
    text = path.read_text() if path.is_file() else ""
    header = [line for line in text.splitlines() if line.startswith("#")]
    path.write_text("\n".join([*header, *lock_requirements()]) + "\n")
    return path
