"""The pytest plumbing behind the plugin (pytest-xdist style: the plugin module is thin hooks).

Modules: ``selection`` (layer markers and deselection), ``docker_check`` (fail-under-CI engine
check), ``report`` (the run report), ``network`` (the unit/integration spending guard),
``completeness`` (why a run is partial), ``progress`` (start-up phases), ``plugin_state``
(``ProvisionRun``, what the hooks drive). The pytest-free pieces the plugin shares with
:func:`provisioner.environment` live below it: :mod:`provisioner.run`, :mod:`provisioner.isolated`,
:mod:`provisioner.runtime.workers`. This package and the edges (``cli``, ``pytest_plugin``) are the
only importers of :mod:`provisioner.api`. Submodules are imported where used, so loading the plugin
stays cheap and touches no Docker.
"""
