"""The worker image: base image, host-made wheelhouse, content-hashed tag, skip when unchanged.

Everything the image is made from ships inside the installed package, so ``provision images build``
works the same from a checkout (editable install) and from an installed wheel of
``dspy-provisioner``. Nothing is downloaded inside ``docker build`` (no registry, and pip inside a
build fails on TLS here):

1. **base** — ``python:3.11-slim`` when it is present (or pullable); otherwise a Debian bookworm
   base made locally with ``debootstrap --variant=minbase`` and ``docker import`` (needs root and
   debootstrap). It is tagged ``provisioner-base:bookworm-<hash of its recipe>`` and reused.
2. **wheelhouse** — ``pip download`` on the host of the recipe's ``requirements.txt`` (fully
   pinned) for CPython 3.11 manylinux, cached under ``~/.cache/provisioner/wheelhouse/<hash>``.
3. **provisioner's wheel** — written from the *installed* package's files and its installed
   metadata (:func:`installed_package`), cached by the package hash: the worker runs exactly the
   code the host imports.
4. **build** — a minimal context (the recipe in ``provisioner/assets/worker/``: Dockerfile,
   requirements, healthcheck; ``relay.py``; ``wheels/``; ``dist/``) and ``pip install --no-index``.
   The tag is ``provisioner-worker:<hash>`` where the hash covers the base image id and the package
   hash (every file of the installed package — the recipe is one of them — plus its metadata), so a
   source change changes the tag and an unchanged build is one hash and one ``image exists`` call.
   The image carries the labels ``provisioner.package.hash`` and ``provisioner.version``;
   :func:`ensure_worker_image` refuses an image whose provisioner differs from the host's.

A project's image is also tagged ``provisioner-worker:<project id>`` (see
:func:`provisioner.runtime.labels.project_id`), moved by each build of that project only: two
projects on one engine never re-point each other's tag.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from provisioner._files import locked
from provisioner.errors import ImageError
from provisioner.runtime import labels as L
from provisioner.runtime.engine import ImageInfo, ImageStore, open_runtime

if TYPE_CHECKING:
    import importlib.metadata

DIST_NAME = "dspy-provisioner"
PACKAGE = "provisioner"
WORKER_REPO = "provisioner-worker"
BASE_REPO = "provisioner-base"
PYTHON_BASE = "python:3.11-slim"
DEBIAN_SUITE = "bookworm"
# Optional mirror for debootstrap; unset, debootstrap uses its own default mirror.
DEBIAN_MIRROR_ENV = "PROVISION_DEBIAN_MIRROR"
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
RECIPE_FILES = ("Dockerfile", ".dockerignore", "requirements.txt", "healthcheck.py")
WORKER_ROOTS = (
    "dspy", "google-genai", "pydantic", "pydantic-settings", "psutil", "click", "pyroute2", "regex",
)
_CONTENT_TAG = re.compile(r"^[0-9a-f]{12}$")

BaseChoice = Literal["auto", "python", "debootstrap"]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    tag: str
    built: bool
    seconds: float
    base: str
    project_tag: str | None = None
    sent: bool = False  # True: saved on the engine's image source and loaded into the engine


# --- the installed package ------------------------------------------------------------------------


def package_dir() -> Path:
    """The folder of the imported ``provisioner`` package (a checkout's or site-packages')."""
    import provisioner

    return Path(provisioner.__file__).resolve().parent


def recipe_dir() -> Path:
    """The worker image recipe shipped as package data: ``provisioner/assets/worker/``.

    Raises:
        ImageError: a file of the recipe is missing (a broken or partial installation).
    """
    folder = package_dir() / "assets" / "worker"
    missing = [name for name in RECIPE_FILES if not (folder / name).is_file()]
    if missing:
        raise ImageError(
            f"the worker image recipe is incomplete at {folder} (missing {', '.join(missing)}); "
            f"reinstall {DIST_NAME}"
        )
    return folder


@dataclass(frozen=True)
class PackageSource:
    """What provisioner's wheel for the worker image is made of: the files the host imports.

    ``metadata`` and ``entry_points`` are the texts of ``METADATA`` and ``entry_points.txt`` of the
    installed distribution (so console script and pytest plugin match the host's).
    """

    root: Path  # the package folder (``.../provisioner``)
    name: str  # distribution name
    version: str
    metadata: str
    entry_points: str

    def files(self) -> list[Path]:
        """Every file of the package (byte-code caches excluded), sorted."""
        return sorted(
            path
            for path in self.root.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")
        )

    def hash(self) -> str:
        """sha256 over every file (relative path + bytes), the metadata and the recipe version."""
        digest = hashlib.sha256(b"provisioner-package\0" + RECIPE_VERSION.encode() + b"\0")
        for path in self.files():
            digest.update(path.relative_to(self.root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
        digest.update(self.metadata.encode() + b"\0" + self.entry_points.encode())
        return digest.hexdigest()


def forget_metadata_listings() -> None:
    """Make ``importlib.metadata`` list the ``sys.path`` folders again on its next lookup.

    It keeps each folder's listing, keyed by the folder's mtime, and an error while listing (``EMFILE``
    when the process is out of descriptors, for one) is swallowed and kept as an empty listing: every
    distribution in site-packages then looks uninstalled in this process until the folder changes.
    Called before concluding that something is not installed. ``importlib.invalidate_caches()``
    reaches that cache only where CPython gh-116811 is fixed (March 2024); before that,
    ``MetadataPathFinder.invalidate_caches`` is a plain function taking the class (3.11.7 here).
    """
    import importlib
    import importlib.metadata as md
    import inspect

    importlib.invalidate_caches()
    finder = md.MetadataPathFinder
    if isinstance(inspect.getattr_static(finder, "invalidate_caches"), classmethod):
        finder.invalidate_caches()
    else:
        finder.invalidate_caches(finder)  # type: ignore[call-arg]


def installed_distributions(name: str, *, fresh: bool = False) -> list[importlib.metadata.Distribution]:
    """The installed distributions called ``name`` on ``sys.path`` (normally one).

    ``fresh``: look again, not trusting this process's state — the listings forgotten
    (:func:`forget_metadata_listings`) and through the stdlib's path finder itself. Callers do that
    before concluding something is not installed: ``importlib_metadata`` (the backport; litellm and
    pygal import it) deletes the stdlib ``PathFinder.find_distributions`` when first imported and puts
    its own finder on ``sys.meta_path``, so a process that later puts back an older ``sys.meta_path``
    (pytest's ``pytester`` does after each test) has no finder of distributions left and sees
    nothing installed.
    """
    import importlib.metadata as md

    if not fresh:
        return list(md.distributions(name=name))
    forget_metadata_listings()
    return list(md.MetadataPathFinder.find_distributions(md.DistributionFinder.Context(name=name)))


def installed_package(root: Path | None = None) -> PackageSource:
    """The installed provisioner: its package folder plus the installed distribution's metadata.

    Works for a regular wheel install and an editable install alike (the metadata of both is
    written by pip at install time). Without an installed distribution — the package imported from
    a source tree on ``PYTHONPATH`` — the metadata is made from the ``pyproject.toml`` beside it.

    Raises:
        ImageError: neither an installed distribution nor a ``pyproject.toml`` is found.
    """
    root = root or package_dir()
    # The installed .dist-info (a build's leftover .egg-info in a checkout on sys.path has no METADATA).
    for fresh in (False, True):  # not seeing it would silently make another image: look twice
        for dist in installed_distributions(DIST_NAME, fresh=fresh):
            metadata = dist.read_text("METADATA")
            if metadata:
                return PackageSource(
                    root,
                    dist.metadata["Name"],
                    dist.version,
                    metadata_headers(metadata),
                    dist.read_text("entry_points.txt") or "",
                )
    pyproject = root.parent / "pyproject.toml"
    if pyproject.is_file():
        return _from_pyproject(root, pyproject)
    raise ImageError(
        f"cannot tell which provisioner to put into the worker image: the distribution {DIST_NAME!r} "
        f"is not installed and there is no pyproject.toml beside {root}; install it "
        f"(`pip install {DIST_NAME}`, or `pip install -e .` in a checkout)"
    )


_NOT_CONTENT = ("description:", "description-content-type:")


def metadata_headers(metadata: str) -> str:
    """``METADATA`` without its long description (the body and a ``Description:`` header).

    The long description is the README *as it was when pip installed the distribution*: an
    editable install keeps that copy while the checkout's README moves on, so the same commit in
    /work/main (installed hours ago) and in a fresh clone hashed to two worker tags, and each
    clone built its own image. The worker never reads it; the headers (name, version,
    requirements) are what the wheel in the image needs.
    """
    head = metadata.replace("\r\n", "\n").split("\n\n", 1)[0]
    kept: list[str] = []
    skipping = False
    for line in head.splitlines():
        if line[:1] in (" ", "\t"):  # a continuation of the header above
            if not skipping:
                kept.append(line)
            continue
        skipping = line.lower().startswith(_NOT_CONTENT)
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _from_pyproject(root: Path, pyproject: Path) -> PackageSource:
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {project['name']}",
        f"Version: {project['version']}",
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
    return PackageSource(
        root, project["name"], project["version"], "\n".join(metadata) + "\n", "\n".join(entry_lines) + "\n"
    )


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
    with locked(cache_dir() / "build.lock"):
        yield


# --- hashing --------------------------------------------------------------------------------------


def requirements_hash(requirements: Path) -> str:
    digest = hashlib.sha256(b"wheelhouse\0" + RECIPE_VERSION.encode() + b"\0")
    digest.update(WHEEL_PYTHON.encode() + b"\0" + ",".join(WHEEL_PLATFORMS).encode() + b"\0")
    digest.update(requirements.read_bytes())
    return digest.hexdigest()


def worker_image_hash(base_id: str, package: PackageSource | None = None) -> str:
    """The content hash naming the worker image: base image id + the package hash (which covers
    the recipe, since the recipe is package data)."""
    package = package or installed_package()
    digest = hashlib.sha256(b"worker-image\0" + RECIPE_VERSION.encode() + b"\0" + base_id.encode() + b"\0")
    digest.update(package.hash().encode())
    return digest.hexdigest()


def project_tag(project: str) -> str:
    """The per-project tag (``provisioner-worker:<project id>``) that points at its content tag."""
    return f"{WORKER_REPO}:{project}"


def debootstrap_base_tag() -> str:
    digest = hashlib.sha256(b"debootstrap\0" + RECIPE_VERSION.encode() + b"\0")
    digest.update(
        f"{DEBIAN_SUITE}\0minbase\0{','.join(DEBOOTSTRAP_PACKAGES)}\0{','.join(DEBOOTSTRAP_PRUNE)}".encode()
    )
    return f"{BASE_REPO}:{DEBIAN_SUITE}-{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _opened(runtime: ImageStore | None) -> Iterator[ImageStore]:
    """``runtime``, or the engine's own runtime (:func:`open_runtime`) until the block ends."""
    if runtime is not None:
        yield runtime
        return
    own = open_runtime()
    try:
        yield own
    finally:
        own.close()


# --- base image -----------------------------------------------------------------------------------


def _image_id(runtime: ImageStore, ref: str) -> str | None:
    found = runtime.image(ref)
    return None if found is None else found.id


def _try_pull(runtime: ImageStore, ref: str, progress: Progress) -> str | None:
    progress(f"pulling {ref} ...")
    try:
        return runtime.pull(ref).id
    except ImageError as exc:  # offline: registry unreachable, DNS failure, timeout
        progress(f"{exc}; falling back to a debootstrap base")
        return None


def resolve_base(
    runtime: ImageStore,
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
        return "debootstrap is not installed (apt-get install debootstrap)"
    if os.geteuid() != 0:
        return "debootstrap needs root (run `provision images build` as root or with sudo)"
    return None


def debootstrap_command(rootfs: Path, mirror: str | None) -> list[str]:
    """The debootstrap call: the mirror argument only when ``PROVISION_DEBIAN_MIRROR`` gives one
    (debootstrap(8): MIRROR is optional and defaults to the Debian archive it knows)."""
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(DEBOOTSTRAP_PACKAGES)}",
        DEBIAN_SUITE,
        str(rootfs),
    ]
    return [*cmd, mirror] if mirror else cmd


def build_debootstrap_base(runtime: ImageStore, tag: str, *, progress: Progress = print) -> str:
    """``debootstrap --variant=minbase bookworm`` + prune + ``docker import``; returns the image id."""
    problem = debootstrap_problem()
    if problem:
        raise ImageError(f"cannot build the offline base image: {problem}")
    mirror = os.environ.get(DEBIAN_MIRROR_ENV) or None
    work = Path(tempfile.mkdtemp(prefix="provision-base-", dir=cache_dir()))
    rootfs = work / "rootfs"
    try:
        source = f"from {mirror}" if mirror else "from debootstrap's default mirror"
        progress(f"debootstrap {DEBIAN_SUITE} (minbase + {', '.join(DEBOOTSTRAP_PACKAGES)}) {source} ...")
        cmd = debootstrap_command(rootfs, mirror)
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
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["/bin/bash"]',
            f"LABEL {L.MANAGED}=base",
        ]
        return runtime.import_rootfs(tarball, tag, changes=changes).id
    finally:
        shutil.rmtree(work, ignore_errors=True)


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


