"""Flower's own ``flower-supernode`` with its idle waits shortened, for deployments on one machine (`fedpa deploy`,
its test and `benchmarks/bench_device.py --deploy`).

Flower 1.42's SuperNode sleeps 3 s after every pull that brought no message, waits for its ClientApp's reply (and
then for the reply's objects) in 0.5 s steps, and retries a message object the SuperLink does not have yet after
1 s, then 2, 4 … (`flwr.supernode.start_client_internal`: hard-coded, no flag or variable sets them). Across a
real network that is a sensible load on the SuperLink; on loopback it is most of a round, because a SecAgg+ round
is several message exchanges and the node that answered last is asleep when the next one is sent. This entry
point runs the unchanged SuperNode with the idle wait capped at ``FEDPA_SUPERNODE_POLL_S`` seconds (default 0.1)
and the waits on its own store at `LOCAL_WAIT_S`: the module's ``time`` is replaced by a view of the real one
whose ``sleep`` is capped, and its object pulls retry at a local link's pace (`common/flower_pace.py`). Nothing
else differs; a device on a real network is started with plain ``flower-supernode``.

    python -m fedpa.simulations.loopback_supernode <flower-supernode arguments>
"""

from __future__ import annotations

import os
import time as _time

from fedpa.common.flower_pace import retry_objects_locally

POLL_ENV = "FEDPA_SUPERNODE_POLL_S"


LOCAL_WAIT_S = 0.01
"""The cap on the SuperNode's waits for its own state (Flower's 0.5 s steps until a ClientApp's reply, then its
objects, are in the node's store): a check costs a dictionary lookup in the node's process, and each of the two
waits otherwise added up to a cap's worth to every message exchange of a round."""


class CappedSleep:
    """The ``time`` module with ``sleep`` capped: at ``cap`` seconds for the idle wait between pulls from the
    SuperLink (Flower's 3 s, a network request each), at `LOCAL_WAIT_S` for the waits under a second (Flower's
    0.5 s checks of the node's own store)."""

    def __init__(self, cap: float):
        if not cap > 0:
            raise ValueError(f"{POLL_ENV} must be a positive number of seconds, got {cap!r}")
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap if seconds >= 1 else min(LOCAL_WAIT_S, self.cap)))

    def __getattr__(self, name: str):
        return getattr(_time, name)


def install(cap: float) -> None:
    from flwr.supernode import start_client_internal as node_loop

    current = getattr(node_loop, "time", None)
    if isinstance(current, CappedSleep):
        current.cap = CappedSleep(cap).cap
    elif current is _time:
        node_loop.time = CappedSleep(cap)
    else:
        raise RuntimeError("flwr.supernode.start_client_internal no longer uses the time module: the SuperNode's "
                           "poll cannot be shortened on this Flower version (start plain flower-supernode)")
    retry_objects_locally(node_loop, "pull_objects")


def main() -> None:
    install(float(os.environ.get(POLL_ENV, "0.1")))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
