"""The plain classes behind the pytest plugin (pytest-xdist style: the plugin module is thin hooks).

Modules: ``options`` (run options, layer/LM resolution), ``selection`` (layer markers and
deselection), ``run`` (run identity shared by xdist workers), ``isolated`` (``IsolatedTest``),
``containers`` (a process's containers: dedicated workers, the pool, leak snapshots),
``docker_check`` (fail-under-CI engine check), ``report`` (the run report), ``plugin_state``
(``ProvisionRun``, what the hooks drive). Submodules are imported where used, so loading the plugin
stays cheap and touches no Docker.
"""
