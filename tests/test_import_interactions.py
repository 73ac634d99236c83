"""`fedpa data import-interactions`: generic logs (CSV / Parquet) with a column mapping."""

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fedpa.recdata.import_interactions import KUAISAR_R, Mapping, import_interactions
from fedpa.recdata.store import Dataset, DatasetError
from fedpa.simulations.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
DAY = 86_400_000
T0 = 1_685_000_000_000  # 2023-05-25T07:33:20Z


def _write(tmp: Path, *, fmt: str = "csv", log=None, users=None, items=None) -> dict[str, Path]:
    log = log or {"uid": [20, 20, 20, 7, 7, 20], "vid": [500, 501, 502, 500, 503, 504],
                  "ts": [T0, T0, T0 + 10, T0 + 5, T0 + DAY, T0 + DAY + 1.0], "click": [1, 0, 1, 0, 1, 1],
                  "like": [0, 0, 1, 0, 0, 1]}
    users = users or {"uid": [7, 20, 33], "level": [1, 3, 2], "seg": [0, 1, 1]}
    items = items or {"vid": [500, 501, 502, 503, 504, 505], "cat1": [1, 1, 2, 3, 2, 4],
                      "cat2": [10, 11, 20, 30, 21, 40],
                      "kind": [0, 1, 0, 0, 1, 1]}
    paths = {}
    for name, cols in (("log", log), ("users", users), ("items", items)):
        t = pa.table(cols)
        p = tmp / f"{name}.{fmt}"
        (pq.write_table if fmt == "parquet" else pcsv.write_csv)(t, p)
        paths[name] = p
    return paths


MAP = Mapping(user="uid", item="vid", timestamp="ts", labels={"effective_view": "click", "like": "like"},
              item_columns={"category_level_one": "cat1", "category_level_two": "cat2", "kind": "kind"})


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_log_becomes_requests_exposures_users_and_items(tmp_path, fmt):
    f = _write(tmp_path, fmt=fmt)
    ds = Dataset(import_interactions(f["log"], tmp_path / "out", MAP, users=f["users"], items=f["items"]))
    assert ds.days == ["2023-05-25", "2023-05-26"]
    users = ds.users()
    assert users.column("orig_user_id").to_pylist() == [7, 20, 33]        # renumbered in id order, all kept
    assert users.column("level").to_pylist() == [1, 3, 2] and "seg" in ds.user_features
    items = ds.items()
    assert items.column("orig_video_id").to_pylist() == [500, 501, 502, 503, 504, 505]
    assert items.column("category_level_two").to_pylist() == [10, 11, 20, 30, 21, 40]
    assert items.column("kind").to_pylist() == [0, 1, 0, 0, 1, 1]
    d1 = ds.day("exposures", "2023-05-25")
    # user 20's two rows at T0 share one request; its row at T0+10 is another; user 7 at T0+5 a third
    req = dict(zip(zip(d1.column("user_id").to_pylist(), d1.column("request_timestamp").to_pylist()),
                   d1.column("request_id").to_pylist()))
    assert len(set(req.values())) == 3 and req[(1, T0)] < req[(0, T0 + 5)] < req[(1, T0 + 10)]
    rows = d1.to_pylist()
    assert {(r["user_id"], r["video_id"], r["effective_view"], r["like"], r["comment"]) for r in rows} == {
        (1, 0, 1, 0, -1), (1, 1, 0, 0, -1), (1, 2, 1, 1, -1), (0, 0, 0, 0, -1)}
    assert ds.day("requests", "2023-05-25").num_rows == 3


def test_kuaisar_mapping_file_is_the_documented_one():
    assert Mapping.from_toml(REPO / "recdata/mappings/kuaisar-r.toml") == KUAISAR_R