def ensure_project_wheel(package: PackageSource, *, progress: Progress = print) -> Path:
    """provisioner's own wheel, made from the installed package and cached by the package hash.

    Why not ``pip wheel``: an installed wheel has no source tree to build from, and a build needs
    an isolated build environment (network or a warm cache, seconds per code change). The package
    is pure Python, so the wheel (PEP 427: the package files plus ``.dist-info`` with the installed
    METADATA and entry points, WHEEL and RECORD) is written directly from the files the host
    imports — offline, in milliseconds, and equal to the host's code by construction.
    """
    folder = cache_dir() / "project-wheels" / package.hash()[:16]
    existing = sorted(folder.glob("*.whl"))
    if existing:
        return existing[0]
    progress(f"packing provisioner's wheel from {package.root} ...")
    folder.mkdir(parents=True, exist_ok=True)
    return write_project_wheel(package, folder)


def _wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def write_project_wheel(package: PackageSource, out_dir: Path) -> Path:
    """Write ``<dist>-<version>-py3-none-any.whl`` of ``package`` into ``out_dir`` (reproducible)."""
    import base64
    import zipfile

    stem = f"{_wheel_name(package.name)}-{package.version}"
    dist_info = f"{stem}.dist-info"
    generated = {
        f"{dist_info}/METADATA": package.metadata,
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: provisioner\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{dist_info}/entry_points.txt": package.entry_points,
        f"{dist_info}/top_level.txt": f"{PACKAGE}\n",
    }
    target = out_dir / f"{stem}-py3-none-any.whl"
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
        for path in package.files():
            add(zf, f"{PACKAGE}/{path.relative_to(package.root).as_posix()}", path.read_bytes())
        for arcname, text in generated.items():
            add(zf, arcname, text.encode())
        records.append(f"{dist_info}/RECORD,,")
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        zf.writestr(info, "\n".join(records) + "\n")
    tmp.replace(target)
    return target


