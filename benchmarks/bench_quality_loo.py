"""PFedRec's protocol on KuaiSAR-R (or another implicit data set): implicit feedback, leave one out, sampled
negatives.

    .venv/bin/python benchmarks/bench_quality_loo.py [--src ../shared/data/kuaisar-r] [--seeds 3] [--rounds 20]
        [--algorithms fedpa,fedmf,pfedrec,fedrap,local,foundation] [--out runs/loo] [--secagg] [--core K]

``--core K``: KuaiSAR-R's K-core instead (users and items with at least K clicks each, dropped in turn until both
hold; data/kuaisar-r-loo-coreK, runs/loo-coreK), where almost no held-out item lacks a training click.

Another data set already imported, e.g. MovieLens-100K as implicit feedback (every rating a positive, as PFedRec's
code binarizes it; FedPA's open users by exposures, as it has no activity attribute):

    fedpa data import-movielens PATH/TO/ml-100k --out data/ml100k-implicit --label implicit
    .venv/bin/python benchmarks/bench_quality_loo.py --data data/ml100k-implicit --activity-attribute "" \
        --name MovieLens-100K --out runs/ml-implicit

The data is imported with fedpa's own importer as PFedRec's official code prepares it: clicks only, users with at
least 3 clicks (1,748 users), the catalogue = the clicked items (37,020); per user the latest click is the test
case and the one before it validation (ties within a request: the one listed first), each ranked against 99
items the user never clicked (drawn per seed); the other clicks train with 4 sampled negatives each (the
id-based algorithms redraw theirs every round, as the official codes do; fedpa's recipe trains a fresh 4 of a pool
of 64 drawn once, `negative-pool`; the other foundation-based algorithms the same 4 every round). Every user is a
client, in every round. The foundation is pre-trained on the open users (FedPA's rule, reco_active_level = 3 as
highly active) and stops on validation. Each algorithm runs with its paper's own settings (`Algorithm.recipe`)
unless the configuration sets them; the test metrics are taken at each run's best validation HR@10.

Beside the algorithms, the report ranks items by their number of training clicks (popularity): ties with the
held-out item counted against it (as PFedRec's scorer counts them, and every fedpa metric here), and broken at
random (its expectation over the tie-breaking, computed exactly rather than drawn). HR@10, NDCG@10, MRR@10,
bytes per client and round, seconds per round; mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedpa.common.config import FederationConfig, with_recipe
from fedpa.recdata.examples import Lookups, user_table
from fedpa.recdata.import_interactions import KUAISAR_R, RowFilter, import_interactions
from fedpa.recdata.partition import PartitionConfig, SplitConfig, split_users
from fedpa.recdata.store import Dataset
from fedpa.simulations.compare import compare, mean_std
from fedpa.simulations.pretraining import pretrain_foundation

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = "fedpa,fedmf,pfedrec,fedrap,local,foundation"


def rank_metrics(cases: np.ndarray, k: int = 10, *, random_ties: bool) -> dict[str, float]:
    """HR@k, NDCG@k and MRR@k of ranking each case's candidates by ``cases`` (column 0 the held-out item). With g
    negatives strictly above the held-out item and t tied with it, its rank is g + t when ties count against it
    (PFedRec's scorer), and each of g .. g + t equally likely when ties are broken at random (the expectation over
    the tie-breaking, exact: no draw)."""
    above = (cases[:, 1:] > cases[:, :1]).sum(axis=1)
    tied = (cases[:, 1:] == cases[:, :1]).sum(axis=1)
    first = above if random_ties else above + tied
    last = above + tied
    ranks = np.arange(k)
    share = ((ranks[None] >= first[:, None]) & (ranks[None] <= last[:, None])) / (last - first + 1.0)[:, None]
    return {"hr": float(share.sum(axis=1).mean()),
            "ndcg": float((share / np.log2(ranks + 2.0)[None]).sum(axis=1).mean()),
            "mrr": float((share / (ranks + 1.0)[None]).sum(axis=1).mean())}


def popularity(ds: Dataset, seeds: list[int]) -> dict[str, dict[str, tuple[float, float]]]:
    """Rank by training clicks on each seed's split: ties against the held-out item, and broken at random (the
    expectation over the tie-breaking, exact)."""
    lk = Lookups.build(ds)
    users = np.arange(len(user_table(ds)))
    rows: dict[str, list[float]] = {}
    for seed in seeds:
        s = split_users(ds, users, SplitConfig("loo", negatives=99), lookups=lk, seed=seed)
        count = np.bincount(s.train.video_id[s.train.labels[:, 0] == 1], minlength=len(lk.item_table))
        cases = count[s.test.video_id.reshape(-1, 100)].astype(np.float64)
        results = {"popularity (ties against)": rank_metrics(cases, random_ties=False),
                   "popularity (random ties, expected)": rank_metrics(cases, random_ties=True)}
        for name, res in results.items():
            for m in ("hr", "ndcg", "mrr"):
                rows.setdefault(f"{name}|{m}@10", []).append(res[m])
        rows.setdefault("no-train-click|share", []).append(float((cases[:, 0] == 0).mean()))
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for key, vals in rows.items():
        name, metric = key.split("|")
        out.setdefault(name, {})[metric] = mean_std(vals)
    return out


def _fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.4f} ± {ms[1]:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "kuaisar-r"))
    ap.add_argument("--data", default="data/kuaisar-r-loo")
    ap.add_argument("--core", type=int, default=0,
                    help="import KuaiSAR-R as its k-core: users and items with at least K clicks each (default: "
                         "PFedRec's preparation, users with at least 3); the default --data becomes "
                         "data/kuaisar-r-loo-core{K}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--algorithms", default=ALGORITHMS)
    ap.add_argument("--out", default="runs/loo")
    ap.add_argument("--secagg", action="store_true", help="also run fedpa under SecAgg+ (3 nodes)")
    ap.add_argument("--activity-attribute", default="reco_active_level",
                    help="profile field marking highly active users, FedPA's open-user rule (\"\": by exposures)")
    ap.add_argument("--active-values", default="3")
    ap.add_argument("--name", default="KuaiSAR-R", help="the data set's name in the report")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="KEY=VALUE for every run (e.g. item-embedding-dim=16)")
    a = ap.parse_args()
    t0 = time.time()
    if a.core < 0:
        raise SystemExit(f"--core must be >= 0, got {a.core}")
    default_data = a.data == ap.get_default("data")
    data = Path(f"{a.data}-core{a.core}" if a.core and default_data else a.data)
    if not (data / "manifest.json").exists():
        if not default_data and a.src == ap.get_default("src"):
            raise SystemExit(f"{data}: no dataset there. Import it first (e.g. fedpa data import-movielens PATH "
                             f"--out {data} --label implicit), or pass --src to import KuaiSAR-R into it")
        src = Path(a.src)
        import_interactions(src / "df.csv", data, KUAISAR_R, users=src / "user_features.csv",
                            items=src / "video_features.csv",
                            rows=RowFilter(positives_only=True, min_user_positives=max(3, a.core),
                                           min_item_positives=a.core, interacted_only=True))
    ds = Dataset(data)
    # a k-core renumbers its users and items: its own foundation, never the whole set's
    out = Path(f"{a.out}-core{a.core}" if a.core and a.out == ap.get_default("out") else a.out)
    foundation = out / "pretrained"
    active = tuple(int(v) for v in a.active_values.split(",") if v) if a.activity_attribute else ()
    partition = PartitionConfig(seed=0, activity_attribute=a.activity_attribute or None, active_values=active)
    if not (foundation / "config.json").exists():
        report = pretrain_foundation(data, foundation, epochs=20, patience=2, batch_size=1024, split="loo",
                                     partition=partition, dropout="auto")   # as `fedpa pretrain`
        print("foundation:", json.dumps(report["evaluation"]["private_test"]))
    pre = json.loads((foundation / "pretrain_report.json").read_text())
    given = {"data-dir", "foundation", "split", "num-rounds", "activity-attribute", "active-values",
             "federate-open-users"}
    extra = {}
    for item in a.sets:
        key, _, value = item.partition("=")
        extra[key.replace("-", "_")] = json.loads(value) if value[:1] in "0123456789-[{tf\"" else value
        given.add(key)
    base = FederationConfig(data_dir=str(data), foundation=str(foundation), split="loo", num_rounds=a.rounds,
                            activity_attribute=a.activity_attribute,
                            active_values=a.active_values if a.activity_attribute else "", federate_open_users=True,
                            **extra)
    variants = [v for v in a.algorithms.split(",") if v]
    seeds = list(range(a.seeds))
    result = compare(base, variants, seeds, out, given=given)
    table = result["table"]
    if a.secagg:
        from fedpa.simulations.simulate import simulate

        def secure(s: int) -> FederationConfig:   # fedpa's recipe, as the table's fedpa row runs it
            cfg = replace(base, seed=s, secagg=True, run_dir=str(out / "fedpa-secagg" / f"seed-{s}"))
            return with_recipe(cfg, given | {"secagg", "seed", "run-dir"})

        runs = [simulate(secure(s), cohort_size=-(-ds.users().num_rows // 3)) for s in seeds]
        table["fedpa (secagg, 3 nodes)"] = {
            **{m: mean_std([r["test"][m] for r in runs]) for m in ("hr@10", "ndcg@10", "mrr@10")},
            "bytes_up_per_client_round": mean_std([r["bytes_up_per_client_round"] for r in runs])[0],
            "seconds_per_round": mean_std([r["seconds_per_round"] for r in runs])[0],
            "best_round": [r["best_round"] for r in runs]}
    pop = popularity(ds, seeds)
    name = f"{a.name} {a.core}-core" if a.core and a.name == ap.get_default("name") else a.name
    lines = [f"# PFedRec's protocol on {name}", "",
             f"{ds.users().num_rows:,} users (every one a client, every round), {ds.items().num_rows:,} items; "
             f"{a.rounds} rounds; seeds {seeds[0]}..{seeds[-1]}; test at the best validation HR@10. "
             f"{pop['no-train-click']['share'][0]:.1%} of the held-out items have no training click. Foundation: "
             f"{pre.get('epochs_trained', '?')} epoch(s), best {pre['best_epoch'] + 1}. Command: "
             f"`python benchmarks/bench_quality_loo.py {shlex.join(sys.argv[1:])}`.", "",
             "| algorithm | test HR@10 | test NDCG@10 | test MRR@10 | KB up / client / round | s / round "
             "| best rounds |",
             "|---|---|---|---|---|---|---|"]
    for name, row in pop.items():
        if name.startswith("popularity"):
            lines.append(f"| {name} | {_fmt(row['hr@10'])} | {_fmt(row['ndcg@10'])} | {_fmt(row['mrr@10'])} "
                         "| – | – | – |")
    for name, row in table.items():
        lines.append(f"| {name} | {_fmt(row['hr@10'])} | {_fmt(row['ndcg@10'])} | {_fmt(row['mrr@10'])} | "
                     f"{row['bytes_up_per_client_round'] / 1024:.1f} | {row['seconds_per_round']:.1f} | "
                     f"{','.join(str(b) for b in row['best_round'])} |")
    lines += ["", f"Whole benchmark: {(time.time() - t0) / 60:.1f} min.", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
