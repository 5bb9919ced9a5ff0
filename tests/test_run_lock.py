"""The run's lock (localtune.runs.RunLock) on its own: one holder at a time, even when the holder
lets go (and deletes the file) while another process is between opening the file and locking
it. The lock as workers and launchers use it is tested in test_worker.py."""

from __future__ import annotations

import fcntl

import pytest

from localtune.errors import UserError
from localtune.runs import RunLock, create_run


def make_run():
    return create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "r1")


def test_a_held_lock_is_refused_and_a_released_one_is_gone():
    run = make_run()
    first = run.take_lock()
    assert run.lock_held()
    with pytest.raises(UserError) as refused:
        run.take_lock()
    assert str(refused.value) == f"run r1 is locked by another process ({run.lock_path}); try again in a moment"
    first.release()
    assert not run.lock_path.exists() and not run.lock_held()
    run.take_lock().release()


def test_a_lock_let_go_while_another_opens_it_still_has_one_holder(monkeypatch):
    run = make_run()
    a = run.take_lock()
    real_flock = fcntl.flock
    c: list[RunLock] = []
    interleaved = []

    def flock(fd, operation):
        # B has opened worker.lock (A's file) and is about to lock it. Now A lets go, deleting
        # the file, and C takes the run: a new file under the same name. B's flock then
        # succeeds on A's old file, which no longer has the name.
        if not interleaved:
            interleaved.append(True)
            a.release()
            c.append(RunLock.take(run))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(UserError, match="is locked by another process"):
        RunLock.take(run)  # B: C holds the run
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert run.lock_held()
    c[0].release()
    assert not run.lock_held()