@pytest.mark.parametrize("change, message", [
    (dict(log={"uid": [1], "vid": [500], "click": [1], "like": [0]}), "column 'ts' (timestamp) is missing"),
    (dict(log={"uid": ["x"], "vid": [500], "ts": [T0], "click": [1], "like": [0]}), "lacks (e.g. user 'x')"),
    (dict(log={"uid": [7], "vid": [500], "ts": [T0], "click": [0.5], "like": [0]}), "holds 0.5, not an integer"),
    (dict(log={"uid": [7], "vid": [500], "ts": [T0], "click": [2], "like": [0]}), "labels must be 0 or 1"),
    (dict(users={"uid": [7, 7, 20], "level": [1, 1, 1], "seg": [0, 0, 0]}), "user id 7 appears 2 times"),
    (dict(log={"uid": [99], "vid": [500], "ts": [T0], "click": [1], "like": [0]}), "name a user that"),
    (dict(users={"uid": [7, 20], "level": [1, -3], "seg": [0, 0]}), "values must be >= 0"),
])
def test_bad_input_names_file_and_column_and_keeps_the_old_dataset(tmp_path, change, message):
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = _write(tmp_path / "good")
    out = tmp_path / "out"
    import_interactions(good["log"], out, MAP, users=good["users"], items=good["items"])
    before = sorted(p.name for p in out.rglob("*"))
    bad = _write(tmp_path / "bad", **change)
    with pytest.raises(DatasetError, match=re.escape(message)) as e:
        import_interactions(bad["log"], out, MAP, users=bad["users"], items=bad["items"], overwrite=True)
    assert str(tmp_path / "bad") in str(e.value)
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing replaced, nothing half-written


def test_iso_timestamps_and_unparsable_ones(tmp_path):
    f = _write(tmp_path, log={"uid": [7, 20], "vid": [500, 501], "ts": ["2023-05-25T10:00:00", "2023-05-26T01:00:00"],
                              "click": [1, 0], "like": [0, 0]})
    iso = Mapping(**{**MAP.__dict__, "time_unit": "iso"})
    assert Dataset(import_interactions(f["log"], tmp_path / "ok", iso, users=f["users"], items=f["items"])).days == [
        "2023-05-25", "2023-05-26"]
    (tmp_path / "g").mkdir()
    g = _write(tmp_path / "g", log={"uid": [7], "vid": [500], "ts": ["yesterday"], "click": [1], "like": [0]})
    with pytest.raises(DatasetError, match="not an ISO date-time"):
        import_interactions(g["log"], tmp_path / "no", iso, users=g["users"], items=g["items"])


def test_cli_with_flags_and_without_feature_tables(tmp_path):
    f = _write(tmp_path)
    r = runner.invoke(app, ["data", "import-interactions", str(f["log"]), "--out", str(tmp_path / "d"),
                            "--user-col", "uid", "--item-col", "vid", "--time-col", "ts",
                            "--label", "effective_view=click"])
    assert r.exit_code == 0, r.output
    ds = Dataset(tmp_path / "d")
    assert ds.users().num_rows == 2 and ds.items().num_rows == 5  # only those that interacted
    r = runner.invoke(app, ["data", "import-interactions", str(f["log"]), "--out", str(tmp_path / "e"),
                            "--label", "watched=click"])
    assert r.exit_code == 2 and "unknown label" in r.output
    np.testing.assert_array_equal(ds.day("exposures", "2023-05-25").column("like").to_numpy(), -1)


def test_sequences_of_imported_users_never_see_the_future(tmp_path):
    """MRFF's protocol (split 'last'): a user's test row sees only clicks strictly before it."""
    from toy_data import assert_sequences_precede_requests

    from fedpa.recdata.partition import SplitConfig, split_users
    from fedpa.recdata.schema import SEQ_LEN

    rng = np.random.default_rng(0)
    n = 60
    log = {"uid": [7] * n, "vid": rng.integers(500, 506, n).tolist(), "ts": [T0 + 60_000 * i for i in range(n)],
           "click": rng.integers(0, 2, n).tolist(), "like": [0] * n}
    f = _write(tmp_path, log=log)
    ds = Dataset(import_interactions(f["log"], tmp_path / "out", MAP, users=f["users"], items=f["items"]))
    s = split_users(ds, np.array([0]), SplitConfig("last"))
    assert len(s.test) == 1 and len(s.val) == 1
    for ex in (s.train, s.val, s.test):
        assert_sequences_precede_requests(ex)
    # the test row (the last interaction) sees every earlier click, up to the sequence length
    earlier_clicks = sum(log["click"][:-1])
    assert int(s.test.batch()["hist_mask"].sum()) == min(SEQ_LEN, earlier_clicks)


