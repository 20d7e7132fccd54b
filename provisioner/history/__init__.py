"""Run history: every pytest run that uses provisioner, kept in ``<state_dir>/history.sqlite``.

:mod:`provisioner.history.store` is the database (stdlib :mod:`sqlite3`, WAL, a versioned schema with
migrations); :mod:`provisioner.history.rows` turns pytest's test reports into per-test rows (plain
Python: the pytest plugin feeds it duck-typed reports). The pytest plugin and the CLI import this
package; it imports nothing above :mod:`provisioner.lm` and the settings.
"""

from provisioner.history.store import HISTORY_FILE, SCHEMA_VERSION, History, RunRow, TestRow

__all__ = ["HISTORY_FILE", "SCHEMA_VERSION", "History", "RunRow", "TestRow"]
