"""`fedpa pretrain`: the foundation, trained centrally on the open users only.

The open users' earlier data trains, their held-out later day validates (best
checkpoint kept; training stops after ``patience`` epochs without a better one),
and the report also scores the *private* users' held-out data: that is where
federated adaptation starts. Three references are scored on the same rows: item
popularity as a rate (smoothed positive rate of the item among open users'
training rows), item popularity as a count (the item's positives among open
users' training rows: the baseline implicit-feedback papers rank by), and the
same architecture untrained. Leave-one-out rows are also ranked (HR@10, NDCG@10).

``dropout="auto"`` (the command's default) pre-trains once per candidate of `AUTO_DROPOUT` and keeps the
foundation whose open users' validation AUC is best: chosen on the server's own held-out rows, never on a
private user's. Dropout in the user encoder helps where histories are dense (MovieLens, KuaiSAR-R's 5-core)
and costs where they are sparse (docs/results.md, "Why the foundation does not beat popularity here"); the open
users' validation picks the right side on those data sets.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fedpa.foundation import metrics as M
from fedpa.foundation.batch import TASKS
from fedpa.foundation.config import FoundationConfig
from fedpa.foundation.device import resolve_device
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.model import FoundationModel, count_parameters, load_foundation
from fedpa.foundation.pretrain import pretrain
from fedpa.recdata.examples import Examples, Lookups
from fedpa.recdata.interest_graph import build_interest_graph, save_graph
from fedpa.recdata.partition import PartitionConfig, SplitConfig, make_partition, select_domains, split_users
from fedpa.recdata.schema import SEQ_LEN
from fedpa.recdata.store import Dataset

EVAL_BATCH = 1024
AUTO_DROPOUT = (0.0, 0.3)   # the candidates of dropout="auto", the first kept on a tie


def item_positive_rates(train: Examples, n_items: int, column: int = 0, prior_weight: float = 20.0) -> np.ndarray:
    """[n_items]: each item's smoothed positive rate in label ``column`` among the training rows (Beta prior at the
    global rate, ``prior_weight`` phantom rows)."""
    y = train.labels[:, column].astype(np.float64)
    seen = y >= 0
    base = float(y[seen].mean()) if seen.any() else 0.5
    pos = np.bincount(train.video_id[seen], weights=y[seen], minlength=n_items)
    cnt = np.bincount(train.video_id[seen], minlength=n_items)
    return (pos + prior_weight * base) / (cnt + prior_weight)


def popularity_scores(train: Examples, rows: Examples, prior_weight: float = 20.0) -> np.ndarray:
    """Smoothed positive rate of each row's item among the training rows (`item_positive_rates`)."""
    n_items = int(max(train.video_id.max(initial=0), rows.video_id.max(initial=0))) + 1
    return item_positive_rates(train, n_items, prior_weight=prior_weight)[rows.video_id]


def count_scores(train: Examples, rows: Examples) -> np.ndarray:
    """The number of training positives of each row's item (ties are broken against the held-out item by the
    ranking metrics, as PFedRec's scorer does)."""
    y = train.labels[:, 0]
    n_items = int(max(train.video_id.max(initial=0), rows.video_id.max(initial=0))) + 1
    return np.bincount(train.video_id[y == 1], minlength=n_items)[rows.video_id].astype(np.float64)


