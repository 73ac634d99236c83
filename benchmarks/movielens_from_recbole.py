"""MovieLens-100K in GroupLens' own layout (u.data, u.user, u.item), from the copy RecBole's wheel on PyPI carries.

    pip download recbole==1.2.0 --no-deps -d /tmp/recbole          # a 2 MB wheel; nothing is installed
    .venv/bin/python benchmarks/movielens_from_recbole.py /tmp/recbole/recbole-1.2.0-py3-none-any.whl --out /tmp/ml-100k
    fedpa data import-movielens /tmp/ml-100k --out data/ml100k-implicit --label implicit

Why: MovieLens may not be redistributed, so neither this repository nor `shared/` holds it, and a machine that
reaches only the package registries cannot fetch it from GroupLens. RecBole ships ML-100K as "atomic files"
(``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``: tab-separated, typed headers); this rewrites them
as GroupLens' files so that fedpa's own importer reads them. The ratings, users and genres are GroupLens' (the
importer's popularity and foundation rows equal those of the original files: docs/results.md, MovieLens-100K);
a release date becomes 1 January of its year (the importer reads the year only), and the titles, which the importer
does not read, are kept without the separator. Write the output outside the repository.
"""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Iterator
from pathlib import Path

MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
# u.item's 19 genre flags, in GroupLens' order
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")


def atomic_rows(wheel: zipfile.ZipFile, kind: str, columns: int) -> Iterator[list[str]]:
    """The rows of one atomic file (header skipped), each checked for its number of fields."""
    name = MEMBER.format(kind)
    text = wheel.read(name).decode("latin-1")
    for n, line in enumerate(text.split("\n")[1:], 2):   # not splitlines: latin-1 titles hold \x85, a line break to it
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != columns:
            raise SystemExit(f"{name}, line {n}: {len(fields)} fields, expected {columns}")
        yield fields


def convert(wheel_path: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as wheel:
        with open(out / "u.data", "w") as f:
            for user, item, rating, ts in atomic_rows(wheel, "inter", 4):
                f.write(f"{user}\t{item}\t{int(float(rating))}\t{int(float(ts))}\n")
        with open(out / "u.user", "w") as f:
            for user, age, gender, occupation, zip_code in atomic_rows(wheel, "user", 5):
                f.write(f"{user}|{age}|{gender}|{occupation}|{zip_code}\n")
        with open(out / "u.item", "w", encoding="latin-1") as f:
            for item, title, year, genres in atomic_rows(wheel, "item", 4):
                tokens = set(genres.split())
                if tokens - set(GENRES):
                    raise SystemExit(f"item {item}: unknown genre(s) {sorted(tokens - set(GENRES))}")
                flags = "|".join("1" if g in tokens else "0" for g in GENRES)
                date = f"01-Jan-{year}" if year.isdigit() else ""   # one film's year reads "unkonwn"
                f.write(f"{item}|{title.replace('|', ' ')}|{date}||-|{flags}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path, help="RecBole's wheel (pip download recbole==1.2.0 --no-deps)")
    ap.add_argument("--out", type=Path, required=True, help="folder for u.data, u.user, u.item")
    a = ap.parse_args()
    convert(a.wheel, a.out)
    print(f"wrote {a.out}/u.data, u.user, u.item")


if __name__ == "__main__":
    main()
