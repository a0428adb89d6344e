"""Once ready, the agent collects garbage between events, not inside them (issue 13)."""

from __future__ import annotations

import gc
import weakref

import pytest

from policy_agent import agent as agent_mod
from policy_agent.agent import Agent


class _Node:
    pass


@pytest.fixture
def restore_gc():
    was = gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable() if was else gc.disable()


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.b, b.a = b, a
    return weakref.ref(a)


def test_frozen_heap_turns_automatic_collection_off_and_idle_gc_collects(restore_gc):
    Agent._freeze_heap()
    assert not gc.isenabled()
    ref = _cycle()
    keep = [_Node() for _ in range(gc.get_threshold()[0] * 2)]  # would trigger an automatic collection
    assert ref() is not None and keep  # nobody collected it inside "the event"
    assert Agent.idle_gc(False) == 0.0 and ref() is not None  # busy, far below the force limit
    Agent.idle_gc(True)
    assert ref() is None


def test_a_busy_loop_still_collects_past_the_force_limit(restore_gc, monkeypatch):
    Agent._freeze_heap()
    monkeypatch.setattr(agent_mod, "IDLE_GC_FORCE", 50)
    ref = _cycle()
    keep = [_Node() for _ in range(200)]  # tracked allocations: the generation-0 count grows
    Agent.idle_gc(False)
    assert ref() is None and keep
