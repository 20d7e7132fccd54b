"""Host side of the egress guard: cut a started container off from the host before it serves.

:func:`block_host_access` runs :func:`~provisioner.runtime.recipes.guard_recipe` for a guarded
container (a worker or the Gemini stand-in on an internal run network) right after it starts: the
guard joins the container's network namespace with CAP_NET_ADMIN only, removes its default route and
prohibits the gateway (:mod:`provisioner.runtime.netguard`), and exits. The container's command
waits behind ``netguard.py wait`` until then, so nothing listens before the guard holds.

Nothing is changed on the host (no iptables, no host root): the routes live in the container's own
namespace and vanish with it, so a SIGKILL of provisioner leaves nothing behind but the guard
container itself while it runs — labelled with the run, so the watchdog and ``provision reap``
remove it with the rest.
"""

from __future__ import annotations

import threading
import time

from provisioner.errors import RuntimeProblem
from provisioner.runtime.engine import ContainerRuntime, ExitWaiter
from provisioner.runtime.polling import poll_until
from provisioner.runtime.recipes import ContainerRecipe, guard_recipe

# How long one engine wait for the guard's exit may block before ``stop`` is looked at again (s).
WAIT_SLICE_S = 0.5


def block_host_access(
    runtime: ContainerRuntime,
    target: ContainerRecipe,
    container_id: str,
    *,
    network: str,
    timeout_s: float = 60.0,
    poll_s: float = 0.02,
    stop: threading.Event | None = None,
) -> None:
    """Run the egress guard for the started container ``container_id`` (made from ``target``).

    ``network``: the run network (its gateway is blocked even without a default route).
    ``timeout_s``: how long the guard may take (seconds). ``stop``: set it to give up early.

    Raises:
        RuntimeProblem: the guard failed (its exit code and log), did not finish within
            ``timeout_s``, or ``stop`` was set. The guard container is removed in every case.
    """
    gateway = runtime.container_gateway(container_id, network)
    guard = guard_recipe(target, f"container:{container_id}", gateways=(gateway,) if gateway else ())
    guard_id = runtime.create_container(guard)
    try:
        runtime.start_container(guard_id)
        state = None

        def finished() -> bool:
            nonlocal state
            state = runtime.container_state(guard_id)
            if state is None:
                raise RuntimeProblem(f"the egress guard of {target.name} disappeared before it finished")
            if not state.running and state.status != "created":
                return True
            if stop is not None and stop.is_set():
                raise RuntimeProblem("the run is being stopped")
            return False

        deadline = time.monotonic() + timeout_s
        if isinstance(runtime, ExitWaiter):
            # Told by the engine when it stops, in slices so that ``stop`` is seen; the state is then
            # read once. Polling it every 20 ms cost ≈ 35 inspects per guard (≈ 1.2 ms of CPU each,
            # this process and the engine) alongside the workers' start-up.
            while not runtime.wait_exit(guard_id, min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic()))):
                if stop is not None and stop.is_set():
                    raise RuntimeProblem("the run is being stopped")
                if time.monotonic() >= deadline:
                    break
        if not poll_until(finished, max(0.0, deadline - time.monotonic()), poll_s, stop=stop):
            raise RuntimeProblem(
                f"the egress guard of {target.name} did not finish within {timeout_s:.0f}s; its log:\n"
                f"{runtime.logs(guard_id)}"
            )
        assert state is not None
        if state.exit_code != 0:
            raise RuntimeProblem(
                f"the egress guard of {target.name} failed (exit code {state.exit_code}), so it stays "
                f"cut off and does not start; the guard's log:\n{runtime.logs(guard_id)}"
            )
    finally:
        runtime.remove_container(guard_id)
