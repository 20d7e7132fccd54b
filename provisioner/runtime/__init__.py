"""Containers: worker images, layer recipes, the runtime interface, the pool, cleanup.

Import the submodules directly (``provisioner.runtime.lifecycle``, ``.launch`` (the launch steps),
``.deployment``, ``.state``,
``.runs``, ``.run_command``, ``.doctor``, ``.pool``, ``.resources``, ``.recipes``, ``.engine``,
``.images``, ``.watchdog``, ``.compose``, ``.workers``). This package imports nothing heavy on its
own: the relay (:mod:`provisioner.runtime.relay`) runs inside worker images, which have no docker-py.
"""
