"""No accidental spending: tests of layers without real LM calls cannot reach the network or an LM
provisioner did not build.

In a layer whose LM mode is ``mock`` or ``cached`` (``unit``, ``integration``, and custom layers like
them), each test runs with two blocks, in the spirit of pytest-recording's ``--block-network``:

* **network** — connections leaving this machine are refused with
  :class:`~provisioner.errors.SpendingBlockedError`. Built on pytest-socket's
  :func:`pytest_socket.socket_allow_hosts`: loopback (``127.0.0.0/8``, ``::1``, ``localhost`` — the
  bridge relay ports, the in-process Gemini stand-in) and unix sockets (the Docker API) keep working,
  and so do provisioner's own Gemini requests (a cached layer recording a cassette; they are rate- and
  cost-limited) and the hosts of a remote engine (:func:`engine_hosts`: its API and the address its
  workers are published on — the bridge fixtures connect there).
* **foreign LMs** — a ``dspy.LM`` on one of DSPy's provider engines (``dspy.LM("openai/…")`` built by
  the code under test, e.g. at import time) is refused when called, before DSPy or LiteLLM resolve a
  host or retry. LMs with their own engine object (provisioner's, ``DummyLM``, yours) are not touched.

Which tests: those of a project that uses provisioner (a ``[tool.provisioner]`` table or
``provision.toml``, or a layer chosen with ``--layer``/``TEST_MODE``/``PROVISION_LAYER``), and any
test marked for a layer or ``lm_rules``, or asking for a provisioner fixture. Opt in to the network
with pytest-socket's standard switches: ``@pytest.mark.enable_socket`` or the ``socket_enabled``
fixture for one test, ``--force-enable-socket`` for the run, ``@pytest.mark.allow_hosts(["host", …])``
for named hosts — or run a layer with real LM calls (``--layer e2e``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from provisioner.errors import SpendingBlockedError

LOOPBACK: tuple[str, ...] = ("127.0.0.0/8", "::1", "localhost")
BLOCKING_LM_MODES: tuple[str, ...] = ("mock", "cached")
PROVISIONER_FIXTURES: frozenset[str] = frozenset({
    "lm", "lm_cost", "lm_rules", "isolated", "bridge", "bridge_worker", "bridge_pool", "resource_manager",
    "provision_settings", "layer",
})
OPT_IN = ("opt in with @pytest.mark.enable_socket (this test), --force-enable-socket (the run), "
          "@pytest.mark.allow_hosts([...]) (named hosts), or run a layer with real LM calls (--layer e2e)")


def blocks(lm_mode: str) -> bool:
    """Does a layer with this LM mode block the network and foreign LMs?"""
    return lm_mode in BLOCKING_LM_MODES


def project_uses_provisioner(run: Any) -> bool:
    """Did the project opt in to provisioner: a layer chosen on the command line or in the environment,
    or a ``[tool.provisioner]`` table / ``provision.toml`` (``run`` is a ``ProvisionRun``)."""
    from provisioner.settings import DEFAULT_SOURCE, find_project_file

    if run.options.layer is not None or run.environment.settings.source_of("layer") != DEFAULT_SOURCE:
        return True
    return find_project_file(run.project_dir) is not None


def applies(run: Any, markers: Iterable[str], fixturenames: Iterable[str], *, force_enabled: bool) -> bool:
    """Does this test run with :func:`block_network`? (See the module docstring.)"""
    marks = set(markers)
    if force_enabled or "enable_socket" in marks or "socket_enabled" in set(fixturenames):
        return False
    if not blocks(run.environment.lm_config.mode):
        return False
    # run.project_opted_in: project_uses_provisioner(run), looked up once per run (it reads files).
    return (run.project_opted_in or run.is_layer_test(marks) or "lm_rules" in marks
            or bool(PROVISIONER_FIXTURES & set(fixturenames)))


def prepare() -> None:
    """Import what :func:`block_network` wraps (DSPy's LM call path; seconds on a cold start) now,
    so the first blocked test's setup is not charged for it."""
    import dspy.clients.execution  # noqa: F401
    import pytest_socket  # noqa: F401


def engine_hosts(settings: Any) -> tuple[str, ...]:
    """The remote engine's hosts (``DOCKER_HOST``/docker context and the publish address) that the
    tests of a blocked layer still reach: their workers are published there. Empty for a local
    engine or one whose address does not resolve (the run then fails elsewhere, saying why)."""
    from provisioner.errors import ConfigError
    from provisioner.runtime.engine import publish_host_for, remote_hosts
    from provisioner.runtime.engine.docker import engine_url

    url, _source = engine_url()
    try:
        return remote_hosts(url, publish_host_for(url, settings.publish_host))
    except ConfigError:
        return ()


def _network_message(layer: str, lm_mode: str, host: str | None) -> str:
    return (f"provisioner: the {layer} layer (LM mode {lm_mode}) blocks network connections leaving this "
            f"machine; this test tried to connect to {host or 'a remote address'}. Only loopback, unix "
            f"sockets and provisioner's own LM may be used here; {OPT_IN}.")


def _lm_message(layer: str, lm_mode: str, model: str) -> str:
    return (f"provisioner: the {layer} layer (LM mode {lm_mode}) blocks calls to LMs provisioner did not "
            f"build: dspy.LM({model!r}) would call its provider over the network and may spend money. "
            "Use the layer's LM (the lm fixture makes it active for the test and its threads; "
            f"provisioner.lm.build_lm builds one), or {OPT_IN}.")


def is_foreign_lm(lm: Any) -> bool:
    """A ``dspy.LM`` on one of DSPy's own provider engines (``"auto"``, ``"lm15"``, ``"litellm"``)."""
    import dspy

    return isinstance(lm, dspy.LM) and isinstance(getattr(lm, "engine", None), str)


def _guarded_connect(hosts: tuple[str, ...], resolution_cache: dict[str, set[str]] | None,
                     guards: dict[tuple[str, ...], Callable[..., Any]] | None) -> Callable[..., Any]:
    """pytest-socket's connect guard for ``hosts`` (:func:`pytest_socket.socket_allow_hosts` builds
    it: parses the networks, resolves the names), made once per allow-list when ``guards`` is given
    (the plugin keeps one per run: the guard runs around every test, and making it was most of its
    cost). pytest-socket installs the guard itself; it is taken off again here and handed back."""
    from pytest_socket import socket_allow_hosts

    guarded = guards.get(hosts) if guards is not None else None
    if guarded is None:
        installed = socket.socket.connect
        try:
            socket_allow_hosts(list(hosts), allow_unix_socket=True, resolution_cache=resolution_cache)
            guarded = socket.socket.connect
        finally:
            socket.socket.connect = installed  # type: ignore[method-assign]
        if guards is not None:
            guards[hosts] = guarded
    return guarded


@contextlib.contextmanager
def block_network(layer: str, lm_mode: str, *, allow_hosts: Iterable[str] = (),
                  resolution_cache: dict[str, set[str]] | None = None,
                  guards: dict[tuple[str, ...], Callable[..., Any]] | None = None) -> Iterator[None]:
    """Refuse connections leaving this machine, and calls of foreign LMs, inside the block.

    ``resolution_cache`` (host name → addresses) and ``guards`` (allow-list → connect guard): the
    caller's caches, kept across blocks (the pytest plugin keeps them for the run), so a block costs
    two attribute swaps, not a name resolution and a guard build.

    Raises (inside the block):
        SpendingBlockedError: a connection to a host outside ``LOOPBACK + allow_hosts`` (not made by
            provisioner's Gemini engine), or a call of a foreign ``dspy.LM``.
    """
    from pytest_socket import SocketConnectBlockedError

    from provisioner.lm.gemini import in_managed_request

    before: Callable[..., Any] = socket.socket.connect
    guarded = _guarded_connect((*LOOPBACK, *allow_hosts), resolution_cache, guards)

    def connect(sock: socket.socket, *args: Any) -> Any:
        if in_managed_request():
            return before(sock, *args)
        try:
            return guarded(sock, *args)
        except SocketConnectBlockedError as exc:
            host = getattr(exc, "_host", None)
            raise SpendingBlockedError(_network_message(layer, lm_mode, host), layer=layer,
                                       target=host) from None

    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    restore_lms = _block_foreign_lms(layer, lm_mode)
    try:
        yield
    finally:
        restore_lms()
        socket.socket.connect = before  # type: ignore[method-assign]


def _block_foreign_lms(layer: str, lm_mode: str) -> Callable[[], None]:
    """Wrap DSPy's one execution path of LM calls (sync and async: ``dspy.clients.execution``)."""
    from dspy.clients import execution

    original, original_async = execution.execute, execution.aexecute

    def check(lm: Any) -> None:
        if is_foreign_lm(lm):
            model = str(getattr(lm, "model", "?"))
            raise SpendingBlockedError(_lm_message(layer, lm_mode, model), layer=layer, target=model)

    def execute(lm: Any, call: Any) -> Any:
        check(lm)
        return original(lm, call)

    async def aexecute(lm: Any, call: Any) -> Any:
        check(lm)
        return await original_async(lm, call)

    execution.execute, execution.aexecute = execute, aexecute

    def restore() -> None:
        execution.execute, execution.aexecute = original, original_async

    return restore


__all__ = [
    "BLOCKING_LM_MODES",
    "LOOPBACK",
    "PROVISIONER_FIXTURES",
    "applies",
    "block_network",
    "blocks",
    "is_foreign_lm",
    "prepare",
    "project_uses_provisioner",
]
