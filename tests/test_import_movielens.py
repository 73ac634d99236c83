"""Importing tiny MovieLens 100K and 1M folders into the canonical dataset."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from fedpa.foundation.errors import FedpaError
from fedpa.recdata.import_movielens import GENRES, import_movielens
from fedpa.recdata.store import DatasetError, open_dataset

NO_GENRE = ["0"] * 19


def _flags(*genres: str) -> list[str]:
    """100K's 19 genre flags: "unknown" then GENRES."""
    return ["1" if name in genres else "0" for name in ("unknown", *GENRES)]


U_USER = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|32067", "5|33|F|other|15213"]
U_ITEM = [
    "|".join(["1", "Toy Story (1995)", "01-Jan-1995", "", "http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)",
              *_flags("Animation", "Children's", "Comedy")]),
    "|".join(["2", "GoldenEye (1995)", "01-Jan-1995", "", "http://x", *_flags("Action", "Adventure", "Thriller")]),
    "|".join(["10", "Cit\xe9 des enfants perdus, La\x85 (1995)", "16-Dec-1995", "", "http://x", *_flags("Drama")]),
    "|".join(["267", "unknown", "", "", "", *_flags("unknown")]),
]
# user, movie, rating, time -- not in time order on purpose
U_DATA = [(3, 10, 4, 881_000_000), (5, 267, 2, 880_100_000), (1, 2, 4, 880_000_000), (2, 1, 3, 880_000_100),
          (1, 1, 5, 880_000_000)]

USERS_DAT = ["1::F::1::10::48067", "2::M::56::16::70072", "10::F::35::1::95370"]
MOVIES_DAT = ["1::Toy Story (1995)::Animation|Children's|Comedy", "2::Jumanji (1995)::Adventure|Children's|Fantasy",
              "3::Cit\xe9 (1995)::Drama", "4::Untitled::Western"]
RATINGS_DAT = [(1, 1, 5, 978_300_760), (1, 2, 3, 978_302_109), (2, 3, 4, 978_301_968), (10, 1, 1, 978_824_291)]


def _write(path, lines, newline="\n"):
    path.write_bytes((newline.join(lines) + newline).encode("latin-1"))


def write_100k(root, *, data=U_DATA, users=U_USER, items=U_ITEM):
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "u.user", users)
    _write(root / "u.item", items)
    _write(root / "u.data", ["\t".join(map(str, r)) for r in data])
    return root


def write_1m(root, *, ratings=RATINGS_DAT, users=USERS_DAT, movies=MOVIES_DAT):
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "users.dat", users, "\r\n")
    _write(root / "movies.dat", movies)
    _write(root / "ratings.dat", ["::".join(map(str, r)) for r in ratings] + [""])
    return root


def _all(ds, name):
    return pa.concat_tables(t for _, t in ds.iter_days(name)).sort_by("request_id").to_pylist()


def test_100k_users_items_and_ids(tmp_path):
    ds = open_dataset(import_movielens(write_100k(tmp_path / "ml"), tmp_path / "ds"))
    assert ds.source == "movielens-100k"
    assert ds.users().to_pylist() == [
        {"user_id": 0, "device_id": 0, "age": 2, "gender": 1, "province": 0, "orig_user_id": 1, "occupation": 20},
        {"user_id": 1, "device_id": 0, "age": 6, "gender": 2, "province": 0, "orig_user_id": 2, "occupation": 14},
        {"user_id": 2, "device_id": 0, "age": 2, "gender": 1, "province": 0, "orig_user_id": 3, "occupation": 21},
        {"user_id": 3, "device_id": 0, "age": 3, "gender": 2, "province": 0, "orig_user_id": 5, "occupation": 14}]
    items = ds.items(["video_id", "orig_movie_id", "category_level_one", "genres", "year", "duration"]).to_pylist()
    assert items == [
        {"video_id": 0, "orig_movie_id": 1, "category_level_one": 3, "genres": 0b11100, "year": 1995, "duration": 0},
        {"video_id": 1, "orig_movie_id": 2, "category_level_one": 1, "genres": (1 << 15) | 0b11, "year": 1995,
         "duration": 0},
        {"video_id": 2, "orig_movie_id": 10, "category_level_one": 8, "genres": 1 << 7, "year": 1995, "duration": 0},
        {"video_id": 3, "orig_movie_id": 267, "category_level_one": 0, "genres": 0, "year": 0, "duration": 0}]
    assert ds.manifest["user_features"] == ["device_id", "age", "gender", "province", "occupation"]
    assert ds.manifest["genres"] == list(GENRES) and len(ds.manifest["occupations"]) == 21


