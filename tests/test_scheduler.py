"""The shot/window/group scheduler as a pure state machine: no Ray, no models, no files."""

from __future__ import annotations

import pytest

from skyray.scheduler import Failure, GroupState, Scheduler

# a (3 windows) -> b continues a (2); c independent (1); d continues a too (a branch, 1)
SHOTS = [("a", 3, None), ("b", 2, "a"), ("c", 1, None), ("d", 1, "a")]


def run_all(s: Scheduler) -> list[tuple[str, int, int]]:
    """Drive the scheduler to the end, finishing shots as soon as their windows are done; the order it ran."""
    order = []
    while not s.finished:
        for t in s.closable():
            s.shot_done(t.id)
        for a in s.assign():
            order.append((a.shot, a.window, a.group))
            s.shot_opened(a.shot)
            s.window_done(a.shot, a.window)
        assert not s.blocked()
    return order


def test_windows_in_order_and_children_after_their_parent():
    order = run_all(Scheduler.build(SHOTS, groups=1))
    done = [(shot, w) for shot, w, _ in order]
    assert done.index(("a", 2)) < done.index(("b", 0)) and done.index(("a", 2)) < done.index(("d", 0))
    assert [w for shot, w in done if shot == "a"] == [0, 1, 2]
    assert len(done) == 7


def test_independent_chains_run_side_by_side():
    s = Scheduler.build(SHOTS, groups=2)
    first = s.assign()
    assert {(a.shot, a.group) for a in first} == {("a", 0), ("c", 1)}
    assert s.assign() == []  # a's next window waits for its current one; b and d wait for a
    s.window_done("c", 0)
    assert s.assign() == []  # a free group, but nothing is ready
    assert [t.id for t in s.closable()] == ["c"]


def test_reused_and_resumed_shots():
    s = Scheduler.build(SHOTS, groups=1)
    s.reuse("a")
    s.resume("b", 1)
    a = s.assign()
    assert [(x.shot, x.window) for x in a] == [("b", 1)]
    s.window_done("b", 1)
    order = run_all(s)
    assert ("a", 0) not in [(o[0], o[1]) for o in order]


def test_lost_group_retries_elsewhere_and_comes_back():
    s = Scheduler.build([("a", 2, None), ("c", 2, None)], groups=2)
    (a, c) = s.assign()
    assert s.window_failed(a.shot, a.window, Failure.GROUP_LOST)
    assert s.groups[a.group] is GroupState.LOST
    s.window_done(c.shot, c.window)
    # The failed window runs again, on the group still alive, flagged as a retry (continue from storage).
    again = s.assign()
    assert [(x.shot, x.window, x.group, x.retry) for x in again] == [("a", 0, c.group, True)]
    s.group_ready(a.group)
    assert [(x.shot, x.window, x.retry) for x in s.assign()] == [("c", 1, False)]


def test_input_lost_keeps_the_group():
    s = Scheduler.build([("a", 1, None)], groups=1)
    (a,) = s.assign()
    assert s.window_failed("a", 0, Failure.INPUT_LOST)
    assert s.groups[0] is GroupState.FREE and s.assign()[0].retry


def test_fatal_failure_stops_at_once_and_retries_are_bounded():
    s = Scheduler.build([("a", 1, None)], groups=1, max_retries=2)
    s.assign()
    assert not s.window_failed("a", 0, Failure.FATAL)
    s = Scheduler.build([("a", 1, None)], groups=1, max_retries=2)
    outcomes = []
    for _ in range(3):
        s.assign()
        outcomes.append(s.window_failed("a", 0, Failure.INPUT_LOST))
    assert outcomes == [True, True, False]


def test_every_group_lost_is_blocked_until_one_returns():
    s = Scheduler.build([("a", 2, None)], groups=1)
    s.assign()
    s.window_failed("a", 0, Failure.GROUP_LOST)
    assert s.blocked() and s.lost_groups() == [0]
    s.group_ready(0)
    assert not s.blocked() and s.assign()


def test_writer_loss_reopens_only_open_shots():
    s = Scheduler.build(SHOTS, groups=2)
    for a in s.assign():
        s.shot_opened(a.shot)
        s.window_done(a.shot, a.window)
    s.shot_done("c")
    assert [t.id for t in s.reopen(["a", "c"])] == ["a"]


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="unknown shot 'zz'"):
        Scheduler.build([("a", 1, "zz")], groups=1)
    s = Scheduler.build([("a", 1, None)], groups=1)
    with pytest.raises(ValueError, match="not running"):
        s.window_done("a", 0)
