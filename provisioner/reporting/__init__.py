"""Views of the run history: one self-contained HTML page (:mod:`provisioner.reporting.html`) and a
Markdown summary (:mod:`provisioner.reporting.markdown`), both rendered from one
:class:`~provisioner.reporting.dashboard.Dashboard`. Imports only :mod:`provisioner.history`."""