def test_100k_ratings_become_one_request_each_in_time_order(tmp_path):
    ds = open_dataset(import_movielens(write_100k(tmp_path / "ml"), tmp_path / "ds"))
    assert ds.days == ["1997-11-20", "1997-11-21", "1997-12-01"]
    assert [ds.day("exposures", d).num_rows for d in ds.days] == [3, 1, 1]
    exposures = _all(ds, "exposures")
    # (time, original user, original movie): user 1 rated movies 1 and 2 in the same second
    assert [(e["request_id"], e["user_id"], e["video_id"]) for e in exposures] == \
        [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 3, 3), (4, 2, 2)]
    assert [e["request_timestamp"] for e in exposures] == [880_000_000_000, 880_000_000_000, 880_000_100_000,
                                                           880_100_000_000, 881_000_000_000]
    assert [e["effective_view"] for e in exposures] == [1, 1, 0, 0, 1]  # ratings 5, 4, 3, 2, 4 with threshold 4
    assert all(e[lab] == -1 for e in exposures for lab in ("long_view", "like", "follow", "forward", "comment"))
    assert all((e["rank_index"], e["rerank_index"], e["playing_time"], e["duration"]) == (-1, -1, -1, 0)
               for e in exposures)
    requests = _all(ds, "requests")
    assert [(r["request_id"], r["user_id"]) for r in requests] == [(0, 0), (1, 0), (2, 1), (3, 3), (4, 2)]
    assert ds.manifest["rows"]["stage_samples"] == 0 and ds.manifest["stage_samples_per_stage"] == {}
    assert (ds.manifest["label"], ds.manifest["threshold"]) == ("explicit", 4)


@pytest.mark.parametrize("label, threshold, expected", [("explicit", 3, [1, 1, 1, 0, 1]),
                                                        ("explicit", 5, [1, 0, 0, 0, 0]),
                                                        ("implicit", 4, [1, 1, 1, 1, 1])])
def test_label_modes(tmp_path, label, threshold, expected):
    ds = open_dataset(import_movielens(write_100k(tmp_path / "ml"), tmp_path / "ds", label=label,
                                       threshold=threshold))
    assert [e["effective_view"] for e in _all(ds, "exposures")] == expected
    assert ds.manifest["threshold"] == (threshold if label == "explicit" else None)


def test_1m_folder(tmp_path):
    steps: list[tuple[str, int, int]] = []
    ds = open_dataset(import_movielens(write_1m(tmp_path / "ml"), tmp_path / "ds",
                                       progress=lambda *step: steps.append(step)))
    assert ds.source == "movielens-1m" and ds.days == ["2000-12-31", "2001-01-06"]
    assert ds.users(["user_id", "orig_user_id", "age", "gender", "occupation"]).to_pylist() == [
        {"user_id": 0, "orig_user_id": 1, "age": 1, "gender": 2, "occupation": 11},
        {"user_id": 1, "orig_user_id": 2, "age": 7, "gender": 1, "occupation": 17},
        {"user_id": 2, "orig_user_id": 10, "age": 4, "gender": 2, "occupation": 2}]
    assert ds.items(["video_id", "orig_movie_id", "category_level_one", "genres", "year"]).to_pylist() == [
        {"video_id": 0, "orig_movie_id": 1, "category_level_one": 3, "genres": 0b11100, "year": 1995},
        {"video_id": 1, "orig_movie_id": 2, "category_level_one": 2, "genres": 0b100001010, "year": 1995},
        {"video_id": 2, "orig_movie_id": 3, "category_level_one": 8, "genres": 1 << 7, "year": 1995},
        {"video_id": 3, "orig_movie_id": 4, "category_level_one": 18, "genres": 1 << 17, "year": 0}]
    exposures = _all(ds, "exposures")
    assert [(e["user_id"], e["video_id"], e["effective_view"]) for e in exposures] == \
        [(0, 0, 1), (1, 2, 1), (0, 1, 0), (2, 0, 0)]
    assert steps[0] == ("reading users.dat, movies.dat and ratings.dat", 0, 1)
    assert steps[1:] == [("2000-12-31: 3 rating(s)", 1, 2), ("2001-01-06: 1 rating(s)", 2, 2)]


