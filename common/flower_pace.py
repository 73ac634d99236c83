"""Flower 1.42's waits for a message object that has not arrived yet, at the pace of a local link.

Flower sends a message's records as separately stored objects, and a receiver can see the message before its
sender has finished uploading them; it then retries each missing object after 1 s, 2 s, 4 s … up to 10 s
(`flwr.supercore.inflatable.inflatable_utils.pull_objects`, defaults no flag or variable changes). Across a wide
network that spares the server; on a link within one machine it is most of a message's time: on a loopback
deployment (benchmarks/bench_device.py --deploy) nearly every exchange waited a whole second for objects that
arrived milliseconds later. fedpa shortens it only where the link is local by construction:

- the ServerApp pulling replies from its SuperLink (`server/app.py`: Flower starts the ServerApp beside its
  SuperLink, on the SuperLink's own machine);
- a ClientApp task pulling its message from its SuperNode (`client/warm_executor.py`: the Runtime API is on the
  device);
- a SuperNode pulling from the SuperLink when both run on one machine (`simulations/loopback_supernode.py`).

Flower's simulation runtime has a second fixed pace: it hands the server's messages to the nodes' workers every
0.1 s (`vce_api.add_messages_to_queue`), and the server's own reply poll backs off to 0.1 s too. A cohort engine's
node trains 500 RecFlow-sized users in 0.3 s, so these two waits were a quarter of its round (`deliver_locally`,
`reply_poll_s`). With many nodes (stock simulation: one per user) Flower's pace stays: each of its polls walks
every node's queue.

Each site rebinds the name its Flower module imported (the function object stays Flower's own, with two of its
keyword defaults changed); a Flower version that no longer has that name is refused loudly, not silently slow.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from types import ModuleType

LOCAL_RETRY_S = (0.02, 0.5)
"""First and longest wait (s) before asking again for an object that is not there yet, on a local link."""

FEW_NODES = 16
"""Up to this many nodes a simulation's in-process links are polled every `IN_PROCESS_POLL_S` (the cohort engine's
default is one node per core); beyond it Flower's pace stays."""

IN_PROCESS_POLL_S = 0.01
"""How often a simulation of few nodes looks for messages to hand to its workers, and for their replies (s): each
look is a few dictionary lookups under a lock, in the process itself."""


def retry_objects_locally(module: ModuleType, name: str, first_s: float = LOCAL_RETRY_S[0],
                          longest_s: float = LOCAL_RETRY_S[1]) -> None:
    """Make ``module.name`` (Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree``, as ``module``
    imported it) retry a missing object after ``first_s``, doubling up to ``longest_s``. Idempotent."""
    fn = getattr(module, name, None)
    if fn is None:
        raise RuntimeError(f"{module.__name__} has no {name}: this Flower version is not the one fedpa's object "
                           f"retries were written for (flwr 1.42)")
    if isinstance(fn, partial) and fn.keywords.get("initial_backoff") == first_s:
        return
    setattr(module, name, partial(fn, initial_backoff=first_s, backoff_cap=longest_s))


class _ShorterWaits:
    """A `threading.Event` whose waits last at most ``longest`` seconds (a poll loop's pace; setting the event still
    ends the loop)."""

    def __init__(self, event, longest: float):
        self._event, self._longest = event, longest

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(self._longest if timeout is None else min(timeout, self._longest))


@contextmanager
def deliver_locally(num_nodes: int, every_s: float = IN_PROCESS_POLL_S) -> Iterator[None]:
    """While it is open, a simulation of at most `FEW_NODES` nodes started in this process hands the server's
    messages to its nodes' workers every ``every_s`` instead of Flower's 0.1 s. Flower's own loop runs unchanged,
    with its stop event's waits shortened; the module's name is restored on leaving."""
    from flwr.server.superlink.fleet.vce import vce_api

    flower_loop = getattr(vce_api, "add_messages_to_queue", None)
    if flower_loop is None:
        raise RuntimeError("flwr.server.superlink.fleet.vce.vce_api has no add_messages_to_queue: this Flower "
                           "version is not the one fedpa's simulation pace was written for (flwr 1.42)")
    if num_nodes > FEW_NODES:
        yield
        return

    def paced(state, queue, nodes_mapping, f_stop):
        return flower_loop(state, queue, nodes_mapping, _ShorterWaits(f_stop, every_s))

    vce_api.add_messages_to_queue = paced
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = flower_loop


def reply_poll_s(grid, pending: int, deployment_s: tuple[float, float]) -> tuple[float, float]:
    """(first, longest) wait of the server's reply poll: `IN_PROCESS_POLL_S` throughout for few replies on a
    simulation's in-process grid, else ``deployment_s`` (each pull a request to the SuperLink)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if isinstance(grid, InMemoryGrid) and pending <= FEW_NODES:
        return IN_PROCESS_POLL_S, IN_PROCESS_POLL_S
    return deployment_s
