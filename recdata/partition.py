"""Users into clients, and each client's data into train / validation / test.

*Open* users are pre-training material for the server (FedPA's rule: 80% of
the highly active users plus 20% of the rest); every other user is a
*private* user, i.e. one federated client. With ``federate_open_users`` the
open users join the federation as clients too (MRFF's protocol scores every
user; an open user's held-out rows were never pre-trained on). Clients are
sorted by id and partition id ``i`` is ``clients[i]``: a Flower node started
with ``partition-id=i`` loads exactly that user's rows, nothing else.

Splits (per private user):

- ``by-day`` (RecFlow): earlier days train, then ``val_days``, then ``test_days``.
- ``chrono`` (FedPA): the user's exposures in time order, 60 / 20 / 20.
- ``loo`` (PFedRec): last positive = test, second-last = validation, each
  scored against ``negatives`` items the user never interacted with; the rest
  of the positives train, each with 4 sampled unseen negatives (with
  ``negative_pool`` P > 1: 4·P drawn once, of which each round trains on a
  fresh quarter-per-positive share, `round_training_rows`).
- ``last`` (MRFF): the last interaction = test, second-last = validation,
  labels as observed; everything earlier trains.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa

from .examples import Examples, Lookups, Views
from .schema import EVAL_USERS, LABELS, SPLITS, TRAIN_NEGATIVES
from .store import Dataset, DatasetError

EPOCH = date(1970, 1, 1)


@dataclass(frozen=True)
class SplitConfig:
    mode: str = "by-day"
    val_days: int = 1
    test_days: int = 1
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    negatives: int = 99
    negative_pool: int = 1   # loo: training negatives drawn per positive = TRAIN_NEGATIVES * this

    def __post_init__(self):
        if self.mode not in SPLITS:
            raise DatasetError(f"unknown split '{self.mode}' (one of {', '.join(SPLITS)})")
        if self.val_days < 1 or self.test_days < 1:
            raise DatasetError("val_days and test_days must be at least 1")
        if abs(sum(self.fractions) - 1) > 1e-6 or min(self.fractions) <= 0:
            raise DatasetError(f"split fractions {self.fractions} must be positive and sum to 1")
        if self.negatives < 1:
            raise DatasetError("negatives must be at least 1")
        if self.negative_pool < 1:
            raise DatasetError("negative_pool must be at least 1")


@dataclass(frozen=True)
class PartitionConfig:
    """Which users are open (pre-training) and which are federated clients."""

    seed: int = 0
    active_top_fraction: float = 0.2   # "highly active" = this top share by exposures ...
    activity_attribute: str | None = None  # ... or by a profile attribute, e.g. reco_active_level
    active_values: tuple[int, ...] = ()   # values of that attribute that count as highly active
    open_active_fraction: float = 0.8     # FedPA: 80% of the highly active users are open
    open_rest_fraction: float = 0.2       # ... plus 20% of the rest
    max_clients: int | None = None        # keep a deterministic sample of private users
    federate_open_users: bool = False     # open users are clients too (their pre-training rows stay theirs)

    def __post_init__(self):
        for name in ("active_top_fraction", "open_active_fraction", "open_rest_fraction"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise DatasetError(f"{name} must be in [0, 1], got {v}")
        if self.max_clients is not None and self.max_clients < 1:
            raise DatasetError("max_clients must be at least 1")


@dataclass
class Partition:
    open_users: np.ndarray
    private_users: np.ndarray
    config: PartitionConfig = field(default_factory=PartitionConfig)

    @property
    def clients(self) -> np.ndarray:
        """The federation's users, sorted by id: partition id ``i`` is ``clients[i]``."""
        if self.config.federate_open_users:
            return np.union1d(self.private_users, self.open_users)
        return self.private_users

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def user_of(self, partition_id: int) -> int:
        clients = self.clients
        if not 0 <= partition_id < len(clients):
            raise DatasetError(f"partition id {partition_id} out of range (0..{len(clients) - 1})")
        return int(clients[partition_id])

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "open_users": self.open_users.tolist(),
                "private_users": self.private_users.tolist()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        d = json.loads(Path(path).read_text())
        cfg = d["config"]
        cfg["active_values"] = tuple(cfg.get("active_values", ()))
        return cls(np.asarray(d["open_users"], np.int64), np.asarray(d["private_users"], np.int64),
                   PartitionConfig(**cfg))


