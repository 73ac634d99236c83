"""Flower's own ``flower-supernode`` with its idle waits shortened, for deployments on one machine (`fedpa deploy`,
its test and `benchmarks/bench_device.py --deploy`).

Flower 1.42's SuperNode sleeps 3 s after every pull that brought no message, waits for its ClientApp's reply in
0.5 s steps, and retries a message object the SuperLink does not have yet after 1 s, then 2, 4 …
(`flwr.supernode.start_client_internal`: hard-coded, no flag or variable sets them). Across a real
network that is a sensible load on the SuperLink; on loopback it is most of a round, because a SecAgg+ round is a
dozen message exchanges and the node that answered last is asleep when the next one is sent. This entry point
runs the unchanged SuperNode with those waits capped at ``FEDPA_SUPERNODE_POLL_S`` seconds (default 0.1): the
module's ``time`` is replaced by a view of the real one whose ``sleep`` is capped, and its object pulls retry at
a local link's pace (`common/flower_pace.py`). Nothing else differs; a device
on a real network is started with plain ``flower-supernode``.

    python -m fedpa.simulations.loopback_supernode <flower-supernode arguments>
"""

from __future__ import annotations

import os
import time as _time

from fedpa.common.flower_pace import retry_objects_locally

POLL_ENV = "FEDPA_SUPERNODE_POLL_S"


class CappedSleep:
    """The ``time`` module with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float):
        if not cap > 0:
            raise ValueError(f"{POLL_ENV} must be a positive number of seconds, got {cap!r}")
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap))

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