def score_examples(model: FoundationModel, ex: Examples) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for b in ex.iter_batches(EVAL_BATCH):
            out.append(torch.sigmoid(model(**b).logits[:, 0]).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def metrics_of(ex: Examples, scores: np.ndarray, group_size: int = 1) -> dict:
    y = ex.labels[:, 0]
    seen = y >= 0
    ys, s, u = y[seen], scores[seen], ex.user_id[seen]
    g = M.gauc(u, ys, s)
    probs = np.clip(s, 1e-7, 1 - 1e-7) if s.max(initial=0) > 1 else s   # counts are not probabilities
    out = {"auc": M.auc(ys, s), "gauc": g.value, "gauc_users": g.users,
           "logloss": M.logloss(ys, probs) if s.max(initial=0) <= 1 else float("nan"), "n": int(len(ys))}
    if group_size > 1 and len(scores):
        cases = np.asarray(scores, np.float64).reshape(-1, group_size)
        r = M.hit_ndcg_at_k(cases[:, 0], cases[:, 1:], k=10)
        out.update({"hr@10": r["hr"], "ndcg@10": r["ndcg"]})
    return out


class _Epoch:
    """One epoch's batches, built lazily (a list would hold every batch's tensors at once)."""

    def __init__(self, ex: Examples, batch_size: int, seed: int):
        self.ex, self.batch_size, self.seed = ex, batch_size, seed

    def __len__(self) -> int:
        return -(-len(self.ex) // self.batch_size)

    def __iter__(self):
        return self.ex.iter_batches(self.batch_size, shuffle=True, seed=self.seed, by_request=True)


def pretrain_foundation(data_dir: str | Path, out_dir: str | Path, *, arch: str = "transformer", epochs: int = 2,
                        lr: float = 1e-3, batch_size: int = 256, seed: int = 0, split: str = "by-day",
                        partition: PartitionConfig | None = None, max_private_eval_users: int = 500,
                        patience: int = 0, progress=None, domains: str = "", device: str = "auto",
                        **model_overrides) -> dict:
    """Pre-train the foundation on the open users (``device``: where it trains, `foundation.device`; the
    checkpoint and the report's evaluation are the same wherever it trained, to float32 tolerance)."""
    for name, value, least in (("batch size", batch_size, 1), ("epochs", epochs, 1), ("patience", patience, 0)):
        if not isinstance(value, int) or value < least:
            raise FedpaError(f"pretrain: {name} must be a whole number >= {least}, got {value}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise FedpaError(f"pretrain: learning rate must be a finite number > 0, got {lr}")
    if model_overrides.get("dropout") == "auto":
        return _pretrain_choosing_dropout(data_dir, out_dir, arch=arch, epochs=epochs, lr=lr, batch_size=batch_size,
                                          seed=seed, split=split, partition=partition,
                                          max_private_eval_users=max_private_eval_users, patience=patience,
                                          progress=progress, domains=domains, device=device, **model_overrides)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    ds = Dataset(data_dir)
    lookups = Lookups.build(ds, seq_len=int(model_overrides.get("seq_len", SEQ_LEN)))
    part = make_partition(ds, partition or PartitionConfig(seed=seed))
    split_cfg = SplitConfig(split)
    # ``domains``: a single-domain foundation reads that domain's rows and sequences only (recdata.partition)
    opened = select_domains(ds, split_users(ds, part.open_users, split_cfg, lookups=lookups, seed=seed),
                            domains=domains)
    rng = np.random.default_rng(seed)
    private_users = part.private_users
    if len(private_users) > max_private_eval_users:
        private_users = np.sort(rng.choice(private_users, max_private_eval_users, replace=False))
    private = select_domains(ds, split_users(ds, private_users, split_cfg, lookups=lookups, seed=seed),
                             domains=domains)
    graph_stats = None
    expand = int(model_overrides.get("graph_expansion", 0))
    if expand:   # from the open users' training views only (no private user, no held-out row)
        train = opened.train
        viewed = train.labels[:, TASKS.index("effective_view")] == 1
        lookups.graph = build_interest_graph(train.user_id[viewed], train.request_timestamp[viewed],
                                             train.video_id[viewed], len(lookups.item_table))
        lookups.expand = expand
        graph_stats = {"items_with_neighbours": int((lookups.graph[:, 0] >= 0).sum()),
                       "neighbours": int((lookups.graph >= 0).sum()), "expand_slots": expand}

    config = FoundationConfig.from_dataset_vocab(ds.vocab, ds.user_features, arch=arch, **model_overrides)
    model = FoundationModel(config)
    untrained = FoundationModel(config)
    untrained.load_state_dict(model.state_dict())
    t0 = time.time()
    history = pretrain(
        model.to(dev),
        lambda epoch: _Epoch(opened.train, batch_size, seed * 1000 + epoch),
        lambda: opened.val.iter_batches(EVAL_BATCH),
        out_dir, epochs=epochs, lr=lr, seed=seed, progress=progress, patience=patience)
    train_s = time.time() - t0
    if lookups.graph is not None:
        save_graph(lookups.graph, out_dir)
    best = load_foundation(out_dir)
    held_out = {"open_val": opened.val, "private_test": private.test, "private_val": private.val}
    report = {
        "data": str(data_dir), "arch": arch, "epochs": epochs, "epochs_trained": len(history["epochs"]),
        "patience": patience, "lr": lr, "domains": domains, "batch_size": batch_size, "seed": seed,
        "device": str(dev),
        "parameters": count_parameters(best), "open_users": int(len(part.open_users)),
        "private_users": int(len(part.private_users)), "private_users_scored": int(len(private_users)),
        "train_rows": len(opened.train), "train_seconds": train_s,
        "samples_per_second": sum(e["samples"] for e in history["epochs"]) / max(train_s, 1e-9),
        "best_epoch": history["best_epoch"], "history": history["epochs"], "interest_graph": graph_stats,
        "evaluation": {},
    }
    groups = {"open_val": opened.group_size, "private_test": private.group_size, "private_val": private.group_size}
    for name, ex in held_out.items():
        g = groups[name]
        report["evaluation"][name] = {
            "pretrained": metrics_of(ex, score_examples(best, ex), g),
            "untrained": metrics_of(ex, score_examples(untrained, ex), g),
            "popularity": metrics_of(ex, popularity_scores(opened.train, ex), g),
            "popularity (count)": metrics_of(ex, count_scores(opened.train, ex), g),
        }
    (Path(out_dir) / "pretrain_report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def _pretrain_choosing_dropout(data_dir, out_dir, *, progress=None, **kw) -> dict:
    """Pre-train one foundation per `AUTO_DROPOUT` candidate next to ``out_dir`` and move the one with the best
    open users' validation AUC there; its report lists every candidate. An interrupted choice resumes: each
    candidate's directory keeps its own resumable state until the choice is made."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    kw.pop("dropout")
    candidates = []
    for d in AUTO_DROPOUT:
        where = out.parent / f".{out.name}.dropout-{d:g}"
        report = pretrain_foundation(data_dir, where, dropout=d, progress=_tagged(progress, d), **kw)
        auc = report["evaluation"]["open_val"]["pretrained"]["auc"]
        candidates.append({"dropout": d, "open_val_auc": auc, "best_epoch": report["best_epoch"],
                           "dir": where, "report": report})
    chosen = max(candidates, key=lambda c: c["open_val_auc"] if math.isfinite(c["open_val_auc"]) else -math.inf)
    report = chosen["report"]
    report["dropout_selection"] = {"candidates": [{k: c[k] for k in ("dropout", "open_val_auc", "best_epoch")}
                                                  for c in candidates],
                                   "chosen": chosen["dropout"], "by": "open users' validation AUC"}
    (chosen["dir"] / "pretrain_report.json").write_text(json.dumps(report, indent=2, default=float))
    # the chosen directory takes out's place in one rename; what out held before goes only after that
    old = out.parent / f".{out.name}.replaced"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(chosen["dir"], out)
    shutil.rmtree(old, ignore_errors=True)
    for c in candidates:
        if c is not chosen:
            shutil.rmtree(c["dir"], ignore_errors=True)
    return report


def dropout_choice(report: dict) -> str | None:
    """One line on what `dropout="auto"` kept and why; None for a foundation pre-trained at one rate."""
    sel = report.get("dropout_selection")
    if not sel:
        return None
    tried = ", ".join(f"{c['open_val_auc']:.4f} at {c['dropout']:g}" for c in sel["candidates"])
    return f"{sel['chosen']:g}, kept on the open users' validation AUC ({tried})"


def _tagged(progress, dropout: float):
    """The progress callback, with the candidate's dropout among the metrics it shows."""
    if progress is None:
        return None
    return lambda epoch, step, total, metrics: progress(epoch, step, total, {"dropout": float(dropout), **metrics})


def check_pretrain_eval(report: dict) -> dict:
    """Whether the pre-trained model beats every reference on private held-out AUC and GAUC (and HR@10 when the
    rows are ranking cases)."""
    ev = report["evaluation"]["private_test"]
    keys = ("auc", "gauc") + (("hr@10",) if "hr@10" in ev["pretrained"] else ())
    return {k: ev["pretrained"][k] > max(r[k] for name, r in ev.items() if name != "pretrained") for k in keys}