def user_activity(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, exposure counts) over all days, read column-projected day by day."""
    users = ds.users(["user_id"]).column("user_id").to_numpy()
    counts = np.zeros(int(users.max()) + 1 if len(users) else 0, dtype=np.int64)
    for _, t in ds.iter_days("exposures", ["user_id"]):
        uid = t.column("user_id").to_numpy()
        counts += np.bincount(uid, minlength=len(counts))[: len(counts)]
    return users, counts[users]


def make_partition(ds: Dataset, config: PartitionConfig = PartitionConfig()) -> Partition:
    users, counts = user_activity(ds)
    rng = np.random.default_rng(config.seed)
    if config.activity_attribute:
        if config.activity_attribute not in ds.user_features:
            raise DatasetError(f"unknown activity attribute '{config.activity_attribute}' "
                               f"(user features: {', '.join(ds.user_features)})")
        attr = ds.users(["user_id", config.activity_attribute])
        values = dict(zip(attr.column("user_id").to_pylist(), attr.column(config.activity_attribute).to_pylist()))
        active = np.array([values[u] in config.active_values for u in users.tolist()], dtype=bool)
    else:
        n_active = int(round(config.active_top_fraction * len(users)))
        order = np.lexsort((rng.random(len(users)), -counts))  # ties broken at random, deterministically
        active = np.zeros(len(users), dtype=bool)
        active[order[:n_active]] = True
    has_data = counts > 0
    is_open = np.zeros(len(users), dtype=bool)
    for group, frac in ((active & has_data, config.open_active_fraction),
                        (~active & has_data, config.open_rest_fraction)):
        idx = np.nonzero(group)[0]
        chosen = rng.choice(idx, size=int(round(frac * len(idx))), replace=False) if len(idx) else idx
        is_open[chosen] = True
    private = np.sort(users[~is_open & has_data])
    if config.max_clients is not None and len(private) > config.max_clients:
        private = np.sort(rng.choice(private, size=config.max_clients, replace=False))
    return Partition(np.sort(users[is_open]), private, config)


# ----------------------------------------------------------------------------- loading users' data


EXPOSURE_COLS = ["request_id", "user_id", "request_timestamp", "video_id", "rerank_index", *LABELS]


def read_exposures(ds: Dataset, users: np.ndarray, days: list[str] | None = None) -> pa.Table:
    """Exposures of ``users`` (sorted by user, then time), one slice per user and day when few
    users are asked for, one filtered scan per day otherwise."""
    users = np.unique(np.asarray(users, dtype=np.int64))
    days = ds.days if days is None else days
    if len(users) <= 32:
        parts = [ds.user_rows("exposures", int(u), EXPOSURE_COLS, days) for u in users]
    else:
        parts = []
        for _, t in ds.iter_days("exposures", EXPOSURE_COLS, days):
            uid = t.column("user_id").to_numpy()
            lo, hi = np.searchsorted(uid, [users[0], users[-1] + 1])
            t, uid = t.slice(int(lo), int(hi - lo)), uid[lo:hi]
            parts.append(t.filter(pa.array(np.isin(uid, users))))
    table = pa.concat_tables(parts) if parts else ds.day("exposures", ds.days[0], EXPOSURE_COLS).slice(0, 0)
    return table.sort_by([("user_id", "ascending"), ("request_timestamp", "ascending")])


def read_views(ds: Dataset, users: np.ndarray, exposures: pa.Table) -> Views:
    users = np.unique(np.asarray(users, dtype=np.int64))
    if len(users) <= 32:  # a client: slice its own rows instead of scanning the whole history
        parts = [ds.history_rows(int(u)) for u in users]
        hist = pa.concat_tables(parts) if parts else ds.history().slice(0, 0)
    else:
        hist = ds.history()
        if hist.num_rows:
            uid = hist.column("user_id").to_numpy()
            hist = hist.filter(pa.array(np.isin(uid, users)))
    return Views.from_tables(hist, exposures)


@dataclass
class UserSplits:
    """Train / validation / test examples of a set of users (one user for a client)."""

    train: Examples
    val: Examples
    test: Examples
    group_size: int = 1  # loo: rows per ranking case (1 positive + negatives), else 1


def day_number(day: str) -> int:
    return (date.fromisoformat(day) - EPOCH).days


def split_users(ds: Dataset, users: np.ndarray, split: SplitConfig, *,
                lookups: Lookups | None = None, seed: int = 0) -> UserSplits:
    """Load and split the data of ``users``. Deterministic for (users, split, seed)."""
    lookups = lookups or Lookups.build(ds)
    exposures = read_exposures(ds, users)
    views = read_views(ds, users, exposures)
    ex = Examples.from_exposures(exposures, views, lookups)
    if split.mode == "by-day":
        if len(ds.days) < split.val_days + split.test_days + 1:
            raise DatasetError(f"{ds.path}: {len(ds.days)} day(s) cannot hold {split.val_days} validation "
                               f"+ {split.test_days} test day(s) and a training day")
        day = ex.request_timestamp // 86_400_000
        first_val = day_number(ds.days[-(split.val_days + split.test_days)])
        first_test = day_number(ds.days[-split.test_days])
        return UserSplits(ex.subset(np.nonzero(day < first_val)[0]),
                          ex.subset(np.nonzero((day >= first_val) & (day < first_test))[0]),
                          ex.subset(np.nonzero(day >= first_test)[0]))
    starts = np.r_[0, np.nonzero(np.diff(ex.user_id))[0] + 1] if len(ex) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(ex)] if len(ex) else starts
    if split.mode == "chrono":
        tr, va, te = [], [], []
        for a, b in zip(starts, ends):
            n = b - a
            n_tr = int(round(split.fractions[0] * n))
            n_va = int(round(split.fractions[1] * n))
            tr.append(np.arange(a, a + n_tr))
            va.append(np.arange(a + n_tr, min(b, a + n_tr + n_va)))
            te.append(np.arange(min(b, a + n_tr + n_va), b))
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        return UserSplits(ex.subset(cat(tr)), ex.subset(cat(va)), ex.subset(cat(te)))
    if split.mode == "last":
        keep = [(a, b) for a, b in zip(starts, ends) if b - a >= 3]
        tr = np.concatenate([np.arange(a, b - 2) for a, b in keep]) if keep else np.zeros(0, np.int64)
        va = np.array([b - 2 for _, b in keep], dtype=np.int64)
        te = np.array([b - 1 for _, b in keep], dtype=np.int64)
        return UserSplits(ex.subset(tr), ex.subset(va), ex.subset(te))
    return _leave_one_out(ex, starts, ends, split, lookups, seed, exposures.column("rerank_index").to_numpy())


def _leave_one_out(ex: Examples, starts, ends, split: SplitConfig, lookups: Lookups,
                   seed: int, position: np.ndarray) -> UserSplits:
    """PFedRec's protocol: per user, the last positive is the test case and the second-last the
    validation case, each ranked against ``split.negatives`` items the user never interacted with; the
    other positives train, each with ``TRAIN_NEGATIVES`` sampled unseen items as negatives (drawn once
    per seed, at the positive's time, so the training set is fixed and reproducible; ``negative_pool`` times as
    many with a pool, of which `round_training_rows` picks each round's). Among clicks of one
    request (same time), the one listed first (``rerank_index``) counts as the latest, as PFedRec's official
    split ranks ties (pandas' rank(method="first") over the log's order)."""
    primary = ex.labels[:, 0]
    n_items = len(lookups.item_table)
    rows = {"train": [], "val": [], "test": []}
    for a, b in zip(starts, ends):
        pos = a + np.nonzero(primary[a:b] == 1)[0]
        if len(pos) < 3:
            continue
        pos = pos[np.lexsort((-position[pos], ex.request_timestamp[pos]))]
        u = int(ex.user_id[a])
        seen = np.unique(ex.video_id[a:b])
        train_pos = pos[:-2]
        per_positive = TRAIN_NEGATIVES * split.negative_pool
        negs = sample_unseen(n_items, seen, per_positive * len(train_pos), np.random.default_rng([seed, u, 2]),
                             distinct=False)
        rows["train"].append((np.r_[ex.video_id[train_pos], negs],
                              np.r_[ex.request_timestamp[train_pos], np.repeat(ex.request_timestamp[train_pos],
                                                                                per_positive)],
                              np.r_[np.ones(len(train_pos)), np.zeros(len(negs))], u))
        for name, r, stream in (("val", pos[-2], 0), ("test", pos[-1], 1)):
            cand = sample_unseen(n_items, seen, split.negatives, np.random.default_rng([seed, u, stream]))
            rows[name].append((np.r_[ex.video_id[r], cand], np.full(1 + len(cand), ex.request_timestamp[r]),
                               np.r_[1.0, np.zeros(len(cand))], u))
    out = {}
    for name, parts in rows.items():
        vids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        ts = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
        y = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0)
        uids = np.concatenate([np.full(len(p[0]), p[3]) for p in parts]) if parts else np.zeros(0, np.int64)
        labels = np.full((len(y), len(LABELS)), -1, np.int8)
        labels[:, 0] = y
        order = np.lexsort((ts, uids)) if name == "train" else np.arange(len(y))  # ranking cases stay grouped
        out[name] = Examples.from_rows(uids[order], ts[order], vids[order], labels[order], ex.views, lookups)
    return UserSplits(out["train"], out["val"], out["test"], group_size=1 + split.negatives)


def select_domains(ds: Dataset, splits: UserSplits, train_domains: str = "", eval_domains: str = "",
                   eval_users: str = "all", domains: str = "") -> UserSplits:
    """The rows of a dataset of several domains that a run reads, trains and evaluates on (names,
    comma-separated; "" = every domain).

    ``domains`` is what the run sees at all: the other domains' rows are gone, from the training and evaluation
    rows and from the behaviour sequences (a single-domain platform, as if the dataset held that domain only).
    ``train_domains`` keeps the training rows of some domains (the sequences still hold every seen domain:
    what personalization learns from the dense domain's rows, beside what the foundation reads of them);
    ``eval_domains`` the evaluated rows. ``eval_users`` keeps the evaluation of users who have training rows in
    a domain other than the evaluated ones ("cross-domain": a dense-domain history to transfer from) or of
    those who do not ("single-domain"), told apart on the whole dataset, whatever the run sees; every user
    still trains."""
    if eval_users not in EVAL_USERS:
        raise DatasetError(f"eval-users must be one of {', '.join(EVAL_USERS)} (got {eval_users!r})")
    seen_codes = ds.domain_codes(domains)
    train_codes, eval_codes = ds.domain_codes(train_domains), ds.domain_codes(eval_domains)
    if eval_users != "all" and not eval_codes:
        raise DatasetError(f"eval-users {eval_users} needs eval-domains (the domain whose users are told apart "
                           "by their rows in the others)")
    if not (seen_codes or train_codes or eval_codes):
        return splits
    if (eval_codes or seen_codes) and splits.group_size > 1:
        raise DatasetError("a domain filter chooses evaluation rows, but this split ranks cases of "
                           f"{splits.group_size} rows (loo) that it would cut apart")
    domain = ds.domain_of
    train, val, test = splits.train, splits.val, splits.test
    # users with training rows outside the evaluated domains, on the whole dataset
    elsewhere = np.unique(train.user_id[~np.isin(domain(train.video_id), eval_codes)]) if eval_codes else None
    if seen_codes:
        views = train.views
        keep = np.isin(domain(views.video_id), seen_codes)
        seen = Views(views.user_id[keep], views.timestamp[keep], views.video_id[keep])
        train, val, test = (_rewindowed(ex.subset(np.nonzero(np.isin(domain(ex.video_id), seen_codes))[0]), seen)
                            for ex in (train, val, test))
    if eval_codes:
        def evaluated(ex: Examples) -> Examples:
            keep = np.isin(domain(ex.video_id), eval_codes)
            if eval_users != "all":
                has_history = np.isin(ex.user_id, elsewhere)
                keep &= has_history if eval_users == "cross-domain" else ~has_history
            return ex.subset(np.nonzero(keep)[0])

        val, test = evaluated(val), evaluated(test)
    if train_codes:
        train = train.subset(np.nonzero(np.isin(domain(train.video_id), train_codes))[0])
    return UserSplits(train, val, test, group_size=splits.group_size)


def _rewindowed(ex: Examples, views: Views) -> Examples:
    """``ex``'s rows with their behaviour sequences cut from ``views``."""
    return Examples.from_rows(ex.user_id, ex.request_timestamp, ex.video_id, ex.labels, views, ex.lookups,
                              ex.request_id)


def round_training_rows(labels: np.ndarray, pool: int, *, seed: int, user: int, round_: int) -> np.ndarray | None:
    """The rows of a user's leave-one-out training rows (primary labels ``labels``) that round ``round_`` trains
    on, under a negative pool of ``pool``: every positive and a fresh ``1 / pool`` share of the sampled negatives
    (as many as `TRAIN_NEGATIVES` per positive), drawn per (seed, user, round) and kept in row order. None when
    every row trains (no pool).

    Why: the federated recommenders of the field (PFedRec, FedMF/FedNCF's implicit variants) draw new negatives
    every round; a model trained round after round on the same few negatives of each positive learns those items
    instead of the user (PFedRec on MovieLens-100K, fixed negatives: test HR@10 0.598 against 0.654 redrawn). A
    foundation's tower inputs depend on the (user, item) pair, so the negatives cannot be drawn at training time
    from the catalogue as an id-based model does: they are encoded once, as a pool, and each round samples it."""
    if pool <= 1:
        return None
    neg = np.flatnonzero(labels == 0)
    keep = len(neg) // pool
    chosen = np.random.default_rng([seed, user, round_, 3]).choice(neg, size=keep, replace=False)
    mask = labels != 0
    mask[chosen] = True
    return np.flatnonzero(mask)


def sample_unseen(n_items: int, seen: np.ndarray, k: int, rng: np.random.Generator,
                  distinct: bool = True) -> np.ndarray:
    """k item ids in [0, n_items) outside ``seen``, distinct unless ``distinct=False`` (rejection
    sampling: catalogues are much larger than a user's history)."""
    available = n_items - len(seen)
    if available < 1:
        raise DatasetError("cannot sample unseen items: the user has interacted with every item")
    if not distinct:
        out = np.empty(0, dtype=np.int64)
        while len(out) < k:
            cand = rng.integers(0, n_items, size=2 * (k - len(out)) + 8)
            out = np.r_[out, cand[~np.isin(cand, seen)]]
        return out[:k]
    if available < k:
        raise DatasetError(f"cannot sample {k} unseen items: only {available} items left")
    out = np.empty(0, dtype=np.int64)
    while len(out) < k:
        cand = rng.integers(0, n_items, size=2 * (k - len(out)) + 8)
        cand = cand[~np.isin(cand, seen) & ~np.isin(cand, out)]
        _, first = np.unique(cand, return_index=True)
        # distinct, in the order drawn: np.unique alone sorts, and keeping its smallest ids would favour
        # low ids (in an import renumbered by original id, the oldest and most popular items)
        out = np.r_[out, cand[np.sort(first)][: k - len(out)]]
    return out[:k]
