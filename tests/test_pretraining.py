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
