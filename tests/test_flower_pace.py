"""Flower's waits at a local link's pace: object retries (common/flower_pace.py) and the loopback SuperNode's
poll (simulations/loopback_supernode.py), on Flower's own modules."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from fedpa.common.flower_pace import LOCAL_RETRY_S, retry_objects_locally


def test_a_missing_object_is_asked_for_again_within_milliseconds(monkeypatch):
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)
    retry_objects_locally(http_grid, "pull_objects")
    retry_objects_locally(http_grid, "pull_objects")          # idempotent: one layer, not two
    assert http_grid.pull_objects.func is inflatable_utils.pull_objects
    assert http_grid.pull_objects.keywords == {"initial_backoff": LOCAL_RETRY_S[0], "backoff_cap": LOCAL_RETRY_S[1]}

    asked = []

    def arrives_after_three_asks(object_id: str) -> bytes:   # the sender is still uploading it
        asked.append(time.monotonic())
        if len(asked) < 4:
            raise ObjectUnavailableError(object_id)
        return b"content"

    t = time.monotonic()
    assert http_grid.pull_objects(["a"], arrives_after_three_asks) == {"a": b"content"}
    # Flower's own defaults would have waited 1 + 2 + 4 s
    assert time.monotonic() - t < 1.0 and len(asked) == 4


def test_a_flower_without_the_name_is_refused_loudly():
    with pytest.raises(RuntimeError, match="no pull_objects"):
        retry_objects_locally(SimpleNamespace(__name__="flwr.future"), "pull_objects")


def test_the_loopback_supernode_caps_flowers_idle_waits(monkeypatch):
    from flwr.supernode import start_client_internal as node_loop

    from fedpa.simulations import loopback_supernode

    monkeypatch.setattr(node_loop, "time", time)
    monkeypatch.setattr(node_loop, "pull_objects", inflatable_utils.pull_objects)
    loopback_supernode.install(0.05)
    t = time.monotonic()
    node_loop.time.sleep(3)                  # the SuperNode's idle poll, hard-coded in Flower 1.42
    assert time.monotonic() - t < 0.5
    assert abs(node_loop.time.time() - time.time()) < 1     # everything else is the real time module
    t = time.monotonic()
    for _ in range(10):
        node_loop.time.sleep(0.5)            # its 0.5 s checks of its own store for a ClientApp's reply
    assert time.monotonic() - t < 10 * loopback_supernode.LOCAL_WAIT_S + 0.3
    assert node_loop.pull_objects.keywords["initial_backoff"] == LOCAL_RETRY_S[0]
    loopback_supernode.install(0.2)          # installed again: the cap changes, nothing is wrapped twice
    assert node_loop.time.cap == 0.2 and isinstance(node_loop.time, loopback_supernode.CappedSleep)
    monkeypatch.setattr(node_loop, "time", SimpleNamespace(sleep=time.sleep))
    with pytest.raises(RuntimeError, match="no longer uses the time module"):
        loopback_supernode.install(0.05)     # a Flower whose loop waits some other way: refused, not ignored
    with pytest.raises(ValueError, match="positive"):
        loopback_supernode.CappedSleep(0)


class _Inbox:
    """The one call Flower's delivery loop makes on its link state: this node's next undelivered message."""

    def __init__(self):
        self.looks = 0

    def get_message_ins(self, node_id, limit):
        self.looks += 1
        return []


def _looks_in(seconds: float, nodes: int) -> int:
    """How often Flower's simulation runtime (as `vce_api` names it now) looks for messages in ``seconds``."""
    import queue
    import threading

    from flwr.server.superlink.fleet.vce import vce_api

    inbox, stop = _Inbox(), threading.Event()
    th = threading.Thread(target=vce_api.add_messages_to_queue, args=(inbox, queue.Queue(), {1: 0}, stop))
    th.start()
    time.sleep(seconds)
    stop.set()
    th.join(timeout=2)
    assert not th.is_alive()          # setting the stop event still ends Flower's loop
    return inbox.looks


def test_a_simulation_of_few_nodes_hands_over_messages_at_an_in_process_pace():
    from flwr.server.superlink.fleet.vce import vce_api

    from fedpa.common.flower_pace import FEW_NODES, IN_PROCESS_POLL_S, deliver_locally

    flower_loop = vce_api.add_messages_to_queue
    assert _looks_in(0.5, 2) <= 7                      # Flower's 0.1 s
    with deliver_locally(2):
        assert vce_api.add_messages_to_queue is not flower_loop
        assert _looks_in(0.5, 2) >= 0.5 * 0.5 / IN_PROCESS_POLL_S
    assert vce_api.add_messages_to_queue is flower_loop   # restored on leaving
    with deliver_locally(FEW_NODES + 1):               # stock simulation: one node per user keeps Flower's pace
        assert vce_api.add_messages_to_queue is flower_loop
    with pytest.raises(RuntimeError, match="simulation pace"):
        with deliver_locally(2):
            raise RuntimeError("the simulation failed: the simulation pace is restored all the same")
    assert vce_api.add_messages_to_queue is flower_loop


def test_the_server_polls_an_in_process_grid_fast_and_a_superlink_at_its_own_pace():
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedpa.common.flower_pace import FEW_NODES, IN_PROCESS_POLL_S, reply_poll_s

    deployment = (0.02, 0.1)
    in_process = InMemoryGrid.__new__(InMemoryGrid)
    assert reply_poll_s(in_process, 2, deployment) == (IN_PROCESS_POLL_S, IN_PROCESS_POLL_S)
    assert reply_poll_s(in_process, FEW_NODES + 1, deployment) == deployment
    assert reply_poll_s(HttpGrid.__new__(HttpGrid), 2, deployment)   # a SuperLink's == deployment


def test_a_run_keeps_the_heap_frozen_and_leaves_it_unfrozen():
    import gc

    from fedpa.common.heap import long_lived_frozen

    gc.unfreeze()
    with long_lived_frozen():
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0
