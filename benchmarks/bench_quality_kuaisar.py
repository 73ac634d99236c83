"""fedpa on real Kuaishou data (KuaiSAR-R): import, pre-train, compare, report.

    .venv/bin/python benchmarks/bench_quality_kuaisar.py [--src ../shared/data/kuaisar-r] [--protocol last|chrono]
        [--seeds 3] [--rounds 10] [--algorithms fedpa,local,...] [--out runs/kuaisar]

Protocols: ``last`` is MRFF's (per user the second-to-last interaction is validation, the last is
test; AUC / LogLoss over the test pairs), ``chrono`` is FedPA's (per-user chronological 60/20/20,
pooled AUC, GAUC, weighted P/R/F1). Open users for pre-training follow FedPA's rule with
``reco_active_level = 3`` as "highly active"; group adapters are keyed by ``onehot_feat1`` and
``reco_active_level``. The foundation is pre-trained once per protocol on the open users (3 epochs),
into OUT/<protocol>/pretrained/.
Clients: on MRFF's protocol every user is a client and is scored (1,791 test pairs; an open user's
client trains on the same earlier rows the foundation was pre-trained on and is scored on its last
pair, which pre-training never read); on FedPA's protocol only the private users are.
``--clients private`` / ``--clients all`` overrides that and writes under OUT/<protocol>/<clients>-clients/.
Writes ``OUT/<protocol>/report.md`` with the comparison table (mean ± std over seeds), the
learning curves of the first seed against rounds and wall time, and the norm of every adapter
kind of FedPA after training (shared: from the final checkpoint; private: from the users' stores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from fedpa.client.personal_store import PersonalStore, generate_key_file  # noqa: E402
from fedpa.common.config import FederationConfig  # noqa: E402
from fedpa.common.files import save_figure  # noqa: E402
from fedpa.common.models import build_personal_model  # noqa: E402
from fedpa.recdata.import_interactions import KUAISAR_R, import_interactions  # noqa: E402
from fedpa.recdata.partition import PartitionConfig  # noqa: E402
from fedpa.recdata.store import Dataset  # noqa: E402
from fedpa.server.rundir import RunDir  # noqa: E402
from fedpa.simulations.compare import compare, variant_config  # noqa: E402
from fedpa.simulations.pretraining import pretrain_foundation  # noqa: E402

ALGORITHMS = ("fedpa,fedpa-release,local,fedavg-lora,fedper,fedper-ft,ditto,foundation,centralized,fedmf,pfedrec,"
              "fedrap")
ABLATION = ("fedpa", "fedpa-user-only", "fedpa-groups-only", "fedpa-no-gate", "fedpa-rank1", "fedpa-rank16")


def adapter_norms(cfg: FederationConfig, run_dir: Path, store_dir: Path, key: Path) -> dict[str, float]:
    """How far each adapter kind moved: L2 norm of (final - initial) for the shared kinds (final
    checkpoint against the state every run starts from) and of the user path's B factors (zero at
    initialisation) from the users' encrypted stores, median over users."""
    start = build_personal_model(replace(cfg, seed=0), "fedpa").get_shared()
    _, shared, _ = RunDir(run_dir).load_checkpoint()
    kinds: dict[str, float] = {}
    for name, v in shared.items():
        kind = ("item-side tables" if name.startswith("item_bias.") else "group adapters" if "group" in name
                else "gate" if "gate" in name
                else "head" if "head" in name else "other shared")
        kinds[kind] = kinds.get(kind, 0.0) + float(np.sum(np.square(v - start[name], dtype=np.float64)))
    store = PersonalStore.from_key_file(store_dir, key)
    user_sq = []
    for uid in store.users():
        found = store.load(uid)
        if found:
            user_sq.append(sum(float(np.sum(np.square(a, dtype=np.float64))) for n, a in found[0].items() if "_B" in n))
    out = {f"{k} (moved from init)": float(np.sqrt(v)) for k, v in kinds.items()}
    if user_sq:
        out["user adapters (B, zero at init), median over users"] = float(np.sqrt(np.median(user_sq)))
    return out