def test_output_does_not_depend_on_file_order(tmp_path):
    a = import_movielens(write_100k(tmp_path / "a"), tmp_path / "ds_a")
    b = import_movielens(write_100k(tmp_path / "b", data=U_DATA[::-1], users=U_USER[::-1], items=U_ITEM[::-1]),
                         tmp_path / "ds_b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


MALFORMED = {
    "too few fields": (write_100k, {"data": [(1, 1, 5, 880_000_000), (2, 1, 3)]}, "u.data, line 2: expected 4 fields"),
    "non-integer user": (write_100k, {"data": [(1, 1, 5, 880_000_000), ("x", 1, 3, 1)]},
                         "u.data, line 2: user id 'x' is not an integer"),
    "rating above 5": (write_100k, {"data": [(1, 1, 6, 880_000_000)]}, "u.data, line 1: rating 6 is outside 1..5"),
    "rating 0": (write_1m, {"ratings": [(1, 1, 5, 978_300_760), (1, 2, 0, 978_300_760)]},
                 "ratings.dat, line 2: rating 0 is outside 1..5"),
    "unknown movie": (write_1m, {"ratings": [(1, 99, 5, 978_300_760)]},
                      "ratings.dat, line 1: movie 99 is not in the item file"),
    "unknown user": (write_100k, {"data": [(4, 1, 5, 880_000_000)]}, "u.data, line 1: user 4 is not in the user file"),
    "unknown gender": (write_100k, {"users": ["1|24|X|technician|85711"]}, "u.user, line 1: unknown gender 'X'"),
    "unknown occupation": (write_100k, {"users": ["1|24|M|astronaut|85711"]},
                           "u.user, line 1: unknown occupation 'astronaut'"),
    "unknown age code": (write_1m, {"users": ["1::F::20::10::48067"]}, "users.dat, line 1: unknown age code '20'"),
    "unknown genre": (write_1m, {"movies": ["1::Toy Story (1995)::Animation|Cartoon"]},
                      "movies.dat, line 1: unknown genre 'Cartoon'"),
    "duplicate movie": (write_1m, {"movies": ["1::A (1995)::Drama", "1::B (1996)::Drama"]},
                        "movies.dat: id 1 appears twice"),
    "item line with a missing flag": (write_100k, {"items": ["1|Toy Story (1995)|01-Jan-1995||url" + "|0" * 18]},
                                      "u.item, line 1: expected 24 fields"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_line_names_file_and_line(tmp_path, case):
    writer, override, message = MALFORMED[case]
    src = writer(tmp_path / "ml", **override)
    with pytest.raises(DatasetError, match=re.escape(message)):
        import_movielens(src, tmp_path / "out" / "ds")
    assert list((tmp_path / "out").glob("*")) == []


def test_failed_import_keeps_the_existing_dataset(tmp_path):
    out = import_movielens(write_100k(tmp_path / "good"), tmp_path / "ds")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = write_100k(tmp_path / "bad", data=[(1, 1, 9, 880_000_000)])
    with pytest.raises(DatasetError, match="outside 1..5"):
        import_movielens(bad, out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ds", "good"]


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "MovieLens directory is missing"),
    (lambda root: root.mkdir(), "not a MovieLens 100K or 1M folder"),
    (lambda root: (write_100k(root), write_1m(root)), "holds both u.data (100K) and ratings.dat (1M)"),
    (lambda root: (write_1m(root), (root / "movies.dat").unlink()), "movies.dat: file is missing"),
])
def test_folder_detection_errors(tmp_path, setup, message):
    setup(tmp_path / "ml")
    with pytest.raises(DatasetError, match=re.escape(message)):
        import_movielens(tmp_path / "ml", tmp_path / "ds")


@pytest.mark.parametrize("kwargs, message", [({"label": "clicks"}, "label must be one of explicit, implicit"),
                                             ({"threshold": 6}, "threshold must be a rating from 1 to 5")])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(FedpaError, match=message):
        import_movielens(write_100k(tmp_path / "ml"), tmp_path / "ds", **kwargs)


def test_recboles_copy_of_100k_converts_to_the_dataset_grouplens_files_give(tmp_path):
    """`benchmarks/movielens_from_recbole.py` (ML-100K from RecBole's wheel, atomic files) writes files that the
    importer turns into the same users, items and ratings as GroupLens' own (the test's 100K above)."""
    import importlib.util
    import zipfile
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "movielens_from_recbole.py"
    spec = importlib.util.spec_from_file_location("movielens_from_recbole", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"] + [
        f"{u}\t{m}\t{r}\t{t}" for u, m, r, t in U_DATA]
    users = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"] + [
        line.replace("|", "\t") for line in U_USER]
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
             "1\tToy Story\t1995\tAnimation Children's Comedy", "2\tGoldenEye\t1995\tAction Adventure Thriller",
             "10\tCit\xe9 des enfants perdus, La\x85\t1995\tDrama", "267\tunknown\tunkonwn\tunknown"]
    wheel = tmp_path / "recbole.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for kind, lines in (("inter", inter), ("user", users), ("item", items)):
            z.writestr(mod.MEMBER.format(kind), ("\r\n".join(lines) + "\r\n").encode("latin-1"))
    mod.convert(wheel, tmp_path / "converted")
    got = open_dataset(import_movielens(tmp_path / "converted", tmp_path / "from-recbole"))
    want = open_dataset(import_movielens(write_100k(tmp_path / "ml"), tmp_path / "from-grouplens"))
    assert got.users().to_pylist() == want.users().to_pylist()
    assert got.items().to_pylist() == want.items().to_pylist()
    assert _all(got, "exposures") == _all(want, "exposures")
    bad = tmp_path / "bad.whl"   # a genre the flags cannot hold is refused by name
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr(mod.MEMBER.format("inter"), "h\n")
        z.writestr(mod.MEMBER.format("user"), "h\n")
        z.writestr(mod.MEMBER.format("item"), "h\n5\tX\t1990\tAnime\n")
    with pytest.raises(SystemExit, match="item 5: unknown genre"):
        mod.convert(bad, tmp_path / "bad")
