"""The deploying process sees another process's demand on its next session, not at its monitor's
next tick (2 s): a short ``pytest -n 2`` run grows to 2 workers. The look is one ``stat``."""

from __future__ import annotations

from pathlib import Path

from provisioner.runtime import shared_pool as sp
from provisioner.runtime.engine import FakeRuntime
from provisioner.settings import Settings

from .conftest import FakeWorkers
from .test_shared_pool import RUN, _deployer, _make_pool


def test_the_deployer_grows_for_another_process_s_demand_on_its_next_session(
    settings: Settings, fake: tuple[FakeRuntime, FakeWorkers], tmp_path: Path
) -> None:
    rt, _ = fake
    run_dir = tmp_path / "run"
    owner = sp.obtain_pool(run_dir, RUN, runtime=rt, deploy=_deployer(settings, fake, "gw0", [], 1),
                           make_pool=_make_pool, ready_timeout_s=5, process="gw0")
    other = sp.obtain_pool(run_dir, RUN, runtime=rt, deploy=_deployer(settings, fake, "gw1", [], 1),
                           make_pool=_make_pool, ready_timeout_s=5, process="gw1")
    try:
        assert owner.pool._monitor is None  # no monitor here: only the session open can notice
        owner.pool.close_session(owner.pool.open_session("a").session_id)  # own peak: 1
        assert owner.pool.wait_replacements(10) and owner.pool.stats()["added"] == 0
        other.pool.open_session("b")  # the other process's first session: its demand file says 1
        owner.pool.close_session(owner.pool.open_session("c").session_id)  # 1 + 1 > 1 worker: grow
        assert owner.pool.wait_replacements(10)
        assert owner.pool.stats()["added"] == 1 and len(owner.pool.stats()["workers"]) == 2
        assert other.pool.open_session("d").slot == 1  # and the other process finds it
    finally:
        other.pool.close()
        owner.pool.close()
        sp.remove_shared_pool(run_dir, RUN, rt)
    assert rt.containers == {}


def test_the_demand_watch_says_changed_only_after_a_write(tmp_path: Path) -> None:
    watch = sp.DemandWatch(tmp_path)
    assert not watch.changed()  # no folder yet: nothing recorded
    sp.write_demand(tmp_path, "gw1", 1)
    assert watch.changed() and not watch.changed()
    sp.write_demand(tmp_path, "gw2", 1)  # another rename into the folder
    assert watch.changed() and not watch.changed()
