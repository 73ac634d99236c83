"""The frozen foundation's representations, in the shapes the stage heads read (see the package docstring).

Computed without gradients: the foundation is frozen, stages only train their heads (and adapters).
"""

from __future__ import annotations

import torch

from fedpa.foundation.batch import CONTEXT_FIELDS
from fedpa.foundation.config import FoundationConfig
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.model import FoundationModel


def user_width(config: FoundationConfig) -> int:
    """Width of `StageEncoder.users`' user vector: the [USER] state, the profile and context embeddings."""
    return config.d_model + config.field_dim * (len(config.user_fields) + len(CONTEXT_FIELDS))


class StageEncoder:
    def __init__(self, foundation: FoundationModel):
        if foundation.config.arch != "transformer":
            raise FedpaError("the stage heads read the transformer foundation's user and item states "
                             f"(this foundation is '{foundation.config.arch}')")
        self.foundation = foundation.eval()
        c = foundation.config
        self.item_dim = c.d_model
        self.history_dim = c.d_model
        self.user_dim = user_width(c)
        self.pair_dim = foundation.tower.fc1.in_features

    @torch.no_grad()
    def users(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user [B, Du], history [B, 1+L, d], history_mask [B, 1+L]) of each request row."""
        f = self.foundation
        states, mask, inverse = f._encode_histories(batch["hist_items"], batch["hist_mask"])
        states, mask = states.index_select(0, inverse), mask.index_select(0, inverse)
        ctx = torch.cat([f.context[name](batch["context"][:, i]) for i, name in enumerate(CONTEXT_FIELDS)], dim=-1)
        user = torch.cat([states[:, 0], f.embed_profile(batch["user_profile"]), ctx], dim=-1)
        return user, states, mask

    @torch.no_grad()
    def items(self, item_rows: torch.Tensor) -> torch.Tensor:
        """Item embeddings [N, d] of item feature rows [N, F] (`foundation.batch.ITEM_FIELDS` order)."""
        return self.foundation.item_encoder(item_rows)

    @torch.no_grad()
    def pairs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The foundation's tower input [B, Dp] of each (request, candidate) row."""
        return self.foundation.encode(**batch)[0]
