"""Stage heads as pointwise scorers of the foundation's tower input, so the federation personalizes them.

The federation (adapters, cohort engine, secure aggregation, DP, personal store) works on one
contract: a user's rows are the frozen foundation's tower inputs (``pair`` [n, Dp], cached once per
simulation) with labels, and a *tower* maps rows to logits. Every stage except re-ranking can be
read that way, because the pair vector already holds what the stage reads:

    pair = [user state (d) | interest (d) | item embedding (d) | interest * item (d) | profile | context]

* retrieval and pre-ranking read the user side (user state ++ profile ++ context, exactly
  `StageEncoder.users`' first output) and the item embedding: slices of the pair;
* ranking (HoME) reads the pair itself.

A `StageHost` wraps one trained stage head as ``host.tower`` (a scorer) so that
`foundation.adapters.attach_adapters` injects FedPA's adapters into the head's own layers: the
adapted layers *are* the head's layers (peft replaces them in place), so the funnel runner scores
with the personalized head without knowing about adapters. The scorer adds a small prediction head
(``tower.head``: a per-task affine map that starts as the identity) that plays the foundation
head's role for the algorithms (shared for FedPA, private for FedPer/local).

Re-ranking (CDM) is not pointwise (its student reads the whole list), so it stays as trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fedpa.foundation.batch import CONTEXT_FIELDS, TASKS
from fedpa.foundation.config import FoundationConfig
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.model import FoundationModel

from . import FEDERATED_STAGES  # noqa: F401  (re-exported)
from .dimerec import DimeRecRetrieval
from .features import user_width
from .ranking import HoMERanker
from .towers import PrerankDSSM, RetrievalTwoTower


class PairLayout:
    """Where the user side and the item embedding sit inside the foundation's pair vector."""

    def __init__(self, config: FoundationConfig):
        if config.arch != "transformer":
            raise FedpaError(f"the stage heads read the transformer foundation (this one is '{config.arch}')")
        self.d = config.d_model
        self.width = 4 * self.d + config.field_dim * (len(config.user_fields) + len(CONTEXT_FIELDS))

    def user(self, pair: torch.Tensor) -> torch.Tensor:
        return torch.cat([pair[:, :self.d], pair[:, 4 * self.d:]], dim=-1)

    def item(self, pair: torch.Tensor) -> torch.Tensor:
        return pair[:, 2 * self.d:3 * self.d]


def _identity_head(width: int, scale: float = 1.0) -> nn.Linear:
    head = nn.Linear(width, width)
    with torch.no_grad():
        head.weight.copy_(torch.eye(width) * scale)
        head.bias.zero_()
    return head


class _Scorer(nn.Module):
    """A trained head (``model``) read from pair rows, plus the identity-initialised ``head`` over its logits."""

    task_columns = [0]  # effective_view

    def __init__(self, model: nn.Module, layout: PairLayout, n_logits: int = 1):
        super().__init__()
        self.model, self.layout = model, layout
        self.head = _identity_head(n_logits)

    @property
    def adapter_targets(self) -> list[str]:
        return [f"model.{t}" for t in self.model.adapter_targets]


class RetrievalScorer(_Scorer):
    """Logit of one (request, candidate) row: the two-tower's cosine over its temperature."""

    def __init__(self, model: RetrievalTwoTower, layout: PairLayout):
        if model.interests > 1:
            raise FedpaError("a multi-interest retrieval head reads the whole history, not one pair row: "
                             "federate a single-interest head (fedpa funnel --interests 1)")
        super().__init__(model, layout)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        u = self.model.user_vectors(self.layout.user(pair))[:, 0]
        v = self.model.item_vectors(self.layout.item(pair))
        return self.head(((u * v).sum(-1) / self.model.temperature).unsqueeze(-1))


class PrerankScorer(_Scorer):
    """Logit of one row: the DSSM's own calibrated logit."""

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(self.layout.user(pair), self.layout.item(pair)).unsqueeze(-1))


