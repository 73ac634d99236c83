"""Graph-guided interest expansion for sparse users (after MMBee, Kuaishou, arXiv 2407.00056).

A user with few views gives the foundation's user encoder little to read. MMBee expands such users' behaviour
sequences along metapaths of a large interaction graph, so that they borrow from behaviourally similar items
and users. Here the graph is item-to-item co-viewing (the user -> item -> item metapath): two items are
neighbours when the same users view them within ``window`` views of each other, weighted by the co-view count
over sqrt(views of each) so that popular items do not become everybody's neighbour. It is built from the **open
users' training views only** (the data pre-training already reads centrally; no private user and no held-out
row enters it), ships with the foundation (``interest_graph.npy``: ``k`` neighbours per item, -1 = none), and
`expand_histories` fills the empty slots of a short history with the neighbours of its most recent views.

Plain numpy: the same expansion runs in pre-training, in the simulation's feature cache and on a device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

GRAPH_FILE = "interest_graph.npy"


def build_interest_graph(user_id: np.ndarray, timestamp: np.ndarray, video_id: np.ndarray, n_items: int, *,
                         k: int = 10, window: int = 3, min_count: int = 2) -> np.ndarray:
    """[n_items, k] int32 neighbours (best first, -1 padded) from effective views (user, time, item)."""
    order = np.lexsort((timestamp, user_id))
    u, v = np.asarray(user_id, np.int64)[order], np.asarray(video_id, np.int64)[order]
    src, dst = [], []
    for d in range(1, window + 1):
        same = u[d:] == u[:-d]
        a, b = v[:-d][same], v[d:][same]
        keep = a != b
        src += [a[keep], b[keep]]
        dst += [b[keep], a[keep]]
    graph = np.full((n_items, k), -1, np.int32)
    if not src or not sum(len(s) for s in src):
        return graph
    src, dst = np.concatenate(src), np.concatenate(dst)
    pair, count = np.unique(src * n_items + dst, return_counts=True)
    a, b = pair // n_items, pair % n_items
    strong = count >= min_count
    a, b, count = a[strong], b[strong], count[strong].astype(np.float64)
    views = np.bincount(v, minlength=n_items).astype(np.float64)
    weight = count / np.sqrt(views[a] * views[b])
    by = np.lexsort((-weight, a))                      # per source item, the strongest neighbours first
    a, b = a[by], b[by]
    first = np.searchsorted(a, a, side="left")
    rank = np.arange(len(a)) - first
    top = rank < k
    graph[a[top], rank[top]] = b[top]
    return graph


def save_graph(graph: np.ndarray, directory: str | Path) -> Path:
    path = Path(directory) / GRAPH_FILE
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.asarray(graph, np.int32), allow_pickle=False)
    tmp.replace(path)
    return path


def load_graph(directory: str | Path) -> np.ndarray | None:
    """The foundation's interest graph, or None when it was pre-trained without one."""
    path = Path(directory) / GRAPH_FILE
    if not path.exists():
        return None
    graph = np.load(path, allow_pickle=False)
    if graph.ndim != 2 or graph.dtype != np.int32:
        raise ValueError(f"{path}: not an interest graph (expected a 2-d int32 array, got {graph.dtype} "
                         f"{graph.shape})")
    return graph


def expand_histories(hist_vid: np.ndarray, mask: np.ndarray, graph: np.ndarray, slots: int,
                     recent: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Fill up to ``slots`` empty slots of each left-padded history (real views on the right) with the graph
    neighbours of its ``recent`` most recent views, the strongest neighbours of the latest view nearest to the
    real views; items already in the history are skipped. Rows without views, or without empty slots, are
    unchanged. Returns new (hist_vid, mask)."""
    hist_vid, mask = hist_vid.copy(), mask.copy()
    rows, length = hist_vid.shape
    n_views = mask.sum(axis=1)
    want = np.minimum(slots, length - n_views)
    todo = np.nonzero((n_views > 0) & (want > 0))[0]
    if not len(todo):
        return hist_vid, mask
    k = graph.shape[1]
    m = min(recent, length)
    last = hist_vid[todo, length - m:][:, ::-1]                          # latest first
    present = mask[todo, length - m:][:, ::-1]
    cand = graph[np.where(present, last, 0)]                            # [rows, m, k]
    cand = np.where(present[..., None], cand, -1).reshape(len(todo), m * k).astype(np.int64)
    # keep a candidate once (its first, strongest place), and never one the history already holds
    order = np.argsort(cand, axis=1, kind="stable")
    ranked = np.take_along_axis(cand, order, axis=1)
    repeat = np.zeros_like(cand, dtype=bool)
    np.put_along_axis(repeat, order, np.c_[np.zeros((len(todo), 1), bool), ranked[:, 1:] == ranked[:, :-1]], axis=1)
    held = hist_vid[todo][:, None, :] == cand[:, :, None]               # [rows, m*k, length]
    held = (held & mask[todo][:, None, :]).any(axis=2)
    fresh = (cand >= 0) & ~repeat & ~held
    rank = np.cumsum(fresh, axis=1) - 1                                 # the j-th usable candidate of its row
    take = fresh & (rank < want[todo][:, None])
    r, j = np.nonzero(take)
    rows_ = todo[r]
    slot = (length - n_views[rows_]) - 1 - rank[r, j]                   # the strongest next to the real views
    hist_vid[rows_, slot] = cand[r, j]
    mask[rows_, slot] = True
    return hist_vid, mask