# --- the worker image -----------------------------------------------------------------------------


def worker_tag(
    runtime: ImageStore, base: BaseChoice = "auto", package: PackageSource | None = None
) -> str | None:
    """The tag an up-to-date worker image has, or None when no base image is present yet."""
    try:
        _ref, base_id = resolve_base(runtime, base, allow_build=False)
    except ImageError:
        return None
    return f"{WORKER_REPO}:{worker_image_hash(base_id, package)[:12]}"


def build_worker_image(
    runtime: ImageStore | None = None,
    *,
    base: BaseChoice = "auto",
    force: bool = False,
    project: str | None = None,
    progress: Progress | None = None,
    show_progress: bool = False,
) -> BuildResult:
    """Build the worker image unless one with the same content hash exists; return its tag.

    ``project`` (a :func:`~provisioner.runtime.labels.project_id`): also point that project's tag
    ``provisioner-worker:<project>`` at the image. ``progress`` receives one-line status messages;
    ``show_progress`` renders a rich status line with the current build step instead (for the CLI).

    Raises:
        ImageError: the recipe is incomplete, no base image can be had, the wheelhouse download
            or the build failed.
    """
    start = time.perf_counter()
    with _opened(runtime) as store, _progress_sink(progress, show_progress) as say:
        source = store.image_source()
        if source is not None:  # a remote engine: built (or found) locally, then sent
            built = build_worker_image(source, base=base, force=force, progress=say)
            sent = _send_missing(source, store, built.tag, force=force, progress=say)
            tagged = _tag_project(store, built.tag, project)
            return BuildResult(built.tag, built.built, time.perf_counter() - start, built.base, tagged, sent)
        package = installed_package()
        recipe = recipe_dir()
        tag = worker_tag(store, base, package)
        if not (tag and not force and store.image_exists(tag)):
            with _build_lock():
                base_ref, base_id = resolve_base(store, base, progress=say)
                tag = f"{WORKER_REPO}:{worker_image_hash(base_id, package)[:12]}"
                if force or not store.image_exists(tag):  # else: built by someone else meanwhile
                    wheelhouse = ensure_wheelhouse(recipe / "requirements.txt", progress=say)
                    wheel = ensure_project_wheel(package, progress=say)
                    _build(store, recipe, base_ref, tag, wheelhouse, wheel, package, say)
                    tagged = _tag_project(store, tag, project)
                    return BuildResult(tag, True, time.perf_counter() - start, base_ref, tagged)
        tagged = _tag_project(store, tag, project)
        return BuildResult(tag, False, time.perf_counter() - start, _base_ref(store, base), tagged)