class RankScorer(_Scorer):
    """HoME's six task logits of one row; adapters on the experts' projections."""

    def __init__(self, model: HoMERanker, layout: PairLayout):
        super().__init__(model, layout, len(model.tasks))
        self.task_columns = [TASKS.index(t) for t in model.tasks]

    @property
    def adapter_targets(self) -> list[str]:
        return [f"model.experts.{i}.proj" for i in range(len(self.model.experts))]

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(pair))


SCORERS = {"retrieval": RetrievalScorer, "prerank": PrerankScorer, "rank": RankScorer}


class StageHost(nn.Module):
    """One stage scorer as ``tower``, the shape `attach_adapters` expects (``config.user_fields``)."""

    def __init__(self, stage: str, scorer: nn.Module, config: FoundationConfig):
        super().__init__()
        self.stage = stage
        self.config = config
        self.tower = scorer

    @property
    def head(self) -> nn.Module:
        return self.tower.head

    @property
    def task_columns(self) -> list[int]:
        return list(self.tower.task_columns)

    @property
    def adapter_targets(self) -> list[str]:
        return [f"tower.{t}" for t in self.tower.adapter_targets]

    @property
    def stage_head(self) -> nn.Module:
        """The trained head (retrieval two-tower, DSSM or HoME) that the funnel runner calls."""
        return self.tower.model

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.tower(pair)


RETRIEVAL_KINDS = ("two-tower", "dimerec")


def build_stage_head(stage: str, config: FoundationConfig, interests: int = 1,
                     retrieval: str = "two-tower") -> nn.Module:
    """An untrained head of ``stage`` with the shapes `simulations.funnel.build_models` gives it;
    ``retrieval`` picks the retrieval head (RecFlow's two-tower, or DimeRec's generated query)."""
    d = config.d_model
    user_dim = user_width(config)
    pair_dim = PairLayout(config).width
    if stage == "retrieval":
        if retrieval == "dimerec":
            return DimeRecRetrieval(user_dim, d, d, interests=interests)
        if retrieval != "two-tower":
            raise FedpaError(f"unknown retrieval head '{retrieval}' ({', '.join(RETRIEVAL_KINDS)})")
        return RetrievalTwoTower(user_dim, d, d, interests=interests)
    if stage == "prerank":
        return PrerankDSSM(user_dim, d)
    if stage == "rank":
        return HoMERanker(pair_dim)
    raise FedpaError(f"stage '{stage}' cannot be federated (one of {', '.join(FEDERATED_STAGES)}; "
                     "re-ranking reads whole lists)")


def load_stage_host(foundation: FoundationModel, funnel_dir: str | Path, stage: str) -> StageHost:
    """The ``stage`` head a `fedpa funnel` run saved under ``funnel_dir`` (config.json + models/),
    wrapped for the federation. Clear errors for a missing run, a missing head or a wrong shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    funnel_dir = Path(funnel_dir)
    try:
        funnel_cfg = json.loads((funnel_dir / "config.json").read_text())
    except OSError:
        raise FedpaError(f"{funnel_dir}: not a `fedpa funnel` run (no config.json); train the stage heads "
                         "with `fedpa funnel --out DIR` first") from None
    except ValueError as e:
        raise FedpaError(f"{funnel_dir / 'config.json'}: not valid JSON ({e})") from None
    head = build_stage_head(stage, foundation.config, int(funnel_cfg.get("interests", 1)),
                            str(funnel_cfg.get("retrieval", "two-tower")))
    path = funnel_dir / "models" / f"{stage}.safetensors"
    try:
        head.load_state_dict(load_file(path))
    except (OSError, SafetensorError, RuntimeError) as e:
        raise FedpaError(f"{path}: cannot load the {stage} head ({str(e).splitlines()[0]}); was this funnel "
                         "trained on the same foundation?") from None
    scorer = SCORERS[stage](head, PairLayout(foundation.config))
    return StageHost(stage, scorer.eval(), foundation.config)