def test_implicit_feedback_filter_and_list_positions(tmp_path):
    """PFedRec's protocol: clicks only, users with at least two here, the catalogue = the clicked items; each
    row keeps its place within its request in the file, and leave-one-out holds out the one listed first."""
    from fedpa.recdata.import_interactions import RowFilter
    from fedpa.recdata.partition import SplitConfig, split_users

    log = {"uid": [20, 20, 20, 20, 20, 7, 7, 9, 9],
           "vid": [504, 501, 502, 500, 503, 507, 508, 505, 506],
           "ts": [T0, T0 + 10, T0 + 20, T0 + 20, T0 + 20, T0, T0 + 1, T0, T0 + 5],
           "click": [1, 1, 1, 1, 1, 1, 0, 1, 1], "like": [0] * 9}
    items = {"vid": list(range(500, 510)), "cat1": [1] * 10, "cat2": [10] * 10, "kind": [0] * 10}
    f = _write(tmp_path, log=log, users={"uid": [7, 9, 20, 33], "level": [1, 1, 3, 2], "seg": [0, 0, 1, 1]},
               items=items)
    ds = Dataset(import_interactions(f["log"], tmp_path / "out", MAP, users=f["users"], items=f["items"],
                                     rows=RowFilter(positives_only=True, min_user_positives=2, interacted_only=True)))
    assert ds.users().column("orig_user_id").to_pylist() == [9, 20]            # 7 has one click, 33 none
    assert ds.items().column("orig_video_id").to_pylist() == [500, 501, 502, 503, 504, 505, 506]  # clicked ones
    ex = ds.day("exposures", "2023-05-25").to_pylist()
    assert all(r["effective_view"] == 1 for r in ex) and len(ex) == 7
    last = {r["video_id"]: r["rerank_index"] for r in ex if r["user_id"] == 1 and r["request_timestamp"] == T0 + 20}
    assert last == {2: 0, 0: 1, 3: 2}                          # file order 502, 500, 503 within the request
    s = split_users(ds, np.array([1]), SplitConfig("loo", negatives=1), seed=0)
    assert s.test.video_id[0] == 2 and s.val.video_id[0] == 0  # the request listed 502 first, then 500
    assert sorted(s.train.video_id[s.train.labels[:, 0] == 1].tolist()) == [1, 3, 4]


