"""The labels every resource provisioner creates carries, and how to build and read them.

Labels are how cleanup finds things without any state file: the watchdog, ``provision reap`` and
``provision down`` all select by ``provisioner.run=<id>``. Labels are visible to anyone who can talk
to the engine, so they never hold secrets — only ids, names, the owner's host and pid, and times.

``provisioner.project`` (:func:`project_id`) scopes ``reap``, ``status`` and ``up``'s "already up"
check to one project; runs made before it existed carry no such label and count as any project's
(so ``reap`` still finds them). Cleanup selects by ``provisioner.managed`` and ``provisioner.run``,
keys that never change, so runs of older versions stay selectable. ``provisioner.instance`` (which
process of the run made the resource) was called ``provisioner.session`` before; only a live
process selects by it (its own resources), so a renamed key strands nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Mapping
from pathlib import Path

MANAGED = "provisioner.managed"
RUN = "provisioner.run"
LAYER = "provisioner.layer"
# Which process of the run made the resource (``main-77``, ``gw0-1234``, a dedicated worker's
# ``gw0-1234-d3``; the run id for a run with one deployment, e.g. ``provision up``).
INSTANCE = "provisioner.instance"
LEGACY_INSTANCE = "provisioner.session"  # its name before 2026-11 (it never held a bridge session)
ROLE = "provisioner.role"
SLOT = "provisioner.slot"
OWNER_HOST = "provisioner.owner.host"
OWNER_PID = "provisioner.owner.pid"
CREATED = "provisioner.created"
IMAGE_HASH = "provisioner.image.hash"
# On worker images: the installed provisioner they hold (checked against the host's before use).
PACKAGE_HASH = "provisioner.package.hash"
VERSION = "provisioner.version"
# The project a run belongs to (project_id of its root folder).
PROJECT = "provisioner.project"
# "true" for environments meant to outlive the command that started them (`provision up`).
PERSISTENT = "provisioner.persistent"

ROLE_WORKER = "worker"
ROLE_RELAY = "relay"
ROLE_STANDIN = "standin"
ROLE_GUARD = "guard"  # the one-shot egress guard of a worker or the stand-in (runtime/netguard.py)
ROLE_NETWORK = "network"


def run_labels(
    run_id: str,
    layer: str,
    instance: str,
    *,
    owner_pid: int | None = None,
    owner_host: str | None = None,
    created: float | None = None,
    persistent: bool = False,
    project: str | None = None,
) -> dict[str, str]:
    """The labels shared by every resource of one run (``project``: see :func:`project_id`)."""
    out = {
        PERSISTENT: "true" if persistent else "false",
        MANAGED: "true",
        RUN: run_id,
        LAYER: layer,
        INSTANCE: instance,
        OWNER_HOST: owner_host or socket.gethostname(),
        OWNER_PID: str(owner_pid if owner_pid is not None else os.getpid()),
        CREATED: str(int(created if created is not None else time.time())),
    }
    if project:
        out[PROJECT] = project
    return out


def project_id(root: Path) -> str:
    """A short, stable id of a project: ``<folder name>-<8 hex of sha256(resolved root path)>``.

    Two checkouts of one repository are two projects (their paths differ); the id is a valid Docker
    tag (lower case, ``[a-z0-9-]``, at most 49 characters).
    """
    resolved = root.resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", resolved.name.lower()).strip("-")[:40] or "project"
    return f"{slug}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def selector(run_id: str | None = None, instance: str | None = None) -> dict[str, str]:
    """Label filter for every managed resource, those of one run, or of one instance of a run."""
    out = {MANAGED: "true"}
    if run_id is not None:
        out[RUN] = run_id
    if instance is not None:
        if run_id is None:
            raise ValueError("an instance is only unique within its run: pass run_id too")
        out[INSTANCE] = instance
    return out


def matches(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in wanted.items())