def ensure_worker_image(
    runtime: ImageStore | None = None,
    *,
    image: str | None = None,
    base: BaseChoice = "auto",
    project: str | None = None,
    progress: Progress | None = None,
) -> str:
    """The image workers run: ``image`` when given (must exist), else the content-hashed build.

    Either way the image's provisioner must be the host's (:func:`check_image_provisioner`).

    Raises:
        ImageError: ``image`` is not present (build or pull it yourself: provisioner only builds its
            own image), the build failed, or the image holds another provisioner than the host.
    """
    with _opened(runtime) as rt:
        if image:
            source = rt.image_source()
            if source is not None and source.image_exists(image):
                _send_missing(source, rt, image, force=False, progress=progress or (lambda _msg: None))
            if not rt.image_exists(image):
                raise ImageError(
                    f"worker image {image!r} (settings container.image) is not present; provisioner "
                    f"builds only its own image, so build or pull {image!r} yourself (e.g. "
                    f"`docker build -t {image} .` or `docker pull {image}`), or unset container.image"
                )
        else:
            image = build_worker_image(rt, base=base, project=project, progress=progress).tag
        check_image_provisioner(rt, image)
        return image


def transfer_image(
    source: ImageStore, target: ImageStore, ref: str, *, progress: Progress | None = None
) -> ImageInfo:
    """Copy the image ``ref`` from ``source`` to ``target``: ``docker save`` on one engine's API
    streamed into ``docker load`` on the other's — no registry, no file, never whole in memory. This
    is how the worker image reaches a remote engine (its size and time: docs/benchmarks.md,
    "Remote engines"). ``progress`` hears the size first, then every ~10 % sent.

    Raises:
        ImageError: ``source`` has no ``ref``, either engine broke off, or ``target`` refused the
            archive or does not hold the same image afterwards.
    """
    say = progress or (lambda _msg: None)
    found = source.image(ref)
    if found is None:
        raise ImageError(f"cannot send {ref}: the engine it comes from does not have it")
    where = getattr(target, "engine", "the engine")
    total = found.size
    say(f"sending {ref} ({_mb(total)}) to {where} (docker save | docker load) ...")
    step = max(total // 10, 1) if total else 50_000_000
    counter = {"sent": 0, "next": step}

    def counted() -> Iterator[bytes]:
        for chunk in source.save(ref):
            counter["sent"] += len(chunk)
            if counter["sent"] >= counter["next"]:
                counter["next"] += step
                say(f"sent {_mb(counter['sent'])}" + (f" of ~{_mb(total)}" if total else "") + f" of {ref}")
            yield chunk

    started = time.perf_counter()
    target.load(counted())
    arrived = target.image(ref)
    if arrived is None or arrived.id != found.id:
        raise ImageError(
            f"sending {ref} to {where} did not leave the same image there "
            f"({'none' if arrived is None else arrived.id} instead of {found.id})"
        )
    say(f"sent {ref}: {_mb(counter['sent'])} in {time.perf_counter() - started:.1f}s")
    return arrived


def _send_missing(
    source: ImageStore, target: ImageStore, ref: str, *, force: bool, progress: Progress
) -> bool:
    """:func:`transfer_image` unless ``target`` has ``ref`` already; one transfer at a time per
    machine (xdist workers ask at once), checked again under the lock. True when it was sent."""
    if not force and target.image_exists(ref):
        return False
    with _build_lock():
        if not force and target.image_exists(ref):  # sent by another process meanwhile
            return False
        transfer_image(source, target, ref, progress=progress)
        return True


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def check_image_provisioner(runtime: ImageStore, image: str, package: PackageSource | None = None) -> None:
    """Compare the provisioner recorded in ``image``'s labels with the host's installed one.

    Images without the labels (not made from provisioner's image) are not checked.

    Raises:
        ImageError: naming both versions and package hashes, and how to rebuild.
    """
    found = runtime.image(image)
    if found is None:
        raise ImageError(f"worker image {image!r} is not present; `provision images build` makes it")
    labels = found.labels
    theirs = labels.get(L.PACKAGE_HASH)
    if not theirs:
        return
    package = package or installed_package()
    ours = package.hash()[:16]
    if theirs != ours:
        raise ImageError(
            f"worker image {image!r} holds provisioner {labels.get(L.VERSION, '?')} (package hash "
            f"{theirs}) but this host runs provisioner {package.version} (package hash {ours}); "
            "rebuild it: `provision images build` (a custom image: rebuild it FROM the new worker image)"
        )


def _tag_project(runtime: ImageStore, tag: str, project: str | None) -> str | None:
    """Point ``provisioner-worker:<project>`` at ``tag``; the project's own tag, nobody else's."""
    if not project:
        return None
    wanted = project_tag(project)
    image = runtime.image(tag)
    if image is None:
        raise ImageError(f"cannot tag {tag} as {wanted}: the image is gone (removed meanwhile?)")
    if wanted not in image.tags:
        runtime.tag(tag, wanted)
    return wanted


def _base_ref(runtime: ImageStore, base: BaseChoice) -> str:
    try:
        return resolve_base(runtime, base, allow_build=False)[0]
    except ImageError:
        return "?"


def _build(
    runtime: ImageStore,
    recipe: Path,
    base_ref: str,
    tag: str,
    wheelhouse: Path,
    wheel: Path,
    package: PackageSource,
    say: Progress,
) -> None:
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name in RECIPE_FILES:
            tar.add(recipe / name, arcname=name)
        tar.add(package.root / "runtime" / "relay.py", arcname="relay.py")
        tar.add(package.root / "runtime" / "netguard.py", arcname="netguard.py")
        for whl in sorted(wheelhouse.glob("*.whl")):
            tar.add(whl, arcname=f"wheels/{whl.name}")
        tar.add(wheel, arcname=f"dist/{wheel.name}")
    context.seek(0)
    say(f"building {tag} on {base_ref} ...")
    labels = {
        L.MANAGED: "image",
        L.IMAGE_HASH: tag.split(":", 1)[1],
        L.PACKAGE_HASH: package.hash()[:16],
        L.VERSION: package.version,
    }

    def step(line: str) -> None:
        if line.startswith("Step "):
            say(line.strip())

    runtime.build(context, tag, build_args={"BASE": base_ref}, labels=labels, on_output=step)


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


def prune_worker_images(runtime: ImageStore | None = None, *, dry_run: bool = False) -> list[str]:
    """Remove content-tagged ``provisioner-worker`` images other than the current build.

    Kept: the current build, every image a project tag points at (``provisioner-worker:<project>``,
    this project's or another's) and every image a container (running or not) still uses.
    Returns the removed tags.
    """
    with _opened(runtime) as rt:
        current = worker_tag(rt)
        keep_ids = rt.images_in_use()
        removed = []
        for image in rt.list_images(WORKER_REPO):
            content = [t for t in image.tags if _CONTENT_TAG.match(t.rsplit(":", 1)[1]) and t != current]
            if len(content) != len(image.tags) or image.id in keep_ids:
                continue
            for tag in content:
                if dry_run or rt.remove_image(tag):
                    removed.append(tag)
        return removed


# --- requirements lock ----------------------------------------------------------------------------


def lock_requirements(roots: tuple[str, ...] = WORKER_ROOTS) -> list[str]:
    """``name==version`` for the dependency closure of ``roots`` as installed in this environment.

    Raises:
        ImageError: one of them is not installed (named).
    """
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
        dists = installed_distributions(name) or installed_distributions(name, fresh=True)
        if not dists:
            raise ImageError(f"worker requirement {name!r} is not installed in this environment")
        dist = dists[0]  # the first on sys.path, as importlib.metadata.distribution(name) takes
        seen[name] = dist.version
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({**env, "extra": extra}):
                stack.append((req.name, ""))
                stack.extend((req.name, wanted) for wanted in sorted(req.extras))
    return [f"{name}=={seen[name]}" for name in sorted(seen)]


def write_requirements(path: Path | None = None) -> Path:
    """Re-pin the recipe's ``requirements.txt`` (default: the installed package's) in place."""
    path = path or package_dir() / "assets" / "worker" / "requirements.txt"
    text = path.read_text() if path.is_file() else ""
    header = [line for line in text.splitlines() if line.startswith("#")]
    path.write_text("\n".join([*header, *lock_requirements()]) + "\n")
    return path
