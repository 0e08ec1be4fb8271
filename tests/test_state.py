"""A sandbox's lifecycle: the transitions the table allows and refuses, and a real sandbox going
through them."""

from __future__ import annotations

import threading

import pytest

from corral import Policy, Sandbox, SandboxClosedError, State
from corral.runtime.lifecycle import ALLOWED, Lifecycle
from helpers import wait_until

_PATHS = {
    "started and closed": [State.RUNNING, State.STOPPING, State.STOPPED, State.REAPED],
    "frozen, then closed": [State.RUNNING, State.FROZEN, State.STOPPING, State.STOPPED, State.REAPED],
    "failed to start": [State.STOPPED, State.REAPED],
    "refused by its host at the end of its start": [State.STOPPING, State.STOPPED, State.REAPED],
}


def _at(path: list[State]) -> Lifecycle:
    life = Lifecycle()
    for state in path:
        assert life.move(state), f"{life.state} -> {state}"
    return life


@pytest.mark.parametrize("path", list(_PATHS.values()), ids=list(_PATHS))
def test_each_way_through_a_sandboxs_life_is_allowed(path: list[State]) -> None:
    assert _at(path).state is path[-1]


def test_every_transition_the_table_does_not_list_is_refused() -> None:
    reach = {State.STARTING: []} | {s: p[: p.index(s) + 1] for p in _PATHS.values() for s in p}
    for start, path in reach.items():
        for to in State:
            life = _at(path)
            assert life.move(to) is (to in ALLOWED[start]), f"{start} -> {to}"
            if to not in ALLOWED[start]:
                assert life.state is start  # refused moves change nothing


def test_nothing_comes_back_from_reaped_or_goes_back_to_running() -> None:
    assert ALLOWED[State.REAPED] == frozenset()
    assert all(State.RUNNING not in ALLOWED[s] for s in State if s is not State.STARTING)
    assert all(State.STARTING not in to for to in ALLOWED.values())


def test_only_the_first_of_racing_stops_wins_and_its_reason_stays() -> None:
    life = _at([State.RUNNING])
    assert life.stop("tripwire")
    assert not life.stop("closed") and not life.stop("lifetime")
    assert life.stop_reason == "tripwire"
    assert not life.freeze("late rule") and life.frozen_by is None


def test_a_frozen_sandbox_remembers_the_rule_while_it_stops() -> None:
    life = _at([State.RUNNING])
    assert life.freeze("privilege tool")
    assert not life.freeze("another rule")
    assert life.stop("closed")
    assert (life.frozen_by, life.stop_reason) == ("privilege tool", "closed")


def test_waiting_for_a_state_returns_once_it_or_a_later_one_is_reached() -> None:
    life = _at([State.RUNNING])
    assert not life.wait_for(State.STOPPED, timeout=0.01)
    threading.Timer(
        0.05, lambda: (life.stop("closed"), life.move(State.STOPPED), life.move(State.REAPED))
    ).start()
    assert life.wait_for(State.STOPPED, timeout=5)
    assert life.wait_for(State.STOPPING, timeout=0)  # already past it


@pytest.mark.root
def test_a_real_sandbox_goes_through_its_states() -> None:
    sb = Sandbox(Policy.from_dict({"version": 1}), keep_workspace=False)
    try:
        assert sb.state is State.RUNNING and not sb.closed
        assert sb.exec("true").ok
        assert sb.state is State.RUNNING
    finally:
        sb.close()
    assert sb.state in (State.STOPPED, State.REAPED) and sb.closed
    assert sb.wait_closed(timeout=30)
    assert sb.state is State.REAPED and sb.pids() == []
    with pytest.raises(SandboxClosedError, match="is closed"):
        sb.exec("true")


@pytest.mark.root
def test_a_real_sandbox_frozen_by_a_tripwire_refuses_commands_until_closed() -> None:
    policy = {"version": 1, "tripwires": {"responses": {"privilege tool": "freeze"}}}
    with Sandbox(Policy.from_dict(policy), keep_workspace=False) as sb:
        r = sb.exec("unshare -n true")
        assert r.terminated == "frozen"
        assert wait_until(lambda: sb.state is State.FROZEN)
        assert sb.frozen is not None
        with pytest.raises(SandboxClosedError, match="was frozen by tripwire"):
            sb.exec("true")
    assert sb.wait_closed(timeout=30) and sb.state is State.REAPED
