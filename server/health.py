"""What a run's own curves say about its training, written into its summary as warnings.

A baseline run at settings that do not suit the data still ends with a table row, and a row from a diverged run
reads like a weak method: PFedRec at its official item step on a 100,000-item catalogue (its loss grew every
round, best validation at round 0), FedRAP whose unbounded −λ·MSE term ran its loss to −inf. Each rule below
caught one of those; none fires on the runs of docs/results.md that trained normally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

GROWTH = 10.0      # |loss| this many times its first round's: the loss ran away (either sign)
RISING_ROUNDS = 3  # rounds in a row of a rising loss that, ending above RISE x the first, say "diverging"
RISE = 1.5


def training_warnings(history: Sequence[dict[str, Any]], best_round: int) -> list[str]:
    """Warnings from the per-round training losses (``train_loss`` of the history's records) and the round
    chosen on validation; [] for a run that trained normally or did not train."""
    losses = [(int(h["round"]), h.get("train_loss")) for h in history
              if h.get("round", 0) > 0 and h.get("train_loss") is not None]
    if not losses:
        return []
    out = []
    bad = next((r for r, v in losses if not math.isfinite(v)), None)
    if bad is not None:
        out.append(f"the training loss is not finite from round {bad} on")
    finite = [(r, v) for r, v in losses if math.isfinite(v)]
    if finite:
        r0, first = finite[0]
        away = next(((r, v) for r, v in finite[1:] if abs(v) > GROWTH * max(abs(first), 1e-12)), None)
        if away is not None:
            out.append(f"the training loss ran away: {first:.4g} in round {r0}, {away[1]:.4g} in round {away[0]}")
        rising = 0
        for (_, a), (_, b) in zip(finite, finite[1:]):
            rising = rising + 1 if b > a else 0
        if not away and rising >= RISING_ROUNDS and finite[-1][1] > RISE * first:
            out.append(f"the training loss rose in each of the last {rising} rounds ({first:.4g} in round {r0}, "
                       f"{finite[-1][1]:.4g} in round {finite[-1][0]}): the steps are likely too large")
    if best_round == 0:
        out.append("no round improved the validation metric on round 0, the starting point")
    if out:
        out.append("search the algorithm's settings on validation (benchmarks/tune_baseline.py)")
    return out
