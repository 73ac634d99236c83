"""Graph-guided interest expansion (recdata/interest_graph.py, after MMBee): the co-view graph, the expansion of
sparse users' histories, and a foundation that carries its graph to every place that builds its rows."""

import numpy as np
import pytest

from fedpa.recdata.interest_graph import build_interest_graph, expand_histories, load_graph, save_graph


def test_the_graph_links_items_viewed_together_and_favours_specific_over_popular_ones():
    # users 0-2 view 1 then 2; every user also views 9 (popular) somewhere; 5 and 6 go together twice
    u = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 6, 6, 7, 8])
    v = np.array([1, 2, 9, 1, 2, 9, 1, 2, 9, 9, 5, 6, 9, 5, 6, 9, 3, 9, 4, 9, 9])
    t = np.arange(len(u))
    g = build_interest_graph(u, t, v, n_items=10, k=3, window=1, min_count=2)
    assert g.shape == (10, 3) and g.dtype == np.int32
    assert g[1, 0] == 2 and g[2, 0] == 1            # 1 and 2 always together: each other's first neighbour
    assert g[5, 0] == 6 and 9 not in g[3] and 9 not in g[4]   # 3 and 4 met 9 once each: below min_count
    assert (g[0] == -1).all()                        # never viewed: no neighbours


def test_expansion_fills_only_empty_slots_with_unseen_neighbours_nearest_the_real_views():
    graph = np.full((10, 3), -1, np.int32)
    graph[4] = [5, 6, 4]
    graph[3] = [7, 5, -1]
    hist = np.array([[0, 0, 0, 0, 3, 4],          # two views (3, then 4 latest), four empty slots
                     [1, 2, 3, 4, 5, 6],          # full: unchanged
                     [0, 0, 0, 0, 0, 0]])         # no views: nothing to expand from
    mask = hist > 0
    new, new_mask = expand_histories(hist, mask, graph, slots=3)
    # 4's neighbours first (5, 6; 4 itself is already seen), then 3's (7; 5 was taken): the strongest nearest
    assert new[0].tolist() == [0, 7, 6, 5, 3, 4] and new_mask[0].tolist() == [False] + [True] * 5
    assert (new[1:] == hist[1:]).all() and (new_mask[1:] == mask[1:]).all()
    two, _ = expand_histories(hist, mask, graph, slots=1)
    assert two[0].tolist() == [0, 0, 0, 5, 3, 4]


def test_a_saved_graph_round_trips_and_a_wrong_file_is_named(tmp_path):
    g = np.arange(12, dtype=np.int32).reshape(4, 3)
    save_graph(g, tmp_path)
    assert (load_graph(tmp_path) == g).all()
    np.save(tmp_path / "interest_graph.npy", np.zeros(3, np.float64))
    with pytest.raises(ValueError, match="not an interest graph"):
        load_graph(tmp_path)
    assert load_graph(tmp_path / "elsewhere") is None


def test_a_foundation_pretrained_with_expansion_ships_its_graph_and_its_rows_use_it(tiny, tmp_path):
    from fedpa.foundation.checkpoint import artifact_digest
    from fedpa.recdata.examples import Lookups
    from fedpa.recdata.partition import SplitConfig, split_users
    from fedpa.recdata.store import Dataset
    from fedpa.simulations.pretraining import pretrain_foundation

    report = pretrain_foundation(tiny, tmp_path / "f", epochs=1, batch_size=1024, graph_expansion=8)
    assert report["interest_graph"]["items_with_neighbours"] > 0 and (tmp_path / "f" / "interest_graph.npy").exists()
    digest = artifact_digest(tmp_path / "f")
    ds = Dataset(tiny)
    lk = Lookups.for_foundation(ds, tmp_path / "f")
    assert lk.expand == 8 and lk.graph is not None
    users = ds.users(["user_id"]).column("user_id").to_numpy()[:40]
    rows = split_users(ds, users, SplitConfig("by-day"), lookups=lk, seed=0).test
    plain = split_users(ds, users, SplitConfig("by-day"), lookups=Lookups.build(ds), seed=0).test
    got, base = rows.batch()["hist_mask"].sum(1), plain.batch()["hist_mask"].sum(1)
    assert (got >= base).all() and (got > base).any() and (got - base).max() <= 8
    # the graph is part of the artifact a device checks: changing it changes the digest
    save_graph(np.zeros_like(lk.graph) - 1, tmp_path / "f")
    assert artifact_digest(tmp_path / "f") != digest
