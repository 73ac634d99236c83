"""`fedpa export`: one user's personalized model as ONNX (fp32 and int8) for on-device inference.

The run directory gives the configuration (dataset, foundation, algorithm) and the last shared
state; the encrypted personal store gives the user's private adapters; `merge_for_user` folds
both into a dense model, which `foundation.export` traces. Before anything is kept the export is
checked: onnxruntime's fp32 probabilities must match PyTorch's within 1e-4 on the user's own
test-day rows, else the files are removed and the command fails. The int8 model's deviation and
the latency of scoring one request's 120 candidates are measured and written to ``export.json``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch

from fedpa.common.config import FederationConfig
from fedpa.common.files import atomic_write_json
from fedpa.common.models import build_personal_model
from fedpa.foundation.adapters import merge_for_user
from fedpa.foundation.errors import FedpaError
from fedpa.foundation.export import export_onnx, onnx_probabilities, quantize_onnx, scoring_latency, torch_probabilities
from fedpa.foundation.metrics import auc
from fedpa.recmodels.item_bias import WithItemBias
from fedpa.recmodels.personalization import get_algorithm
from fedpa.server.rundir import RunDir

PARITY_TOLERANCE = 1e-4
CANDIDATES = 120  # RecFlow's re-ranking input size: one request's candidates, scored in one call


def _private_state(cfg: FederationConfig, user: int, store_dir: str | None, key_file: str | None):
    from fedpa.client.personal_store import ENV_VAR, PersonalStore

    directory = store_dir or cfg.personal_store
    if not directory:
        raise FedpaError(f"'{cfg.algorithm}' keeps a private part per user, and this run kept it in memory: "
                         "pass --store (and --key-file), or rerun with a personal store (personal-store = DIR)")
    key = key_file or cfg.personal_store_key_file
    store = PersonalStore.from_key_file(directory, key) if key else PersonalStore.from_env(directory)
    found = store.load(user)
    if found is None:
        raise FedpaError(f"user {user} has no personal state in {directory} (not a client of this run, or the run "
                         f"has not finished its last round); key from {key or 'the environment variable ' + ENV_VAR}")
    arrays, meta = found
    if store.last_recovery is not None:   # training may fall back; an export pairs the run's final shared state
        raise FedpaError(f"user {user}'s current personal state is unusable ({store.last_recovery}); the export "
                         f"refuses to pair the previous version (round {meta.get('round')}) with the run's final "
                         "shared state: restore the file, or let the user train another round")
    if meta.get("algorithm") not in (None, cfg.algorithm):
        raise FedpaError(f"user {user}'s personal state was trained with '{meta.get('algorithm')}', "
                         f"the run with '{cfg.algorithm}'")
    return arrays


def user_batches(cfg: FederationConfig, user: int, domain: int | None = None):
    """The user's test-day rows (parity and the int8 check) and one request's 120 candidates (latency); with
    ``domain`` (a code), that domain's rows and items only."""
    from fedpa.recdata.examples import Lookups
    from fedpa.recdata.partition import SplitConfig, split_users
    from fedpa.recdata.store import Dataset

    ds = Dataset(cfg.data_dir)
    lookups = Lookups.for_foundation(ds, cfg.foundation)
    if not 0 <= user < len(lookups.user_table):
        raise FedpaError(f"user {user} is not in {cfg.data_dir} (user ids 0..{len(lookups.user_table) - 1})")
    splits = split_users(ds, np.array([user]), SplitConfig(cfg.split, negatives=cfg.negatives),
                         lookups=lookups, seed=cfg.seed)
    pool = np.arange(1, len(lookups.item_table))
    if domain is not None:
        inside = lambda ex: ex.subset(np.nonzero(ds.domain_of(ex.video_id) == domain)[0])  # noqa: E731
        splits = type(splits)(inside(splits.train), splits.val, inside(splits.test), splits.group_size)
        pool = pool[ds.domain_of(pool) == domain]
    rows = [b for b in splits.test.iter_batches(256)] or [b for b in splits.train.iter_batches(256)]
    if not rows:
        raise FedpaError(f"user {user} has no rows in {cfg.data_dir}{' in that domain' if domain else ''} to check "
                         "the export on")
    test = {k: torch.cat([b[k] for b in rows]) for k in rows[0] if isinstance(rows[0][k], torch.Tensor)}
    one = {k: v[:1] for k, v in test.items()}
    rng = np.random.default_rng(user)
    items = torch.as_tensor(lookups.item_table[rng.choice(pool, size=CANDIDATES)])
    request = {k: v.expand(CANDIDATES, *v.shape[1:]).contiguous() for k, v in one.items()}
    request["item"] = items
    return test, request, lookups.user_table[user]


