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

Each site rebinds the name its Flower module imported (the function object stays Flower's own, with two of its
keyword defaults changed); a Flower version that no longer has that name is refused loudly, not silently slow.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType

LOCAL_RETRY_S = (0.02, 0.5)
"""First and longest wait (s) before asking again for an object that is not there yet, on a local link."""


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
