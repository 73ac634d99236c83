"""Long-lived Python objects kept out of the garbage collector's full passes.

A process that runs fedpa holds ~450,000 long-lived objects once torch, transformers, peft, Flower and Ray are
imported and a model is built. Each full collection walks all of them: 0.2–0.3 s, every few rounds, in each node's
process and in the server's (a third of a cohort node's round of 500 RecFlow-sized users, measured by
`benchmarks/bench_node_round.py`). Frozen (`gc.freeze`), they are never walked again; what a round allocates still is.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def freeze_long_lived() -> None:
    """Freeze everything alive now, after collecting the young generations (what building left behind)."""
    gc.collect(1)
    gc.freeze()


def release_frozen() -> None:
    """Unfreeze, then collect: what the process has just dropped (a runtime, a run) is freed, cycles included,
    before anything is frozen again."""
    gc.unfreeze()
    gc.collect()


@contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Everything alive on entering stays frozen for the block (a run); unfrozen on leaving, so that what the block
    held can be collected once it is dropped."""
    freeze_long_lived()
    try:
        yield
    finally:
        gc.unfreeze()