def plot_curves(root: Path, variants: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        rows = [json.loads(x) for x in (root / v / "seed-0" / "metrics.jsonl").read_text().splitlines()]
        pts = [(r["round"], r.get("wall_s", 0.0), r["eval"]["test"]["auc"]) for r in rows if "eval" in r]
        if len(pts) > 1:
            axes[0].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=v)
            axes[1].plot([p[1] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=v)
    for ax, xl in zip(axes, ("round", "wall time (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("test AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out)


def search_groups(base: FederationConfig, ds: Dataset, out: Path) -> list[dict]:
    """Which profile attributes should key FedPA's group adapters? Decided on validation only."""
    from itertools import combinations

    from fedpa.server.federation import primary_metric
    from fedpa.simulations.simulate import simulate

    vocab = ds.vocab
    attrs = [f for f in ds.user_features if not f.endswith("_id") and 2 <= int(vocab.get(f, 0)) <= 64]
    candidates = [(x,) for x in attrs] + list(combinations(attrs, 2))
    key = primary_metric(base.split)
    rows = []
    for cand in candidates:
        name = "+".join(cand)
        run_dir = out / name / "seed-0"
        summary_file = run_dir / "summary.json"
        if summary_file.exists():  # finished earlier: the search resumes where it stopped
            summary = json.loads(summary_file.read_text())
        else:
            summary = simulate(replace(base, group_attributes=",".join(cand), run_dir=str(run_dir), personal_store=""))
        rows.append({"groups": name, "val": summary["val"][key], "test": summary["test"][key],
                     "best_round": summary["best_round"]})
        print(f"  {name:40s} val {key} {rows[-1]['val']:.4f}", flush=True)
    rows.sort(key=lambda r: -r["val"])
    lines = [f"# Group keys for FedPA's group adapters (seed 0, chosen by validation {key})", "",
             f"| group attributes | val {key} | test {key} (not used to choose) | best round |", "|---|---|---|---|"]
    lines += [f"| {r['groups']} | {r['val']:.4f} | {r['test']:.4f} | {r['best_round']} |" for r in rows]
    lines += ["", f"Chosen: **{rows[0]['groups']}**."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "kuaisar-r"))
    ap.add_argument("--data", default="data/kuaisar-r")
    ap.add_argument("--protocol", default="last", choices=("last", "chrono"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--algorithms", default=ALGORITHMS)
    ap.add_argument("--out", default="runs/kuaisar")
    ap.add_argument("--report-only", action="store_true", help="rewrite report.md from the finished runs")
    ap.add_argument("--clients", choices=("all", "private"), default=None,
                    help="who is a client and scored: every user (open users too) or the private users only "
                         "(default: all on the last protocol, as MRFF scores every user; private on chrono)")
    ap.add_argument("--search-groups", action="store_true",
                    help="FedPA (seed 0) with every single and pair of the profile attributes that have 2..64 values "
                         "as "
                         "group keys; ranks them by the *validation* metric only; writes OUT/<protocol>/group-search/")
    ap.add_argument("--ablation", action="store_true",
                    help="FedPA's ablations instead of the baselines (user adapter only, group adapters only, no gate, "
                         "rank 1 / 16), written under OUT/<protocol>/ablation/ with the same foundation")
    a = ap.parse_args()
    t0 = time.time()
    data = Path(a.data)
    if not (data / "manifest.json").exists():
        src = Path(a.src)
        import_interactions(src / "df.csv", data, KUAISAR_R, users=src / "user_features.csv",
                            items=src / "video_features.csv")
    ds = Dataset(data)
    out = Path(a.out) / a.protocol
    foundation = out / "pretrained"  # not "foundation": that is the frozen-foundation baseline's run directory
    default_clients = "all" if a.protocol == "last" else "private"
    clients = a.clients or default_clients
    if clients != default_clients:
        out = out / f"{clients}-clients"
    partition = PartitionConfig(seed=0, activity_attribute="reco_active_level", active_values=(3,))
    if not (foundation / "config.json").exists():
        report = pretrain_foundation(data, foundation, epochs=3, batch_size=1024, split=a.protocol, partition=partition,
                                     dropout="auto")   # as `fedpa pretrain`
        print("foundation:", json.dumps(report["evaluation"]["private_test"]["pretrained"]))
    key = Path(a.out) / a.protocol / "store.key"
    if not key.exists():
        generate_key_file(key)
    base = FederationConfig(data_dir=str(data), foundation=str(foundation), split=a.protocol, num_rounds=a.rounds,
                            activity_attribute="reco_active_level", active_values="3",
                            group_attributes="onehot_feat1,reco_active_level", federate_open_users=clients == "all",
                            personal_store=str(out / "stores" / "fedpa"), personal_store_key_file=str(key))
    variants = [v for v in a.algorithms.split(",") if v]
    if a.search_groups:
        search_groups(base, ds, out / "group-search")
        return
    if a.ablation:
        variants = list(ABLATION)
        out = out / "ablation"
        out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def run_one(cfg):
        from fedpa.simulations.simulate import simulate

        # only FedPA's seed 0 keeps its personal state on disk (for the adapter norms), in a store of its
        # own variant emptied first (a store left by an earlier run would hand its states to this one)
        variant = Path(cfg.run_dir).parent.name
        if cfg.algorithm != "fedpa" or cfg.seed != 0:
            return simulate(replace(cfg, personal_store=""))
        store = out / "stores" / variant
        shutil.rmtree(store, ignore_errors=True)
        return simulate(replace(cfg, personal_store=str(store)))

    if a.report_only:
        result = {"markdown": (out / "compare.md").read_text().strip()}
        wall = sum(json.loads((out / v / f"seed-{s}" / "summary.json").read_text())["wall_s"]
                   for v in variants for s in range(a.seeds))
    else:
        result = compare(base, variants, list(range(a.seeds)), out, run_one=run_one)
        wall = time.time() - started
    plot_curves(out, [v for v in variants if v != "foundation"], out / "curves_vs_rounds_and_time.png")
    title = "FedPA's ablations" if a.ablation else "fedpa"
    lines = [f"# {title} on KuaiSAR-R ({a.protocol} protocol)", "",
             f"{len(ds.days)} days, {ds.users().num_rows:,} users; clients: "
             f"{'every user (open users too)' if clients == 'all' else 'the private users'}; "
             f"{a.rounds} rounds, every client every round, "
             f"seeds 0..{a.seeds - 1}; foundation pre-trained on open users (reco_active_level = 3 as highly active); "
             "group adapters on onehot_feat1 and reco_active_level. Test at the best validation round.", "",
             result["markdown"], "",
             f"Compare wall time: {wall / 60:.1f} min"
             + ("" if a.report_only else f" (whole benchmark {(time.time() - t0) / 60:.1f} min)") + ".", "",
             "![curves](curves_vs_rounds_and_time.png)", ""]
    for variant in ("fedpa", "fedpa-release"):
        if variant in variants:
            cfg = variant_config(base, variant, 0, out)
            norms = adapter_norms(cfg, out / variant / "seed-0", out / "stores" / variant, key)
            lines += ["", f"## {variant}: adapters after training (seed 0)", "", "| kind | L2 norm |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in norms.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