def _domain_code(cfg: FederationConfig, pm, domain: str | None) -> int | None:
    """The code of the domain a model is exported for: a run with a domain-specific path folds one per domain."""
    from fedpa.recdata.store import Dataset

    has_path = getattr(pm, "item_domains", None) is not None
    if domain is None:
        if has_path:
            raise FedpaError(f"this run has a domain-specific path: export one model per domain (--domain, one of "
                             f"{', '.join(Dataset(cfg.data_dir).domains)})")
        return None
    if not has_path:
        raise FedpaError("--domain chooses the domain path to fold, but this run has none (--domain-adapters)")
    return Dataset(cfg.data_dir).domain_codes(domain)[0]


def export_user(run_dir: str | Path, user: int, out: str | Path, *, store_dir: str | None = None,
                key_file: str | None = None, int8: bool = True, domain: str | None = None) -> dict:
    run_dir, out = Path(run_dir), Path(out)
    cfg = FederationConfig.from_run_dir(run_dir)
    algorithm = get_algorithm(cfg.algorithm)
    if algorithm.centralized:
        raise FedpaError("a 'centralized' run keeps no per-user state to export")
    if cfg.stage:
        raise FedpaError(f"{run_dir} personalized the '{cfg.stage}' stage head; export writes the foundation's "
                         "scorer (a run without --stages)")
    pm = build_personal_model(cfg)
    code = _domain_code(cfg, pm, domain)
    test, request, profile = user_batches(cfg, user, code)
    if pm.model is None:
        model = pm.foundation
    else:
        if algorithm.communicates:
            _, shared, _ = RunDir(run_dir).load_checkpoint()
            missing = sorted(set(pm.get_shared()) - set(shared))
            if missing:
                raise FedpaError(f"{run_dir}: the checkpoint lacks shared entries the model needs, e.g. {missing[0]} "
                                 "(another foundation or configuration?)")
            pm.set_shared(shared)
        if pm.initial_private:
            pm.set_private(_private_state(cfg, user, store_dir, key_file))
        model = merge_for_user(pm.model, 0, pm.group_values(profile), domain=code)
        if pm.item_bias is not None:  # the run's shared item-side tables travel with the merged model
            model = WithItemBias(model, copy.deepcopy(pm.item_bias).requires_grad_(False)).eval()
    out.mkdir(parents=True, exist_ok=True)
    fp32_path = export_onnx(model, request, out / "model.onnx")
    reference = torch_probabilities(model, test)
    got = onnx_probabilities(fp32_path, test)
    parity = float(np.max(np.abs(got - reference)))
    if not parity <= PARITY_TOLERANCE:
        fp32_path.unlink(missing_ok=True)
        raise FedpaError(f"the ONNX model differs from PyTorch by {parity:.2e} (> {PARITY_TOLERANCE:g}) on user "
                         f"{user}'s rows; nothing was kept")
    report = {"run": str(run_dir), "user": user, "algorithm": cfg.algorithm, "domain": domain,
              "rows_checked": int(len(reference)),
              "tasks": list(pm.foundation.config.tasks),
              "fp32": {"path": str(fp32_path), "bytes": os.path.getsize(fp32_path), "max_abs_diff_vs_torch": parity,
                       "latency_120": scoring_latency(fp32_path, request)}}
    labels = test["labels"][:, pm.foundation.label_columns[0]].numpy() if "labels" in test else None
    if int8:
        q_path = quantize_onnx(fp32_path, out / "model.int8.onnx")
        q = onnx_probabilities(q_path, test)
        report["int8"] = {"path": str(q_path), "bytes": os.path.getsize(q_path),
                          "max_abs_diff_vs_fp32": float(np.max(np.abs(q - got))),
                          "latency_120": scoring_latency(q_path, request)}
        seen = labels is not None and (labels >= 0).any() and len(set(labels[labels >= 0].tolist())) == 2
        if seen:
            mask = labels >= 0
            report["int8"]["user_auc"] = auc(labels[mask], q[mask, 0])
            report["fp32"]["user_auc"] = auc(labels[mask], got[mask, 0])
    atomic_write_json(out / "export.json", report)
    return report
