"""Importing a RecFlow release (fixture in tests/fixtures_release.py) into the canonical dataset."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import fixtures_release as rel
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pytest

from fedpa.recdata.import_recflow import import_recflow
from fedpa.recdata.safe_pickle import UnsafePickleError
from fedpa.recdata.schema import STAGE_CODE, STAGES
from fedpa.recdata.store import DatasetError, open_dataset


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return rel.write_release(tmp_path_factory.mktemp("recflow"))


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    steps: list[tuple[str, int, int]] = []
    out = import_recflow(release, tmp_path_factory.mktemp("out") / "ds", progress=lambda *step: steps.append(step))
    return open_dataset(out), steps


def test_days_requests_and_counts(imported):
    ds, steps = imported
    assert ds.days == list(rel.DAYS) and ds.source == "recflow"
    assert ds.manifest["release_days"] == list(rel.DAYS)
    assert ds.manifest["rows"] == {"requests": 6, "exposures": 12, "stage_samples": 36, "users": 3,
                                   "items": 104, "history": 55}
    day1 = ds.day("requests", "2024-01-13")
    assert day1.column("request_id").to_pylist() == [1001, 1003, 1002]  # sorted by user, then time
    assert day1.column("request_timestamp").to_pylist() == [rel.request_ms(r) for r in (1001, 1003, 1002)]
    assert [ds.day("requests", d).num_rows for d in rel.DAYS] == [3, 2, 1]
    assert ("2024-01-14: done", 2, 4) in steps and steps[-1] == ("done", 4, 4)
    assert [done for _, done, _ in steps] == sorted(done for _, done, _ in steps)


def test_exposures_keep_labels_and_positions(imported):
    ds, _ = imported
    exposures = pa.concat_tables(t for _, t in ds.iter_days("exposures"))
    assert exposures.num_rows == 12
    sums = {lab: sum(exposures.column(lab).to_pylist()) for lab in rel.LABELS}
    assert sums == {"effective_view": 6, "long_view": 4, "like": 1, "follow": 0, "forward": 1, "comment": 0}
    row = exposures.filter(pc.equal(exposures.column("video_id"), 10010)).to_pylist()
    assert row == [{"request_id": 1001, "user_id": 0, "request_timestamp": rel.request_ms(1001), "video_id": 10010,
                    "rank_index": 0, "rerank_index": 0, "playing_time": 20_000, "duration": 20_010,
                    "effective_view": 1, "long_view": 1, "like": 1, "follow": 0, "forward": 0, "comment": 0}]


def test_stage_samples_take_the_deepest_flag_and_leave_exposures_out(imported):
    ds, _ = imported
    samples = pa.concat_tables(t for _, t in ds.iter_days("stage_samples"))
    assert ds.manifest["stage_samples_per_stage"] == {s: 6 for s in STAGES}
    by_video = {r["video_id"]: r for r in samples.to_pylist()}
    assert by_video[10015]["stage"] == STAGE_CODE["rerank_neg"]  # rank_pos + rerank_neg
    assert by_video[10016]["stage"] == STAGE_CODE["rerank_pos"]  # rank_pos + rerank_pos
    assert by_video[10017]["stage"] == STAGE_CODE["rank_pos"]
    assert (by_video[10016]["rank_index"], by_video[10016]["rerank_index"]) == (4, 5)
    assert 10011 not in by_video and 10018 not in by_video  # an exposure; a row without any flag
    assert samples.schema.field("stage").type == pa.int8()
    assert "1 all_stage row(s) carried no stage flag and were skipped" in ds.manifest["notes"]


def test_users_keep_the_most_recent_profile(imported):
    ds, _ = imported
    users = ds.users().to_pylist()
    assert users == [{"user_id": 0, "device_id": 100, "age": 2, "gender": 1, "province": 5},
                     {"user_id": 1, "device_id": 101, "age": 3, "gender": 2, "province": rel.MOVED_PROVINCE},
                     {"user_id": 2, "device_id": 102, "age": 1, "gender": 1, "province": 8}]
    assert any(n.startswith("1 user(s) appeared with more than one profile") and "user_id 1" in n
               for n in ds.manifest["notes"])


def test_items_cover_every_referenced_video_with_its_latest_features(imported):
    ds, _ = imported
    items = {r["video_id"]: r for r in ds.items().to_pylist()}
    assert len(items) == 104
    assert items[rel.CHANGED_VIDEO]["duration"] == rel.CHANGED_DURATION  # day 3 beats day 1 and video_info
    assert items[rel.VIDEO_INFO_ONLY] == {"video_id": 777, **rel.video_features(777)}
    assert items[980] == {"video_id": 980, **rel.video_features(980)}  # known only from a behaviour sequence
    assert items[10018]["duration"] == rel.video_features(10018)["duration"]
    referenced = set()
    for name in ("exposures", "stage_samples"):
        for _, t in ds.iter_days(name, ["video_id"]):
            referenced |= set(t.column("video_id").to_pylist())
    referenced |= set(ds.history(["video_id"]).column("video_id").to_pylist())
    assert referenced <= set(items)
    assert any(n.startswith("1 video(s) appeared with more than one set of features") for n in ds.manifest["notes"])


def test_history_is_the_behaviour_before_each_users_first_request(imported):
    ds, _ = imported
    views = rel.pre_window_views()
    for user in (0, 2):
        history = ds.history_rows(user).to_pylist()
        assert [(h["timestamp"], h["video_id"], h["playing_time"]) for h in history] == \
            [(ts, video, 30_000) for ts, video in views[user]]
    # user 1 viewed 60 videos before the window; the sequences only ever held the last 50
    assert ds.history_rows(1).column("video_id").to_pylist() == [910 + i for i in range(10, 60)]
    # user 2's view during day 1 is before its first request (day 2), so it is history too
    assert views[2][1][0] > rel.day_start_ms(rel.DAYS[0])
    assert "1 behaviour sequence(s) belong to requests in neither realshow nor all_stage and were skipped" \
        in ds.manifest["notes"]


def test_release_vocabulary_goes_to_the_manifest(imported):
    ds, _ = imported
    assert ds.manifest["release_vocab"] == {"author_id": 7, "device_id": 103, "province": 8, "user_id": 3,
                                            "video_id": 40_000}
    assert ds.vocab["user_id"] == 3 and ds.vocab["video_id"] == 30_018  # largest id 30017 (request 3001, slot 7)


def test_compact_date_names_and_a_days_filter(tmp_path):
    src = rel.write_release(tmp_path / "src", compact_dates=True, with_video_info=False)
    ds = open_dataset(import_recflow(src, tmp_path / "ds", days=["20240115", "2024-01-14"]))
    assert ds.days == ["2024-01-14", "2024-01-15"] and ds.manifest["release_days"] == list(rel.DAYS)
    assert ds.manifest["rows"]["requests"] == 3
    # user 0's first imported request is 3001: its two effective views on day 1 are now history too
    assert ds.history_rows(0).column("video_id").to_pylist() == [900, 901, 902, 10010, 10030]
    assert rel.VIDEO_INFO_ONLY not in ds.items(["video_id"]).column("video_id").to_pylist()


def test_import_is_deterministic(release, imported, tmp_path):
    ds, _ = imported
    again = open_dataset(import_recflow(release, tmp_path / "again"))
    assert json.dumps(again.manifest, sort_keys=True) == json.dumps(ds.manifest, sort_keys=True)
    for name in ("users.arrow", "items.arrow", "history.arrow", "stage_samples/2024-01-13.arrow"):
        assert (again.path / name).read_bytes() == (ds.path / name).read_bytes()


# ----------------------------------------------------------------------------- errors


def _rewrite_feather(path, change):
    feather.write_feather(change(feather.read_table(path)), path)


def _with_column(name, values):
    def change(table):
        return table.set_column(table.column_names.index(name), name, values(table))
    return change


BREAKAGES = {
    "missing directory": (lambda root: shutil.rmtree(root / "all_stage"), "all_stage: directory is missing"),
    "missing sequence file": (lambda root: (root / "seq_effective_50_dict" / "2024-01-14.pkl").unlink(),
                              "2024-01-14.pkl: file is missing"),
    "missing id_cnt": (lambda root: (root / "others" / "id_cnt.pkl").unlink(), "id_cnt.pkl: file is missing"),
    "missing column": (lambda root: _rewrite_feather(root / "realshow" / "2024-01-14.feather",
                                                     lambda t: t.drop_columns(["like"])),
                       "realshow/2024-01-14.feather: missing column(s) like"),
    "string column": (lambda root: _rewrite_feather(
        root / "all_stage" / "2024-01-15.feather",
        _with_column("user_id", lambda t: pa.array([str(u) for u in t.column("user_id").to_pylist()]))),
        "all_stage/2024-01-15.feather: column 'user_id' has type string"),
    "missing values": (lambda root: _rewrite_feather(
        root / "realshow" / "2024-01-15.feather",
        _with_column("playing_time", lambda t: pa.array([None] * t.num_rows, pa.int64()))),
        "realshow/2024-01-15.feather: column 'playing_time' has 2 missing value(s)"),
    "flag not binary": (lambda root: _rewrite_feather(
        root / "all_stage" / "2024-01-14.feather",
        _with_column("coarse_neg", lambda t: pa.array([2] * t.num_rows, pa.int8()))),
        "all_stage/2024-01-14.feather: column 'coarse_neg' holds values other than 0 and 1"),
    "empty feather": (lambda root: (root / "realshow" / "2024-01-15.feather").write_bytes(b""),
                      "realshow/2024-01-15.feather: not a readable Feather file"),
    "truncated feather": (lambda root: (root / "all_stage" / "2024-01-14.feather").write_bytes(
        (root / "all_stage" / "2024-01-14.feather").read_bytes()[:700]),
        "all_stage/2024-01-14.feather: not a readable Feather file"),
    "feather without rows": (lambda root: _rewrite_feather(root / "realshow" / "2024-01-15.feather",
                                                           lambda t: t.slice(0, 0)),
                             "realshow/2024-01-15.feather: file has no rows"),
    "truncated pickle": (lambda root: (root / "seq_effective_50_dict" / "2024-01-15.pkl").write_bytes(
        (root / "seq_effective_50_dict" / "2024-01-15.pkl").read_bytes()[:100]),
        "2024-01-15.pkl: not a readable pickle"),
    "sequence of the wrong shape": (lambda root: (root / "seq_effective_50_dict" / "2024-01-14.pkl").write_bytes(
        pickle.dumps({2001: np.zeros((50, 9), np.int64)})),
        "2024-01-14.pkl: request 2001: expected an integer array [50, 10]"),
    "two files for one day": (lambda root: (root / "realshow" / "20240113.feather").write_bytes(
        (root / "realshow" / "2024-01-13.feather").read_bytes()),
        "realshow: day 2024-01-13 has two files"),
    "conflicting request": (lambda root: _rewrite_feather(
        root / "realshow" / "2024-01-14.feather",
        _with_column("request_timestamp", lambda t: pc.add(t.column("request_timestamp"), 1))),
        "request_id 2001 appears with more than one user_id or request_timestamp"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_bad_release_fails_cleanly_and_leaves_nothing(tmp_path, breakage):
    src = rel.write_release(tmp_path / "src")
    damage, message = BREAKAGES[breakage]
    damage(src)
    with pytest.raises(DatasetError, match=re.escape(message)):
        import_recflow(src, tmp_path / "out" / "ds")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_failed_import_keeps_the_existing_dataset(release, imported, tmp_path):
    out = import_recflow(release, tmp_path / "ds", days=["2024-01-13"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = rel.write_release(tmp_path / "broken")
    (broken / "seq_effective_50_dict" / "2024-01-15.pkl").write_bytes(
        b"cos\nsystem\n(Vtouch " + str(tmp_path / "pwned").encode() + b"\ntR.")
    with pytest.raises(UnsafePickleError, match="refused to load global 'os.system'"):
        import_recflow(broken, out, overwrite=True)
    assert not (tmp_path / "pwned").exists()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "ds"]  # no temporary directory left


def test_existing_output_needs_overwrite(release, tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DatasetError, match="already exists"):
        import_recflow(release, tmp_path / "ds")


@pytest.mark.parametrize("days, message", [(["2024-01-16"], "no day 2024-01-16 in the release"),
                                           (["2024-02-30"], "'2024-02-30' is not a valid date"),
                                           (["yesterday"], "'yesterday' is not a day"),
                                           ([], "selects no day")])
def test_days_filter_must_name_days_of_the_release(release, tmp_path, days, message):
    with pytest.raises(DatasetError, match=message):
        import_recflow(release, tmp_path / "ds", days=days)
    assert not (tmp_path / "ds").exists()


def test_missing_release_directory(tmp_path):
    with pytest.raises(DatasetError, match="RecFlow release directory is missing"):
        import_recflow(tmp_path / "nowhere", tmp_path / "ds")