def test_k_core_drops_users_and_items_in_turn_until_both_bounds_hold(tmp_path):
    """Users and items with at least 2 clicks each: dropping item 503 (one click) takes user 9 below 2, which
    takes item 502 below 2, which takes user 7 below 2, which takes item 504 below 2; one pass over each bound
    would have kept them."""
    from fedpa.recdata.import_interactions import RowFilter

    rows = [(20, 500), (20, 501), (20, 504), (33, 500), (33, 501), (7, 502), (7, 504), (9, 502), (9, 503),
            (33, 505)]
    log = {"uid": [u for u, _ in rows], "vid": [v for _, v in rows], "ts": [T0 + k for k in range(len(rows))],
           "click": [1] * len(rows), "like": [0] * len(rows)}
    log["click"][-1] = 0   # 33's view of 505 is not a click: 505 has no positive row
    items = {"vid": list(range(500, 506)), "cat1": [1] * 6, "cat2": [10] * 6, "kind": [0] * 6}
    f = _write(tmp_path, log=log, users={"uid": [7, 9, 20, 33], "level": [1, 1, 3, 2], "seg": [0, 0, 1, 1]},
               items=items)
    core = RowFilter(positives_only=True, min_user_positives=2, min_item_positives=2, interacted_only=True)
    keep = core.apply(np.array(log["click"]), np.array(log["uid"]), np.array(log["vid"]))
    counts = {}
    for (u, v), k in zip(rows, keep):
        if k:
            counts.setdefault(u, set()).add(v)
    assert counts == {20: {500, 501}, 33: {500, 501}}
    ds = Dataset(import_interactions(f["log"], tmp_path / "out", MAP, users=f["users"], items=f["items"], rows=core))
    assert ds.users().column("orig_user_id").to_pylist() == [20, 33]
    assert ds.items().column("orig_video_id").to_pylist() == [500, 501]
    # the users' bound alone is one pass: 9 and 7 keep their clicks
    users_only = RowFilter(positives_only=True, min_user_positives=2)
    kept_users = set(np.array(log["uid"])[users_only.apply(np.array(log["click"]), np.array(log["uid"]),
                                                           np.array(log["vid"]))].tolist())
    assert kept_users == {20, 33, 7, 9}
    # the same core from the command line; a negative bound is refused by name
    args = ["data", "import-interactions", str(f["log"]), "--user-col", "uid", "--item-col", "vid", "--time-col",
            "ts", "--label", "effective_view=click", "--users", str(f["users"]), "--items", str(f["items"]),
            "--positives-only", "--interacted-only", "--min-user-positives", "2"]
    r = runner.invoke(app, [*args, "--min-item-positives", "2", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert Dataset(tmp_path / "cli").users().column("orig_user_id").to_pylist() == [20, 33]
    r = runner.invoke(app, [*args, "--min-item-positives", "-1", "--out", str(tmp_path / "neg")])
    assert r.exit_code != 0 and "--min-item-positives must be >= 0" in r.output
    assert not (tmp_path / "neg").exists()


def _amazon_like(tmp: Path) -> dict[str, Path]:
    """A review log as public data sets ship it: text ids (reviewer ids, ASINs), 1-5 ratings, seconds, and an
    item table with a text category (one missing) and a text brand."""
    log = {"reviewerID": ["A2X", "A10", "A2X", "B7", "A10", "A2X"],
           "asin": ["B00C", "B00A", "B00A", "B00B", "B00C", "B00D"],
           "overall": [5.0, 3.0, 4.0, 1.0, 4.5, 2.0],
           "unixReviewTime": [1_400_000_000, 1_400_000_100, 1_400_086_400, 1_400_000_050, 1_400_086_500,
                              1_400_172_800]}
    items = pa.table({"asin": ["B00D", "B00A", "B00B", "B00C", "B00E"],
                      "main_cat": ["Beauty", "All Beauty", None, "Beauty", "Tools"],
                      "brand": ["x", "y", "x", "", "z"], "price_cents": [100, 250, 0, 399, 5]})
    paths = {"log": tmp / "reviews.csv", "items": tmp / "meta.parquet"}
    pcsv.write_csv(pa.table(log), paths["log"])
    pq.write_table(items, paths["items"])
    return paths


AMAZON = Mapping(user="reviewerID", item="asin", timestamp="unixReviewTime", time_unit="s",
                 labels={"effective_view": "overall >= 4"},
                 item_columns={"category_level_one": "main_cat", "brand": "brand", "price_cents": "price_cents"})


def test_text_ids_text_features_and_a_rating_threshold(tmp_path):
    """Public logs name users and items by text and rate them 1-5: ids renumbered in sorted text order with the
    originals kept as text, text features coded 1..n in sorted order (0 = missing) with their vocabulary
    written beside the data, and the label read as rating >= 4."""
    import json

    f = _amazon_like(tmp_path)
    ds = Dataset(import_interactions(f["log"], tmp_path / "out", AMAZON, items=f["items"]))
    users = ds.users()
    assert users.column("orig_user_id").to_pylist() == ["A10", "A2X", "B7"]          # sorted as text
    assert users.column("orig_user_id").type == pa.string()
    items = ds.items()
    assert items.column("orig_video_id").to_pylist() == ["B00A", "B00B", "B00C", "B00D", "B00E"]
    # "All Beauty" < "Beauty" < "Tools"; B00B's category is missing, B00C's brand empty: both 0
    assert items.column("category_level_one").to_pylist() == [1, 0, 2, 2, 3]
    assert items.column("brand").to_pylist() == [2, 1, 0, 1, 3]
    assert items.column("price_cents").to_pylist() == [250, 0, 399, 100, 5]
    assert json.loads((ds.path / "vocabularies.json").read_text()) == {
        "users": {}, "items": {"category_level_one": ["All Beauty", "Beauty", "Tools"], "brand": ["x", "y", "z"]}}
    rows = pa.concat_tables([ds.day("exposures", d) for d in ds.days]).to_pylist()
    got = {(users.column("orig_user_id")[r["user_id"]].as_py(), items.column("orig_video_id")[r["video_id"]].as_py()):
           r["effective_view"] for r in rows}
    assert got == {("A2X", "B00C"): 1, ("A10", "B00A"): 0, ("A2X", "B00A"): 1, ("B7", "B00B"): 0,
                   ("A10", "B00C"): 1, ("A2X", "B00D"): 0}
    assert ds.manifest["mapping"]["labels"] == {"effective_view": "overall >= 4"}
    # a user's rows split and a device's copy of them keep working on text ids
    from fedpa.recdata.partition import SplitConfig, split_users
    from fedpa.recdata.subset import write_user_subset

    s = split_users(ds, np.array([1]), SplitConfig("chrono"))
    assert len(s.train) + len(s.val) + len(s.test) == 3
    sub = Dataset(write_user_subset(ds, [1], tmp_path / "device"))
    assert sub.users().column("orig_user_id").to_pylist() == ["A2X"]


def test_implicit_logs_and_label_mistakes(tmp_path):
    f = _amazon_like(tmp_path)
    implicit = Mapping(**{**AMAZON.__dict__, "labels": {"effective_view": "label"}, "implicit": True})
    ds = Dataset(import_interactions(f["log"], tmp_path / "imp", implicit, items=f["items"]))
    ex = pa.concat_tables([ds.day("exposures", d) for d in ds.days])
    np.testing.assert_array_equal(ex.column("effective_view").to_numpy(), 1)
    np.testing.assert_array_equal(ex.column("like").to_numpy(), -1)                 # unmapped: not observed
    assert ds.manifest["mapping"]["implicit"] is True
    # the same from a TOML mapping and from the command line
    (tmp_path / "map.toml").write_text('[interactions]\nuser = "reviewerID"\nitem = "asin"\n'
                                       'timestamp = "unixReviewTime"\ntime_unit = "s"\nimplicit = true\n')
    assert Mapping.from_toml(tmp_path / "map.toml").implicit
    r = runner.invoke(app, ["data", "import-interactions", str(f["log"]), "--out", str(tmp_path / "cli"),
                            "--mapping", str(tmp_path / "map.toml")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "import-interactions", str(f["log"]), "--out", str(tmp_path / "cli2"),
                            "--user-col", "reviewerID", "--item-col", "asin", "--time-col", "unixReviewTime",
                            "--time-unit", "s", "--label", "effective_view=overall>=4"])
    assert r.exit_code == 0, r.output
    assert Dataset(tmp_path / "cli2").manifest["mapping"]["labels"] == {"effective_view": "overall>=4"}
    # mistakes are named
    from fedpa.foundation.errors import FedpaError

    both = Mapping(**{**AMAZON.__dict__, "implicit": True})
    with pytest.raises(FedpaError, match="implicit .* also names a column for effective_view"):
        import_interactions(f["log"], tmp_path / "both", both, items=f["items"])
    with pytest.raises(FedpaError, match="cannot read 'overall => 4'"):
        Mapping(**{**AMAZON.__dict__, "labels": {"effective_view": "overall => 4"}}).validate()
    text_threshold = Mapping(**{**AMAZON.__dict__, "labels": {"effective_view": "asin > 3"}})
    with pytest.raises(DatasetError, match=r"'asin' \(label effective_view: asin > 3\) holds 'B00C', not a number"):
        import_interactions(f["log"], tmp_path / "text", text_threshold, items=f["items"])
    assert not (tmp_path / "both").exists() and not (tmp_path / "text").exists()


def test_ids_typed_as_numbers_in_one_file_and_text_in_another(tmp_path):
    """A CSV reader types ids that are all digits as integers; beside an item table whose ids hold letters they
    are matched as text."""
    log = {"uid": [1, 2, 2], "vid": [500, 501, 502], "ts": [T0, T0 + 1, T0 + 2], "click": [1, 0, 1], "like": [0] * 3}
    items = {"vid": ["500", "501", "502", "X9"], "cat1": ["a", "b", "a", "c"], "cat2": [1, 2, 3, 4], "kind": [0] * 4}
    f = _write(tmp_path, log=log, users={"uid": [1, 2], "level": [0, 1], "seg": [0, 0]}, items=items)
    ds = Dataset(import_interactions(f["log"], tmp_path / "out", MAP, users=f["users"], items=f["items"]))
    assert ds.items().column("orig_video_id").to_pylist() == ["500", "501", "502", "X9"]
    ex = pa.concat_tables([ds.day("exposures", d) for d in ds.days])
    assert sorted(zip(ex.column("user_id").to_pylist(), ex.column("video_id").to_pylist())) == [(0, 0), (1, 1), (1, 2)]
    assert ds.items().column("category_level_one").to_pylist() == [1, 2, 1, 3]


def test_gzipped_json_lines_with_the_shipped_amazon_mapping(tmp_path):
    """Amazon's review dumps are gzipped JSON lines; `recdata/mappings/amazon-reviews.toml` reads them (every review
    a positive) with the metadata's category and brand."""
    import gzip
    import json

    f = _amazon_like(tmp_path)
    log = pcsv.read_csv(f["log"]).to_pylist()
    with gzip.open(tmp_path / "Beauty_5.json.gz", "wt") as out:
        out.writelines(json.dumps(r) + "\n" for r in log)
    mapping = Mapping.from_toml(REPO / "recdata/mappings/amazon-reviews.toml")
    ds = Dataset(import_interactions(tmp_path / "Beauty_5.json.gz", tmp_path / "out", mapping, items=f["items"]))
    ref = Dataset(import_interactions(f["log"], tmp_path / "ref", Mapping(**{**mapping.__dict__}), items=f["items"]))
    for d in ref.days:
        assert ds.day("exposures", d).equals(ref.day("exposures", d))
    assert ds.items().column("brand").to_pylist() == [2, 1, 0, 1, 3]
    np.testing.assert_array_equal(
        pa.concat_tables([ds.day("exposures", d) for d in ds.days]).column("effective_view").to_numpy(), 1)
    pcsv.write_csv(pcsv.read_csv(f["log"]), tmp_path / "reviews.tsv", pcsv.WriteOptions(delimiter="\t"))
    tsv = Dataset(import_interactions(tmp_path / "reviews.tsv", tmp_path / "tsv", mapping, items=f["items"]))
    assert all(tsv.day("exposures", d).equals(ref.day("exposures", d)) for d in ref.days)
    (tmp_path / "broken.jsonl").write_text('{"reviewerID": "A1", "asin": \n')
    with pytest.raises(DatasetError, match="broken.jsonl: cannot read as JSON lines"):
        import_interactions(tmp_path / "broken.jsonl", tmp_path / "no", mapping)


def test_log_ids_are_distinct_sorted_values_and_row_codes():
    """The log's id columns become their distinct ids (numpy's order, in which the feature tables are matched) and
    one integer code per row, never a numpy string per row; a row naming an id the feature table lacks is counted
    per row and shown by its first."""
    from fedpa.recdata.import_interactions import _log_ids, _lookup

    raw = ["b", "A", "é", "b", "a10", "a9", "A", "b"]
    for col in (pa.chunked_array([raw[:3], raw[3:]]), pa.chunked_array([pa.array(raw).dictionary_encode()])):
        ids = _log_ids(col, "uid", Path("log.csv"), "user id")
        assert ids.values.tolist() == sorted(set(raw)) and ids.codes.dtype == np.int64
        assert ids.values[ids.codes].tolist() == raw
    ints = _log_ids(pa.chunked_array([[30, 4, 30.0, 7]]), "uid", Path("log.csv"), "user id")
    assert ints.values.tolist() == [4, 7, 30] and ints.values[ints.codes].tolist() == [30, 4, 30, 7]
    assert _lookup(ids, np.array(sorted(set(raw))), Path("log.csv"), "user", Path("u.csv")).tolist() == \
        [sorted(set(raw)).index(x) for x in raw]
    with pytest.raises(DatasetError, match=r"3 interaction\(s\) name a user that u.csv lacks \(e.g. user 'b'\)"):
        _lookup(ids, np.array(["A", "a10", "a9", "é"]), Path("log.csv"), "user", Path("u.csv"))
    with pytest.raises(DatasetError, match=r"8 interaction\(s\) name a user"):
        _lookup(ids, np.array([], dtype=str), Path("log.csv"), "user", Path("u.csv"))
    # a kept subset of the rows sees only its own ids
    assert ids.rows(np.array([True, False, False, True, False, False, False, True])).seen().tolist() == ["b"]


def test_an_id_column_of_lists_is_named_not_guessed(tmp_path):
    log = tmp_path / "log.parquet"
    pq.write_table(pa.table({"uid": [[1, 2], [3]], "vid": ["a", "b"], "ts": [T0, T0 + 1]}), log)
    with pytest.raises(DatasetError, match=r"log.parquet: column 'uid' \(user id\) has type list<\w+: int64>, "
                                           r"neither integers nor text"):
        import_interactions(log, tmp_path / "out", Mapping(user="uid", item="vid", timestamp="ts", implicit=True))
    assert not (tmp_path / "out").exists()
