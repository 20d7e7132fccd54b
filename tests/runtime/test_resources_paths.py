"""ResourceManager paths ordinary runs do not take (issue 14, coverage of resource cleanup):
volumes and ports by their default cleanup, closing without a watch, a long-lived event watch
whose memory of applied events stays bounded."""

from __future__ import annotations

from provisioner.runtime import labels as L
from provisioner.runtime.engine import FakeRuntime
from provisioner.runtime.recipes import NetworkRecipe
from provisioner.runtime.resources import ResourceManager


def test_a_volume_goes_through_the_runtime_and_a_port_without_a_callback_is_just_forgotten() -> None:
    rt = FakeRuntime()
    rt.add_volume("v1", L.selector("r"))
    rm = ResourceManager(rt, selector=L.selector("r"))
    rm.track("volume", "v1")
    rm.track("port", 45678)  # whoever holds the socket closes it: nothing to do here
    report = rm.cleanup_all()
    assert report.ok and [r.kind for r in report.removed] == ["port", "volume"]
    assert rt.volumes == {} and rm.tracked() == []


def test_closing_without_a_watch_is_a_no_op_and_closing_twice_too() -> None:
    rm = ResourceManager(FakeRuntime())
    rm.close()
    rm.snapshot(sync=False)  # starts the event watch
    rm.close()
    rm.close()


def test_a_snapshot_after_the_watch_lagged_more_events_than_it_remembers_uses_the_watch() -> None:
    """The README's command failed once under load: the watch thread was more than 4,096 events
    behind when a snapshot asked, the snapshot waited for every pending key to be in the (bounded)
    memory of applied events — the oldest were already forgotten — and listed after its timeout.
    Here the lag is made: the watch cannot apply an event while the test holds its lock."""
    rt = FakeRuntime()
    selector = L.selector("lag")
    rm = ResourceManager(rt, selector=selector, sync_timeout_s=2.0)
    try:
        before = rm.snapshot()
        watch = rm._watch
        assert watch is not None
        with watch._changed:  # the watch thread waits here with the first of these events
            for i in range(4200 // 2):
                ident = rt.create_network(NetworkRecipe(f"prov-n{i}", internal=True, labels=selector))
                rt.remove_network(ident)
            rt.create_network(NetworkRecipe("prov-last", internal=True, labels=selector))
            # Asked while the watch is 4,201 events behind (the wait releases the lock to it).
            after = rm.snapshot()
        assert after - before == {("network", "prov-last")}
        assert watch.fallbacks == 0  # waited for the stream, did not list
    finally:
        rm.close()


def test_a_long_lived_watch_remembers_a_bounded_number_of_events() -> None:
    events = 4200
    rt = FakeRuntime()
    selector = L.selector("long")
    rm = ResourceManager(rt, selector=selector)
    try:
        before = rm.snapshot()
        for i in range(events // 2):
            ident = rt.create_network(NetworkRecipe(f"prov-n{i}", internal=True, labels=selector))
            rt.remove_network(ident)
        rt.create_network(NetworkRecipe("prov-last", internal=True, labels=selector))
        after = rm.snapshot()
        assert after - before == {("network", "prov-last")}
        watch = rm._watch
        assert watch is not None and len(watch._applied) <= 4096 and watch.fallbacks == 0
    finally:
        rm.close()
