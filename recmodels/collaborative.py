"""The published federated recommenders as their papers define them: models that score items by id, with no
foundation, so that fedpa's comparisons run against the methods themselves and not against adapters that
borrow their ideas.

- ``fedmf``   FedMF / FedNCF's GMF (Chai et al. 2020; Perifanis & Efraimidis 2022): a private user embedding,
              shared item embeddings and item biases; each item row is averaged over the clients that read it.
- ``pfedrec`` PFedRec (Zhang et al., IJCAI 2023, official code read for every detail below): shared item
              embeddings and a private score function (one linear layer); per batch, SGD on the score function,
              then on the item embeddings at ``lr * n_items * eta``; the server averages the full item table
              over the round's clients; a client scores with its own fine-tuned copy (dual personalization).
- ``fedrap``  FedRAP (Li et al., ICLR 2024; official code read for every detail below): shared item
              *commonality* C (averaged over the round's clients), a private additive item *personality* D_u
              and a private score function; the loss subtracts λ·MSE(D_u, C) and adds μ·|C|₁ on the batch
              rows, λ and μ ramped by tanh; plain SGD with weight decay on every parameter, so each step also
              shrinks every row of C and D_u the batch did not read (what keeps the random init of the rows a
              user never trained from deciding its ranking); up to 10 local epochs, stopped early when the
              running loss settles (relative change < 1e-4).

Every training call samples fresh negatives (4 per positive, uniform over the items the user did not click),
as both official implementations do each round; the split's fixed negatives are not used. Plain PyTorch; the
client runs users one after another (`model` is None, so the cohort engine leaves these alone).

What deviates from the official code, and why: PFedRec's client scores after fine-tuning from the *new*
global table (the official one scores with the table it trained from the previous global one), because a
fedpa round evaluates after aggregation; FedRAP's untouched personality rows are a deterministic
N(0, 1) draw times the product of every weight-decay step since (the official keeps a dense table per client,
4.7 MB each on KuaiSAR-R, and decays all of it), so only the rows a user trained and one scale are stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedpa.foundation.errors import FedpaError
from fedpa.recdata.schema import TRAIN_NEGATIVES

from .algorithms import Algorithm
from .item_bias import PER_ROW

PREFIX = "cf."


@dataclass(frozen=True)
class CFOptions:
    dim: int = 32                 # embedding width (both official codes: 32)
    pfedrec_eta: float = 80.0     # PFedRec: item-embedding step = lr * n_items * eta (official default 80)
    fedrap_lambda: float = 0.1    # FedRAP: weight of -MSE(D, C) (official default 0.1)
    fedrap_mu: float = 0.1        # FedRAP: weight of |C|_1 (official default 0.1, regular l1)
    fedrap_item_lr: float = 200.0  # FedRAP: SGD step of D and C in round 1 (official default lr_args 200)
    fedrap_weight_decay: float = 1e-4  # FedRAP: SGD weight decay of every parameter (official l2_regularization)
    fedrap_step_decay: float = 0.95  # FedRAP: ExponentialLR gamma per batch step (official)
    fedrap_tol: float = 1e-4      # FedRAP: local epochs stop when the running loss moves less than this (official)
    lr: float | None = None       # the run's round-1 learning rate: item steps decay with the round's lr as the
                                  # official lr_args does with lr_network (None: no decay)
    resample_negatives: bool = True  # implicit feedback (split loo): fresh negatives every call, as the official
                                     # codes sample them each round; False: train on the rows' own labels


def _normals(key: int, rows: np.ndarray, dim: int) -> np.ndarray:
    """N(0, 1) values [len(rows), dim], a pure function of (key, row, column): a user's random table row by
    row without holding the table (splitmix64 counters, Box–Muller)."""
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)

    def mix(z: np.ndarray) -> np.ndarray:
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & mask
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & mask
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & mask
        return z ^ (z >> np.uint64(31))

    with np.errstate(over="ignore"):
        base = (np.asarray(rows, np.uint64)[:, None] * np.uint64(2 * dim) + np.arange(2 * dim, dtype=np.uint64)[None])
        z = mix(base ^ mix(np.full(1, key, np.uint64)))
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    u1, u2 = np.clip(u[:, :dim], 1e-12, 1.0), u[:, dim:]
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)).astype(np.float32)


class CollaborativeModel:
    """One of the published federated recommenders, with `recmodels.personalization.PersonalModel`'s
    interface (what the ClientApp, the server and the evaluation call)."""

    model = None  # not an adapted foundation: no cohort engine, no merge
    item_bias_newton = False  # FedPA's Newton offset tables (`PersonalModel.item_statistics`): none here

    def __init__(self, algorithm: Algorithm, n_items: int, *, seed: int = 0, options: CFOptions | None = None):
        if n_items < 2:
            raise FedpaError(f"{algorithm.name} needs an item catalogue, got {n_items} item(s)")
        self.algorithm, self.n_items, self.o = algorithm, int(n_items), options or CFOptions()
        self.kind = algorithm.name
        d, n = self.o.dim, self.n_items
        g = torch.Generator().manual_seed(int(seed))
        self.task_columns = [0]
        self.group_attributes: list[str] = []
        if self.kind == "fedmf":
            self.shared = {"item_emb": 0.1 * torch.randn(n, d, generator=g), "item_bias": torch.zeros(n, 1)}
            self.groups = {"item_emb": PER_ROW, "item_bias": PER_ROW}
        elif self.kind == "pfedrec":
            self.shared = {"item_emb": torch.randn(n, d, generator=g)}   # nn.Embedding's N(0, 1)
            self.groups = {"item_emb": None}
        elif self.kind == "fedrap":
            self.shared = {"item_common": torch.randn(n, d, generator=g)}
            self.groups = {"item_common": None}
        else:
            raise FedpaError(f"'{algorithm.name}' is not a collaborative (id-based) algorithm")
        self.seed = int(seed)
        self._last_negatives = np.zeros(0, np.int64)
        self.initial_private = self._fresh_private(self.seed)
        self.private: dict[str, torch.Tensor] = {}
        self.set_private(None)

    # ------------------------------------------------------------------ state

    def _fresh_private(self, key: int) -> dict[str, np.ndarray]:
        d = self.o.dim
        g = torch.Generator().manual_seed(int(key) + 1)
        if self.kind == "fedmf":
            return {"user_emb": (0.1 * torch.randn(d, generator=g)).numpy()}
        bound = 1.0 / np.sqrt(d)  # nn.Linear's default initialisation of the score function
        out = {"score_w": ((torch.rand(d, generator=g) * 2 - 1) * bound).numpy(),
               "score_b": ((torch.rand(1, generator=g) * 2 - 1) * bound).numpy()}
        if self.kind == "fedrap":
            out["personal_rows"] = np.zeros(0, np.int64)
            out["personal"] = np.zeros((0, d), np.float32)
            out["personal_key"] = np.array([key], np.int64)
            out["personal_scale"] = np.ones(1, np.float32)   # the weight decay the untouched rows went through
        return out

    def shared_spec(self) -> list[tuple[str, tuple[int, ...], str | None]]:
        return [(PREFIX + k, tuple(v.shape), self.groups[k]) for k, v in self.shared.items()]

    def get_shared(self) -> dict[str, np.ndarray]:
        return {PREFIX + k: v.numpy().copy() for k, v in self.shared.items()}

    def set_shared(self, values: Mapping[str, np.ndarray]) -> None:
        for k in self.shared:
            self.shared[k] = torch.from_numpy(np.array(values[PREFIX + k], np.float32))

    def get_private(self, slot: int = 0) -> dict[str, np.ndarray]:
        return {PREFIX + k: v.numpy().copy() for k, v in self.private.items()}

    def set_private(self, values: Mapping[str, np.ndarray] | None, slot: int = 0) -> None:
        """A user's private state; None = a new user, who starts from the run's initial private parts (as each
        official client starts from a copy of the server's initial model)."""
        if values is None:
            values = {PREFIX + k: v for k, v in self.initial_private.items()}
        fresh = self._fresh_private(0)
        missing = [PREFIX + k for k in fresh if PREFIX + k not in values]
        if missing:
            raise FedpaError(f"personal state lacks '{missing[0]}' (was it saved by another algorithm?)")
        self.private = {k: torch.from_numpy(np.array(values[PREFIX + k])) for k in fresh}

    @property
    def count_terms(self) -> int:
        """Per-row tables each add a unit-norm count vector to a user's contribution (DP sensitivity)."""
        return sum(1 for g in self.groups.values() if g == PER_ROW)

    def groups_of(self, profile: np.ndarray) -> set[str]:
        return set()

    def touched_rows(self, data) -> dict[str, np.ndarray] | None:
        """Per-row counts (FedMF's per-row tables): 1 for every item row the user's training read."""
        per_row = [k for k, g in self.groups.items() if g == PER_ROW]
        if not per_row:
            return None
        seen = np.zeros(self.n_items, np.float32)
        rows = self._positives(data) if self.o.resample_negatives else self._items(data)[data.labels[:, 0] >= 0].numpy()
        seen[rows] = 1.0
        seen[self._last_negatives] = 1.0
        return {PREFIX + k: seen for k in per_row}

    def features(self, batches):
        """The rows' items and labels (no tower inputs: these models read the item id only)."""
        from .personalization import UserTensors

        labels, items = [], []
        for b in batches:
            labels.append(b["labels"])
            items.append(b["item"])
        if not items:
            return UserTensors(torch.zeros(0, 0), torch.zeros(0, 6), torch.zeros(0, 6, dtype=torch.long))
        labels, items = torch.cat(labels), torch.cat(items)
        return UserTensors(torch.zeros(len(items), 0), labels, items)

    # ------------------------------------------------------------------ scoring

    def _items(self, data) -> torch.Tensor:
        if data.items is None:
            raise FedpaError(f"{self.kind} scores items by id: the rows were cached without their item features "
                             "(rebuild the feature cache)")
        rows = data.items[:, 0].long()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.n_items):
            raise FedpaError(f"item id {int(rows.max())} is outside the model's {self.n_items} items (a dataset "
                             "other than the one the run was built for?)")
        return rows

    def _positives(self, data) -> np.ndarray:
        return self._items(data)[data.labels[:, 0] == 1].numpy()

    def _logits(self, rows: torch.Tensor, shared: dict[str, torch.Tensor], private: dict[str, torch.Tensor],
                personal: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "fedmf":
            return shared["item_emb"][rows] @ private["user_emb"] + shared["item_bias"][rows, 0]
        emb = shared["item_emb"][rows] if self.kind == "pfedrec" else shared["item_common"][rows] + personal
        return emb @ private["score_w"] + private["score_b"][0]

    def _personal_rows(self, rows: np.ndarray, private: dict[str, torch.Tensor]) -> torch.Tensor:
        """FedRAP's D_u at ``rows``: the user's trained rows where it has them, its deterministic init elsewhere."""
        out = torch.from_numpy(_normals(int(private["personal_key"][0]), rows, self.o.dim))
        out *= float(private["personal_scale"][0])
        have = private["personal_rows"].numpy()
        if len(have):
            pos = np.searchsorted(have, rows)
            hit = (pos < len(have)) & (have[np.minimum(pos, len(have) - 1)] == rows)
            out[torch.from_numpy(hit)] = private["personal"][torch.from_numpy(pos[hit])]
        return out

    @torch.no_grad()
    def predict(self, data, profile: np.ndarray | None = None, slot: int = 0) -> np.ndarray:
        if len(data) == 0:
            return np.zeros(0, np.float32)
        rows = self._items(data)
        personal = self._personal_rows(rows.numpy(), self.private) if self.kind == "fedrap" else None
        return torch.sigmoid(self._logits(rows, self.shared, self.private, personal)).numpy()

    def personalized_scores(self, train, evals, profile: np.ndarray, local, *, seed: int) -> list[np.ndarray]:
        """PFedRec scores with its own fine-tuned copy of the item table (trained from the received one, then
        restored); the others with their current state."""
        if not self.algorithm.finetune_before_eval:
            return [self.predict(e) for e in evals]
        shared, private = self.get_shared(), self.get_private()
        held_out = np.concatenate([self._positives(e) for e in evals]) if evals else None
        self.train_user(train, profile, local, seed=seed, exclude=held_out)
        try:
            return [self.predict(e) for e in evals]
        finally:
            self.set_shared(shared)
            self.set_private(private)

    def reference_scores(self, data) -> None:
        """No foundation to compare with: these models replace it."""
        return None

    def example_losses(self, data, profile: np.ndarray, slot: int = 0) -> np.ndarray:
        p = np.clip(self.predict(data).astype(np.float64), 1e-7, 1 - 1e-7)
        y = data.labels[:, 0].numpy()
        return np.where(y == 1, -np.log(p), -np.log1p(-p)).astype(np.float32)

    # ------------------------------------------------------------------ training

    def _sample(self, positives: np.ndarray, rng: np.random.Generator, exclude: np.ndarray | None) -> np.ndarray:
        seen = np.unique(positives if exclude is None else np.r_[positives, exclude])
        if len(seen) >= self.n_items:
            raise FedpaError("cannot sample negatives: the user clicked every item")
        k = TRAIN_NEGATIVES * len(positives)
        out = np.empty(0, np.int64)
        while len(out) < k:
            cand = rng.integers(0, self.n_items, size=2 * (k - len(out)) + 8)
            out = np.r_[out, cand[~np.isin(cand, seen)]]
        return out[:k]

    def train_user(self, data, profile: np.ndarray, train, *, seed: int, slot: int = 0,
                   exclude: np.ndarray | None = None) -> dict[str, float]:
        """Local epochs on the user's clicks with fresh negatives (never an item in ``exclude``: the user's
        held-out clicks, which the official codes keep out of the negatives too); returns the mean loss and the
        row count."""
        self._last_negatives = np.zeros(0, np.int64)
        if self.o.resample_negatives:
            positives = self._positives(data)
            if train.epochs == 0 or not len(positives):
                return {"loss": float("nan"), "n": float(len(positives))}
            negatives = self._sample(positives, np.random.default_rng(int(seed)), exclude)
            self._last_negatives = negatives
            items = torch.from_numpy(np.r_[positives, negatives].astype(np.int64))
            y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
        else:  # rows with real negatives (exposures that were not clicked): train on them as they are
            seen = data.labels[:, 0] >= 0
            items, y = self._items(data)[seen], data.labels[seen, 0].float()
            if train.epochs == 0 or not len(items):
                return {"loss": float("nan"), "n": float(len(items))}
        gen = torch.Generator().manual_seed(int(seed))
        if self.kind == "fedmf":
            loss = self._train_fedmf(items, y, train, gen)
        elif self.kind == "pfedrec":
            loss = self._train_pfedrec(items, y, train, gen)
        else:
            loss = self._train_fedrap(items, y, train, gen)
        return {"loss": loss, "n": float(len(items))}

    def _batches(self, n: int, batch_size: int, epochs: int, gen: torch.Generator):
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n, batch_size):
                yield order[s:s + batch_size]

    def _train_fedmf(self, items, y, train, gen) -> float:
        rows, inv = torch.unique(items, return_inverse=True)
        emb = self.shared["item_emb"][rows].clone().requires_grad_(True)
        bias = self.shared["item_bias"][rows].clone().requires_grad_(True)
        user = self.private["user_emb"].clone().requires_grad_(True)
        opt = torch.optim.Adam([emb, bias, user], lr=train.lr)
        total = 0.0
        for idx in self._batches(len(items), train.batch_size, train.epochs, gen):
            logit = emb[inv[idx]] @ user + bias[inv[idx], 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            self.shared["item_emb"][rows] = emb.detach()
            self.shared["item_bias"][rows] = bias.detach()
            self.private["user_emb"] = user.detach()
        return total / max(train.epochs * len(items), 1)

    def _train_pfedrec(self, items, y, train, gen) -> float:
        rows, inv = torch.unique(items, return_inverse=True)
        emb = self.shared["item_emb"][rows].clone().requires_grad_(True)
        w = self.private["score_w"].clone().requires_grad_(True)
        b = self.private["score_b"].clone().requires_grad_(True)
        opt_score = torch.optim.SGD([w, b], lr=train.lr)
        opt_item = torch.optim.SGD([emb], lr=train.lr * self.n_items * self.o.pfedrec_eta)
        total = 0.0
        for idx in self._batches(len(items), train.batch_size, train.epochs, gen):
            for opt in (opt_score, opt_item):  # the score function first, then the items with a fresh forward
                p = torch.sigmoid(emb[inv[idx]] @ w + b[0])
                loss = torch.nn.functional.binary_cross_entropy(p, y[idx])
                opt_score.zero_grad()
                opt_item.zero_grad()
                loss.backward()
                opt.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            self.shared["item_emb"][rows] = emb.detach()
            self.private["score_w"], self.private["score_b"] = w.detach(), b.detach()
        return total / max(train.epochs * len(items), 1)

    def _train_fedrap(self, items, y, train, gen) -> float:
        rows, inv = torch.unique(items, return_inverse=True)
        common = self.shared["item_common"][rows].clone().requires_grad_(True)
        personal = self._personal_rows(rows.numpy(), self.private).clone().requires_grad_(True)
        w = self.private["score_w"].clone().requires_grad_(True)
        b = self.private["score_b"].clone().requires_grad_(True)
        # the official λ, μ: 0 in the first two rounds, then tanh((round - 2) / 10) of their values
        ramp = float(np.tanh(max(train.round - 2, 0) / 10.0))
        lam, mu = ramp * self.o.fedrap_lambda, ramp * self.o.fedrap_mu
        item_lr = self.o.fedrap_item_lr * (train.lr / self.o.lr if self.o.lr else 1.0)
        wd = self.o.fedrap_weight_decay
        opt = torch.optim.SGD([{"params": [w, b], "lr": train.lr}, {"params": [personal, common], "lr": item_lr}],
                              weight_decay=wd)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.o.fedrap_step_decay)
        shrink = 1.0   # what the weight decay did to every item row outside this round's rows
        total, count, running = 0.0, 0, None
        for _ in range(train.epochs):
            for idx in self._batches(len(items), max(train.batch_size, 1), 1, gen):
                c, d = common[inv[idx]], personal[inv[idx]]
                p = torch.sigmoid((c + d) @ w + b[0])
                loss = (torch.nn.functional.binary_cross_entropy(p, y[idx])
                        - lam * torch.nn.functional.mse_loss(d, c) + mu * c.abs().mean())
                opt.zero_grad()
                loss.backward()
                shrink *= 1.0 - opt.param_groups[1]["lr"] * wd
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            before, running = running, total / count
            if before is not None and abs(running - before) < self.o.fedrap_tol * abs(before):
                break
        with torch.no_grad():
            self.shared["item_common"] = self.shared["item_common"] * shrink
            self.shared["item_common"][rows] = common.detach()
            self.private["score_w"], self.private["score_b"] = w.detach(), b.detach()
            self.private["personal"] = self.private["personal"] * shrink
            self.private["personal_scale"] = self.private["personal_scale"] * shrink
            self._store_personal(rows.numpy(), personal.detach())
        return total / max(count, 1)

    def _store_personal(self, rows: np.ndarray, values: torch.Tensor) -> None:
        have, vals = self.private["personal_rows"].numpy(), self.private["personal"]
        keep = ~np.isin(have, rows)
        all_rows = np.r_[have[keep], rows]
        all_vals = torch.cat([vals[torch.from_numpy(keep)], values])
        order = np.argsort(all_rows, kind="stable")
        self.private["personal_rows"] = torch.from_numpy(all_rows[order].astype(np.int64))
        self.private["personal"] = all_vals[torch.from_numpy(order)].contiguous()
