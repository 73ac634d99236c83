"""Pre-training on the open users of the real `tiny` synthetic dataset."""

import pytest

from fedpa.foundation.model import load_foundation
from fedpa.recdata.partition import PartitionConfig, make_partition
from fedpa.recdata.store import Dataset
from fedpa.simulations.pretraining import pretrain_foundation


@pytest.fixture(scope="module")
def report_and_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "foundation"
    return pretrain_foundation(tiny, out, epochs=3, batch_size=128, seed=0), out


def test_pretrained_beats_untrained_on_held_out_data(report_and_dir):
    report, _ = report_and_dir
    for rows in ("open_val", "private_test"):
        ev = report["evaluation"][rows]
        assert ev["pretrained"]["auc"] > ev["untrained"]["auc"] + 0.05, (rows, ev)
        assert ev["pretrained"]["logloss"] < ev["untrained"]["logloss"], (rows, ev)


def test_trained_on_open_users_only_and_loads_frozen(tiny, report_and_dir):
    report, out = report_and_dir
    part = make_partition(Dataset(tiny), PartitionConfig(seed=0))
    assert report["open_users"] == len(part.open_users) and report["private_users"] == part.num_clients
    assert report["parameters"] <= 10_000_000
    assert 1 <= report["best_epoch"] + 1 <= 3
    model = load_foundation(out)
    assert not any(p.requires_grad for p in model.parameters())


def test_count_popularity_ranks_items_by_their_training_clicks_with_ties_against_the_held_out_item():
    import numpy as np

    from fedpa.simulations.pretraining import count_scores, metrics_of

    class Rows:  # the two fields count_scores reads
        def __init__(self, video_id, labels):
            self.video_id, self.labels = np.array(video_id), np.array(labels, np.int8).reshape(-1, 1)

    train = Rows([1, 1, 1, 2, 3, 3], [1, 1, 0, 1, 0, 1])
    held = Rows([1, 2, 3, 4], [1, 0, 0, 0])
    assert count_scores(train, held).tolist() == [2.0, 1.0, 1.0, 0.0]
    held.user_id = np.zeros(4, np.int64)
    cases = metrics_of(held, np.array([1.0, 1.0, 0.5, 0.2]), group_size=4)   # a tie with one negative
    assert cases["hr@10"] == 1.0 and cases["ndcg@10"] == pytest.approx(1 / np.log2(3))   # ranked second


def test_dropout_trains_the_user_encoder_and_the_checkpoint_scores_deterministically(tiny, tmp_path):
    """`fedpa pretrain --dropout`: dropout in the user encoder while it trains (another model than without it), kept
    in the checkpoint's config, and off wherever the checkpoint is loaded (frozen, eval mode)."""
    import json

    import torch

    from fedpa.recdata.examples import Lookups
    from fedpa.recdata.partition import SplitConfig, split_users

    plain = pretrain_foundation(tiny, tmp_path / "plain", epochs=1, batch_size=128, seed=0)
    dropped = pretrain_foundation(tiny, tmp_path / "dropout", epochs=1, batch_size=128, seed=0, dropout=0.3)
    assert json.loads((tmp_path / "dropout" / "config.json").read_text())["dropout"] == 0.3
    assert dropped["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
    model = load_foundation(tmp_path / "dropout")
    assert model.user_encoder.bert.config.hidden_dropout_prob == 0.3
    assert not any(m.training for m in model.modules())
    ds = Dataset(tiny)
    part = make_partition(ds, PartitionConfig(seed=0))
    rows = split_users(ds, part.private_users[:5], SplitConfig("by-day"), lookups=Lookups.build(ds), seed=0).test
    batch = rows.batch()
    with torch.no_grad():   # called as loaded (no .eval() of ours): no dropout, the same logits twice
        first, second = model(**batch).logits, model(**batch).logits
    assert len(first) and torch.equal(first, second)


def test_dropout_auto_keeps_the_candidate_best_on_the_open_users_validation(tiny, tmp_path):
    """`fedpa pretrain`'s default: one foundation per candidate, the one with the best open users' validation AUC
    kept — the very checkpoint that rate gives alone — in place of what the directory held; nothing else left."""
    import json

    import torch

    from fedpa.simulations.pretraining import AUTO_DROPOUT

    out = tmp_path / "foundation"
    out.mkdir()
    (out / "stale.txt").write_text("a foundation pre-trained before")
    report = pretrain_foundation(tiny, out, epochs=1, batch_size=128, seed=0, dropout="auto")
    sel = report["dropout_selection"]
    tried = {c["dropout"]: c["open_val_auc"] for c in sel["candidates"]}
    assert tuple(tried) == AUTO_DROPOUT and len(set(tried.values())) == 2
    assert sel["chosen"] == max(tried, key=tried.get)
    assert json.loads((out / "config.json").read_text())["dropout"] == sel["chosen"]
    written = json.loads((out / "pretrain_report.json").read_text())
    assert written["dropout_selection"]["chosen"] == sel["chosen"]
    assert written["evaluation"]["open_val"]["pretrained"]["auc"] == tried[sel["chosen"]]
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foundation"], "no candidate or old directory left"

    alone = pretrain_foundation(tiny, tmp_path / "alone", epochs=1, batch_size=128, seed=0, dropout=sel["chosen"])
    assert alone["evaluation"]["open_val"]["pretrained"]["auc"] == tried[sel["chosen"]]
    kept, direct = load_foundation(out).state_dict(), load_foundation(tmp_path / "alone").state_dict()
    assert all(torch.equal(kept[k], direct[k]) for k in direct)
