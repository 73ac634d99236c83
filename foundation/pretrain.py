"""Centralised pre-training of the foundation on open users, keeping the best checkpoint and resuming exactly.

Design notes: docs/design/pretraining.md
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import metrics as M
from .batch import TASKS
from .checkpoint import CheckpointError, fsync_path, replace_dir, seal_safetensors, verify_safetensors

RESUME_DIR = ".resume"
BEST_JSON = "best.json"

Progress = Callable[[int, int, "int | None", dict], None]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _primary_column(model: nn.Module) -> tuple[int, int]:
    """(column in model logits, column in batch labels) of the primary task."""
    cfg = getattr(model, "config", None)
    tasks = list(getattr(cfg, "tasks", None) or [TASKS[0]])
    return 0, TASKS.index(tasks[0])


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """AUC, GAUC (+ users counted; needs ``user_id`` in the batches), LogLoss and n on the primary task.

    Examples whose primary label is unobserved (-1) are skipped. The model is put
    in eval mode and left there.
    """
    model.eval()
    dev = _device(model)
    logit_col, label_col = _primary_column(model)
    ys, ps, us = [], [], []
    have_users = True
    for batch in batches:
        out = model(**_to(batch, dev))
        prob = torch.sigmoid(out.logits[:, logit_col].float()).cpu().numpy()
        y = batch["labels"][:, label_col].cpu().numpy()
        keep = y >= 0
        ys.append(y[keep])
        ps.append(prob[keep])
        if "user_id" in batch and have_users:
            us.append(batch["user_id"].cpu().numpy()[keep])
        else:
            have_users = False
    if not ys:
        return {"auc": float("nan"), "gauc": float("nan"), "gauc_users": 0, "logloss": float("nan"), "n": 0}
    y, p = np.concatenate(ys), np.concatenate(ps)
    g = M.gauc(np.concatenate(us), y, p) if have_users and us else M.GAUC(float("nan"), 0, float("nan"))
    return {"auc": M.auc(y, p), "gauc": g.value, "gauc_users": g.users, "logloss": M.logloss(y, p), "n": int(y.size)}


def _fingerprint(model: nn.Module, lr: float, weight_decay: float, seed: int) -> dict:
    cfg = getattr(model, "config", None)
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    cfg_dict.pop("transformers_version", None)
    return {"lr": float(lr), "weight_decay": float(weight_decay), "seed": int(seed),
            "config": json.loads(json.dumps(cfg_dict, sort_keys=True, default=str))}


def _better(auc: float, best: float) -> bool:
    return not math.isnan(auc) and (math.isinf(best) or auc > best)


def _save_best(model: nn.Module, out: Path, epoch: int, metrics: dict) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".best.tmp-", dir=out))
    try:
        model.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        # Everything but the weights first (config is the same every epoch), the weights last:
        # each os.replace is atomic, so out_dir always holds one complete checkpoint.
        weights = [f for f in files if f.endswith(".safetensors")]
        for name in [f for f in files if f not in weights] + weights:
            fsync_path(tmp / name)
            os.replace(tmp / name, out / name)
        _write_json_atomic(out / BEST_JSON, {"epoch": epoch, "metrics": metrics})
        fsync_path(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    fsync_path(tmp)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _save_resume(out: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=f"{RESUME_DIR}.tmp-", dir=out))
    try:
        tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        seal_safetensors(tmp / "model.safetensors")
        torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=_json_default))
        replace_dir(tmp, out / RESUME_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _find_resume(out: Path) -> Path | None:
    d = out / RESUME_DIR
    if (d / "state.json").is_file():
        return d
    # A crash between the two renames of replace_dir leaves only the previous state, under .old-*.
    olds = sorted(out.glob(f".{RESUME_DIR}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((o for o in olds if (o / "state.json").is_file()), None)


def _load_resume(d: Path, model: nn.Module, opt: torch.optim.Optimizer, fingerprint: dict) -> dict:
    from safetensors.torch import load_file

    try:
        state = json.loads((d / "state.json").read_text())
    except Exception as e:
        raise CheckpointError(f"{d / 'state.json'}: unreadable resume state ({e})") from e
    if state.get("fingerprint") != fingerprint:
        diff = [k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k]]
        raise CheckpointError(
            f"{d}: the resume state belongs to a different run (differs in: {', '.join(diff) or 'format'}); "
            "pass resume=False or use another out_dir"
        )
    verify_safetensors(d / "model.safetensors")
    try:
        tensors = load_file(str(d / "model.safetensors"))
        model.load_state_dict(tensors, strict=True)
        extra = torch.load(d / "optimizer.pt", weights_only=True)
        opt.load_state_dict(extra["optimizer"])
    except Exception as e:
        raise CheckpointError(f"{d}: cannot restore the resume state ({type(e).__name__}: {e})") from e
    torch.set_rng_state(extra["torch_rng"])
    if extra.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return state


def pretrain(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[dict]],
    val_batches: Callable[[], Iterable[dict]],
    out_dir: str | Path,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: Progress | None = None,
    resume: bool = True,
    patience: int = 0,
) -> dict:
    """Train ``model`` epoch by epoch, keep the best (val AUC) checkpoint in ``out_dir``; see module docstring.
    ``patience`` > 0 stops early, after that many epochs without a better validation AUC (``epochs`` is then
    the most it trains)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("pretrain: the model has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    fp = _fingerprint(model, lr, weight_decay, seed)
    start, best_auc, best_epoch, history = 0, float("-inf"), None, []
    found = _find_resume(out) if resume else None
    if found is not None:
        st = _load_resume(found, model, opt, fp)
        start, history = int(st["epochs_done"]), list(st["history"])
        best_auc = float(st["best_auc"]) if st["best_auc"] is not None else float("-inf")
        best_epoch = st["best_epoch"]
    else:
        torch.manual_seed(seed)  # dropout and any other torch randomness inside training

    for epoch in range(start, epochs):
        model.train()
        batches = train_batches(epoch)
        total = len(batches) if hasattr(batches, "__len__") else None
        t0, loss_sum, steps, samples = time.perf_counter(), 0.0, 0, 0
        for batch in batches:
            batch = _to(batch, dev)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            samples += int(batch["labels"].shape[0])
            loss_sum += float(loss.detach())
            if progress is not None:
                progress(epoch, steps, total, {"loss": loss_sum / steps})
        seconds = time.perf_counter() - t0
        val = evaluate(model, val_batches())
        improved = _better(val["auc"], best_auc)
        if improved:
            best_auc, best_epoch = val["auc"], epoch
        history.append({"epoch": epoch, "train_loss": loss_sum / max(steps, 1), "steps": steps, "samples": samples,
                        "seconds": seconds, "samples_per_s": samples / seconds if seconds > 0 else float("nan"),
                        "val": val, "best": improved})
        if improved:
            _save_best(model, out, epoch, val)
        _save_resume(out, model, opt, {
            "epochs_done": epoch + 1, "best_auc": None if math.isinf(best_auc) else best_auc,
            "best_epoch": best_epoch, "history": history, "fingerprint": fp,
        })
        if progress is not None:
            progress(epoch, steps, total if total is not None else steps, {f"val_{k}": v for k, v in val.items()})
        if patience > 0 and best_epoch is not None and epoch - best_epoch >= patience:
            break
    return {"epochs": history, "best_epoch": best_epoch,
            "best_auc": None if math.isinf(best_auc) else best_auc, "out_dir": str(out)}
